"""The demo recipe's train and predict steps on batches rendered in NumPy (no TensorFlow, no data on disk).

    python benchmarks/bench_demo_step.py                               # the demo, on this machine's devices
    python benchmarks/bench_demo_step.py --override model.compute_dtype=bfloat16

For machines without the data stack (TensorFlow, tensorflow-datasets,
pycocotools), such as a GPU machine that only has JAX: the training batches
are synthetic_shapes images drawn by its NumPy renderer
(`focal_jax.data.shapes_render`, the same renderer the dataset is built
with), normalized and padded as the input pipeline does, and placed on the
devices before the clock starts, so the figures are the steps alone.

Reports the first step (compilation included), steps per second over
`--steps` steps in a row (the loss is read once, after the last step, so
nothing waits for the host in between; on an accelerator the loop also runs
under `jax.transfer_guard("disallow")`, which fails on any implicit transfer),
the projected training time of the recipe's whole schedule, and the predict
step (network + post-processing) on an evaluation batch. With `--trace_dir`,
it also traces `--trace_steps` more train steps with `jax.profiler` (for
TensorBoard or Perfetto) and, on a CPU, prints where their time went
(`cpu_trace.summarize_cpu_trace`): the time in thread-pool tasks and in
operations per step, the share of the time during which 0, 1, 2, ... of
XLA's compute threads ran a task, and the costliest operation kinds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `experiments` package holds the recipes

from experiments import configs  # noqa: E402  pylint: disable=g-import-not-at-top
from focal_jax.data import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, SYNTHETIC_SHAPES_LABEL_MAP  # noqa: E402
from focal_jax.data import shapes_render  # noqa: E402
from focal_jax.engine.config import apply_overrides, model_from_config  # noqa: E402
from focal_jax.engine.inference import compile_predict_step  # noqa: E402
from focal_jax.engine.mesh import global_batch, make_mesh  # noqa: E402
from focal_jax.engine.train_step import compile_train_step, create_train_state  # noqa: E402
from focal_jax.ops.anchors import generate_anchors  # noqa: E402
from cpu_trace import summarize_cpu_trace  # noqa: E402
from timing import median_seconds  # noqa: E402


def rendered_batch(config, batch_size: int, first_index: int) -> dict[str, np.ndarray]:
  """`batch_size` rendered images as a network batch: normalized images and padded ground truth."""
  data = config.data
  height, width = data.padded_size
  images = np.zeros((batch_size, height, width, 3), np.float32)
  boxes = np.zeros((batch_size, data.max_boxes, 4), np.float32)
  classes = np.full((batch_size, data.max_boxes), -1, np.int32)
  render = shapes_render.RenderConfig()
  for row in range(batch_size):
    image, objects = shapes_render.render_image(np.random.default_rng([0, first_index + row]), render)
    h, w = image.shape[:2]
    images[row, :h, :w] = (image - np.asarray(IMAGENET_MEAN_RGB)) / np.asarray(IMAGENET_STD_RGB)
    kept = [o for o in objects if not o["is_crowd"]][:data.max_boxes]
    for k, o in enumerate(kept):
      boxes[row, k] = o["box"]
      classes[row, k] = SYNTHETIC_SHAPES_LABEL_MAP.label_to_class[o["label"]]
  return {"images": images, "boxes": boxes, "classes": classes, "valid": classes >= 0}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="demo", choices=configs.NAMES)
  parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE")
  parser.add_argument("--steps", type=int, default=200, help="timed train steps in a row")
  parser.add_argument("--batches", type=int, default=8, help="distinct rendered batches, used in turn")
  parser.add_argument("--predict_repeats", type=int, default=20)
  parser.add_argument("--trace_dir", help="also trace train steps with jax.profiler into this directory")
  parser.add_argument("--trace_steps", type=int, default=20, help="train steps traced with --trace_dir")
  parser.add_argument("--out", help="also write the figures to this JSON file")
  args = parser.parse_args()

  config = apply_overrides(configs.get_config(args.config), args.override)
  mesh = make_mesh()
  model = model_from_config(config)
  state, tx = create_train_state(model, config, jax.random.key(config.train.seed), mesh)
  anchors = generate_anchors(config.data.padded_size, config.anchors)
  train_step = compile_train_step(model, tx, anchors, config.loss, mesh)
  batch_size = config.data.batch_size
  batches = [global_batch(rendered_batch(config, batch_size, i * batch_size), mesh) for i in range(args.batches)]
  jax.block_until_ready(batches)

  started = time.perf_counter()
  state, metrics = train_step(state, batches[0])
  float(metrics["loss"])
  first_step = time.perf_counter() - started
  for i in range(1, 5):  # settle the allocator and caches before timing
    state, metrics = train_step(state, batches[i % args.batches])
  float(metrics["loss"])

  on_accelerator = jax.devices()[0].platform != "cpu"
  guard = jax.transfer_guard("disallow") if on_accelerator else contextlib.nullcontext()
  started = time.perf_counter()
  with guard:
    for i in range(args.steps):
      state, metrics = train_step(state, batches[i % args.batches])
    jax.block_until_ready(state)
  seconds = time.perf_counter() - started
  loss = float(metrics["loss"])
  steps_per_second = args.steps / seconds
  if args.trace_dir:
    with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
      for i in range(args.trace_steps):
        state, metrics = train_step(state, batches[i % args.batches])
      jax.block_until_ready(state)

  predict_step = compile_predict_step(model, config.anchors, config.postprocess, mesh)
  eval_size = config.data.eval_batch_size
  eval_batch = rendered_batch(config, eval_size, 10**6)
  eval_batch = global_batch({"images": eval_batch["images"], "scale": np.ones(eval_size, np.float32),
                             "original_size": np.tile(np.asarray(config.data.padded_size, np.int32),
                                                      (eval_size, 1))}, mesh)
  variables = state.variables
  predict_seconds = median_seconds(lambda: predict_step(variables, eval_batch), warmup=1,
                                   repeats=args.predict_repeats)

  devices = jax.devices()
  result = {
      "device": f"{len(devices)} x {devices[0].device_kind}", "jax": jax.__version__, "config": args.config,
      "overrides": args.override, "batch_size": batch_size, "first_step_s": round(first_step, 2),
      "steps_per_second": round(steps_per_second, 2), "images_per_second": round(steps_per_second * batch_size, 1),
      "schedule_steps": config.train.total_steps,
      "schedule_train_s": round(config.train.total_steps / steps_per_second, 1),
      "loss_after": loss, "predict_batch": eval_size, "predict_ms": round(1000 * predict_seconds, 2),
      "predict_images_per_second": round(eval_size / predict_seconds, 1),
  }
  print(f"{result['device']}: train step {1000 / steps_per_second:.1f} ms ({steps_per_second:.1f} steps/s, "
        f"{result['images_per_second']} img/s; first step {first_step:.1f} s); the {config.train.total_steps}-step "
        f"schedule in {result['schedule_train_s']} s of training; predict {result['predict_ms']} ms per "
        f"{eval_size} images")
  if args.trace_dir and not on_accelerator:
    result["cpu_trace"] = summarize_cpu_trace(args.trace_dir, args.trace_steps)
    print(f"{args.trace_steps} traced train steps: {result['cpu_trace']}")
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
  main()
