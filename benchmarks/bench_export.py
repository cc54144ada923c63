"""Exported R50-FPN detectors against the jit predictor: equal detections, speed and artifact size.

Builds torchvision's RetinaNet R50-FPN (91 classes, random weights, trainable
batch norm) for 512x512 inputs, exports it to StableHLO (any batch) and to a TF
SavedModel (batch 2), reloads both as a deployment would (`jax.export.deserialize`,
`tf.saved_model.load`) and checks that they give the jit-compiled serving
function's detections (score threshold 0: every slot filled). Then times the
three on the same two images, in turn (medians after warm-up).

  python benchmarks/bench_export.py
  python benchmarks/bench_export.py --repeats 21 --out /tmp/r50_exports
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from focal_jax.convert.torchvision import TORCHVISION_COCO_LABEL_MAP
from focal_jax.data.config import InputConfig
from focal_jax.engine.config import ExperimentConfig, ModelConfig, model_from_config
from focal_jax.export import export, serving_function
from focal_jax.ops.anchors import AnchorConfig
from focal_jax.ops.postprocess import PostprocessConfig
from timing import interleaved_median_seconds, machine_line

SIZE, BATCH = 512, 2


def r50_config() -> ExperimentConfig:
  return ExperimentConfig(
      model=ModelConfig(depth=50, backbone_norm="bn", frozen_stages=0, p6_from="p5"),
      anchors=AnchorConfig.torchvision(),
      data=InputConfig(image_size=SIZE, size_divisibility=128, label_map=TORCHVISION_COCO_LABEL_MAP),
      postprocess=PostprocessConfig(score_threshold=0.0))


def _size(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=11)
  parser.add_argument("--out", default=None, help="where to write the exports (default: a temporary folder)")
  args = parser.parse_args()
  print(machine_line())

  config = r50_config()
  variables = jax.jit(lambda: model_from_config(config).init(
      jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))()
  variables = dict(variables)
  images = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), np.uint8)
  jitted = jax.jit(serving_function(config, variables, (SIZE, SIZE)))
  reference = jax.device_get(jitted(images))

  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (after JAX took the devices)

  with tempfile.TemporaryDirectory() as scratch:
    root = Path(args.out or scratch)
    rows, runners = [], {"jit serving function": lambda: jitted(images)}
    for format, batch_size in (("stablehlo", None), ("saved_model", BATCH)):
      started = time.perf_counter()
      out = export(config, variables, format, root / format, batch_size=batch_size, overwrite=True)
      seconds = time.perf_counter() - started
      if format == "stablehlo":
        exported = jax.export.deserialize(bytearray((out / "detector.stablehlo").read_bytes()))
        run = lambda exported=exported: exported.call(images)
        outputs = jax.device_get(run())
      else:
        serve = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"]
        run = lambda serve=serve: serve(images=tf.constant(images))
        outputs = {name: value.numpy() for name, value in run().items()}
      for name in ("classes", "num_detections"):
        np.testing.assert_array_equal(outputs[name], reference[name], err_msg=f"{format} {name}")
      score_error = float(np.abs(outputs["scores"] - reference["scores"]).max())
      box_error = float(np.abs(outputs["boxes"] - reference["boxes"]).max())
      assert score_error < 1e-5 and box_error < 0.01, (format, score_error, box_error)
      artifact = out / ("detector.stablehlo" if format == "stablehlo" else "saved_model")
      rows.append((format, _size(artifact) / 2**20, seconds, score_error, box_error))
      runners[f"reloaded {format}"] = run
    timings = interleaved_median_seconds(runners, repeats=args.repeats)

  print(f"\nR50-FPN, 91 classes, batch {BATCH} at {SIZE}x{SIZE}, score threshold 0; equal to the jit function:")
  print("| artifact | size (MiB) | export (s) | max score error | max box error (px) |")
  print("| --- | --- | --- | --- | --- |")
  for format, mib, seconds, score_error, box_error in rows:
    print(f"| {format} | {mib:.1f} | {seconds:.0f} | {score_error:.1e} | {box_error:.1e} |")
  base = timings["jit serving function"]
  print("\n| runs | median (ms) | vs jit |")
  print("| --- | --- | --- |")
  for name, seconds in timings.items():
    print(f"| {name} | {1000 * seconds:.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
  main()
