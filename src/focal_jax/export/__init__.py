"""Deploying a trained detector without focal_jax: StableHLO, a TF SavedModel, LiteRT.

    python -m focal_jax.export --checkpoint runs/demo --format stablehlo --out exported/demo

writes into the new folder `--out`:

    detector.stablehlo | saved_model/ | detector.tflite   the program (see `formats`)
    metadata.json      class names and ids, input size and dtype, batch, thresholds, version, config
    detect.py          a small loader that needs only NumPy and the format's runtime (no focal_jax)

The program takes uint8 RGB images `[B, H, W, 3]` at the export size and
returns boxes in their pixels, scores, classes and the number of valid
detections per image (`focal_jax.export.serving`): resizing, normalization,
padding, the network, post-processing and NMS are all inside. In Python:

    from focal_jax.export import export_workdir
    export_workdir("runs/demo", "saved_model", "exported/demo_tf", batch_size=4)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from focal_jax.engine.config import ExperimentConfig, to_json
from focal_jax.export.formats import FORMATS, SYMBOLIC_BATCH_FORMATS, WRITERS, ExportError
from focal_jax.export.serving import check_export_size, serving_function

METADATA_FILE = "metadata.json"
LOADER_FILE = "detect.py"
_RUNTIME = Path(__file__).with_name("runtime.py")

__all__ = ["FORMATS", "ExportError", "export", "export_workdir", "serving_function"]


def _check_out(out: Path, overwrite: bool) -> None:
  """Refuses an `out` that is a file, holds an export (unless `overwrite`) or holds anything else."""
  if not out.exists():
    return
  if not out.is_dir():
    raise ExportError(f"--out {out} is a file; give a new folder.")
  if (out / METADATA_FILE).is_file():
    if not overwrite:
      raise ExportError(f"{out} already holds an export; pass --overwrite to replace it, or give a new --out.")
  elif any(out.iterdir()):
    raise ExportError(f"{out} is a folder with other files in it; give a new or empty --out.")


def export(config: ExperimentConfig, variables: Any, format: str, out: str | os.PathLike, *,  # pylint: disable=redefined-builtin
           image_size: tuple[int, int] | None = None, batch_size: int | None = None,
           score_threshold: float | None = None, overwrite: bool = False,
           source: dict[str, Any] | None = None) -> Path:
  """Writes the detector of `config` and `variables` as `format` into the folder `out`.

  Args:
    config: the run's config.
    variables: the model's `{"params": ..., "batch_stats": ...}`.
    format: one of `FORMATS`.
    out: the folder to write (new, empty, or an earlier export with `overwrite`).
    image_size: `(height, width)` of the images the program takes (default:
      the model's input size, `config.data.padded_size`).
    batch_size: images per call; None: any number (stablehlo) or 1 (formats
      whose batch is fixed).
    score_threshold: replaces `config.postprocess.score_threshold`.
    overwrite: replace an earlier export in `out`.
    source: what the weights come from, recorded in metadata.json.

  Returns:
    `out`. Everything is written to a sibling folder first and renamed at
    the end, so `out` holds a whole export or none.

  Raises:
    ExportError: a bad format, size, batch or `out`, or a format that cannot
      hold the program (the message says which op and why); nothing is written.
  """
  if format not in FORMATS:
    raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}.")
  try:
    image_size = check_export_size(tuple(image_size or config.data.padded_size))
    if score_threshold is not None:
      config = dataclasses.replace(config, postprocess=dataclasses.replace(
          config.postprocess, score_threshold=score_threshold))
  except ValueError as error:
    raise ExportError(str(error)) from None
  if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
    raise ExportError(f"the batch size must be a positive whole number; got {batch_size!r}.")
  if batch_size is None and format not in SYMBOLIC_BATCH_FORMATS:
    batch_size = 1
  out = Path(out).absolute()
  _check_out(out, overwrite)
  staging = out.with_name(f".{out.name}.partial")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  try:
    detect = serving_function(config, variables, image_size)
    artifact = WRITERS[format](detect, image_size, batch_size, staging)
    metadata = _metadata(config, format, artifact, image_size, batch_size, source)
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    shutil.copyfile(_RUNTIME, staging / LOADER_FILE)
    if out.exists():
      shutil.rmtree(out)
    staging.rename(out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out


def export_workdir(workdir: str | os.PathLike, format: str, out: str | os.PathLike, *,  # pylint: disable=redefined-builtin
                   step: int | None = None, **options) -> Path:
  """`export` of a training work dir's checkpoint (the latest unless `step`); options as `export`'s.

  Raises:
    focal_jax.engine.workdir.WorkdirError: no config.json or no usable
      checkpoint (nothing is written).
    ExportError: as `export`.
  """
  from focal_jax.engine.config import model_from_config  # pylint: disable=g-import-not-at-top
  from focal_jax.engine.workdir import Workdir  # pylint: disable=g-import-not-at-top  (orbax)

  if format not in FORMATS:  # before reading any checkpoint
    raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}.")
  run = Workdir(workdir)
  config = run.read_config()
  like = jax.eval_shape(model_from_config(config).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, *config.data.padded_size, 3), jax.numpy.float32))
  variables, step = run.restore_variables(step, like=like)
  variables.setdefault("batch_stats", {})
  return export(config, variables, format, out,
                source={"workdir": str(Path(workdir).absolute()), "step": step}, **options)


def _metadata(config: ExperimentConfig, format: str, artifact: str, image_size: tuple[int, int],  # pylint: disable=redefined-builtin
              batch_size: int | None, source: dict[str, Any] | None) -> dict[str, Any]:
  from focal_jax import __version__  # pylint: disable=g-import-not-at-top

  labels = config.data.labels
  resolved = dataclasses.replace(config, data=dataclasses.replace(config.data, label_map=labels))
  return {
      "format": format,
      "artifact": artifact,
      "input": {"name": "images", "dtype": "uint8", "shape": [batch_size, *image_size, 3],
                "layout": "NHWC, RGB, 0-255; batch null: any number of images"},
      "outputs": {"boxes": "float32 [B, D, 4] x1, y1, x2, y2 in input pixels",
                  "scores": "float32 [B, D], decreasing, 0 where unused",
                  "classes": "int32 [B, D], index into classes, -1 where unused",
                  "num_detections": "int32 [B], valid slots first in each row"},
      "classes": [{"index": i, "name": name, "id": int(category_id)}
                  for i, (name, category_id) in enumerate(zip(labels.names, labels.category_ids))],
      "score_threshold": config.postprocess.score_threshold,
      "max_detections": config.postprocess.max_detections,
      "focal_jax_version": __version__,
      "source": source,
      "config": json.loads(to_json(resolved)),
  }
