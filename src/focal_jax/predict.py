"""Detections on your own images, from a training work dir.

    python -m focal_jax.predict --checkpoint runs/demo photos/ extra.jpg --draw drawn/

reads the work dir's `config.json` and its latest checkpoint (`--step` picks
another), prepares every image as evaluation does (the config's eval resize,
ImageNet normalization, padding), runs the jit-compiled predict step in
batches and writes a COCO-style results JSON (`--output`, default
predictions.json): one entry per detection,

    {"file_name": "photos/cat.jpg", "image_id": 0, "category_id": 17,
     "category_name": "cat", "bbox": [x, y, w, h], "score": 0.93}

with `image_id` the image's index among the inputs and `bbox` in pixels of
the original image (as displayed: EXIF orientation applied). Images of any
size and mode (grayscale, palette, RGBA, ...) are converted to RGB. `--draw
DIR` also writes each image, at its original size, with its detections drawn
(`DIR/<name>.png`). An image that cannot be read is named on stderr and
skipped; the others are still processed and the exit status is 1.

In Python:

    predictor = Predictor.from_workdir("runs/demo")
    [result] = predictor.predict([image])  # uint8 [H, W, 3] or [H, W]
    result["boxes"], result["scores"], result["classes"], result["class_names"]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import numpy as np

from focal_jax._cli import run_command
from focal_jax._extras import require
from focal_jax.engine.config import ExperimentConfig, model_from_config
from focal_jax.engine.evaluation import coco_bboxes
from focal_jax.engine.inference import compile_predict_step
from focal_jax.engine.workdir import Workdir
from focal_jax.visualize import as_rgb_array, draw_detections

Image = require("PIL.Image")
ImageOps = require("PIL.ImageOps")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class Predictor:
  """A trained RetinaNet on in-memory images: detections in each image's own pixels.

  Images are prepared as in evaluation (the config's eval resize, ImageNet
  normalization, padding) and run in batches of `batch_size` (the last one
  padded) through one jit-compiled predict step, on the first device.
  """

  def __init__(self, config: ExperimentConfig, variables: dict, *, batch_size: int = 8,
               step: int | None = None):
    """Args: the run's config, its model variables, the batch size and the checkpoint step (for reports)."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive; got {batch_size}.")
    self.config = config
    self.step = step
    self.batch_size = batch_size
    self.class_names = config.data.labels.names
    self.category_ids = config.data.labels.category_ids
    self._variables = variables
    self._predict = compile_predict_step(model_from_config(config), config.anchors, config.postprocess)
    from focal_jax.data import make_eval_preprocessor  # pylint: disable=g-import-not-at-top  (TensorFlow)

    self._preprocess = make_eval_preprocessor(config.data)

  @classmethod
  def from_workdir(cls, workdir: str | Path, *, step: int | None = None, score_threshold: float | None = None,
                   batch_size: int = 8) -> Predictor:
    """The predictor of a training work dir's checkpoint (the latest unless `step`).

    `score_threshold` replaces the config's `postprocess.score_threshold`.
    Only the model variables are read (not the optimizer state), onto the
    first device.

    Raises:
      focal_jax.engine.workdir.WorkdirError: no work dir, config.json or
        checkpoint (at `step`), or a checkpoint that cannot be read or does
        not fit the model of config.json.
    """
    workdir = Workdir(workdir)
    config = workdir.read_config()
    if score_threshold is not None:
      config = dataclasses.replace(config, postprocess=dataclasses.replace(
          config.postprocess, score_threshold=score_threshold))
    like = jax.eval_shape(model_from_config(config).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *config.data.padded_size, 3), jax.numpy.float32))
    variables, step = workdir.restore_variables(step, like=like)
    variables.setdefault("batch_stats", {})
    return cls(config, jax.device_put(variables, jax.devices()[0]), batch_size=batch_size, step=step)

  def predict(self, images: Iterable) -> list[dict]:
    """Detections of each image.

    Args:
      images: uint8 arrays of shape `[H, W, 3]` (RGB), `[H, W]` or
        `[H, W, 1]` (grayscale), each of its own size.

    Returns:
      Per image, `{"boxes": float32 [N, 4] xyxy in the image's pixels,
      "scores": float32 [N] (decreasing), "classes": int32 [N],
      "class_names": list of N str}`.
    """
    images = [as_rgb_array(image) for image in images]
    results = []
    for start in range(0, len(images), self.batch_size):
      results += self._predict_batch(images[start:start + self.batch_size])
    return results

  def _predict_batch(self, images: list[np.ndarray]) -> list[dict]:
    examples = [self._preprocess(image) for image in images]
    padding = self.batch_size - len(examples)
    batch = {"images": np.stack([e[0] for e in examples] + [np.zeros_like(examples[0][0])] * padding),
             "scale": np.array([e[1] for e in examples] + [1.0] * padding, np.float32),
             "original_size": np.array([e[2] for e in examples] + [[1, 1]] * padding, np.int32)}
    detections = jax.device_get(self._predict(self._variables, batch))
    results = []
    for i in range(len(examples)):
      keep = detections.valid[i]
      classes = detections.classes[i][keep].astype(np.int32)
      results.append({"boxes": detections.boxes[i][keep].astype(np.float32),
                      "scores": detections.scores[i][keep].astype(np.float32), "classes": classes,
                      "class_names": [self.class_names[c] for c in classes]})
    return results


# --------------------------------------------------------------------------- command line


# Pillow's modes of 16-bit grayscale pixels, whose values span 0..65535.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def read_image(path: str | Path) -> Image.Image:
  """An image file as an RGB PIL image, upright as viewers show it (EXIF orientation applied).

  16-bit grayscale pixels are scaled to 8 bits (`round(v / 257)`: 65535 is
  255), not clipped. 32-bit integer and floating-point pixels, whose range
  the file does not tell, are refused.

  Raises:
    OSError, ValueError: the file cannot be read as an image, or its pixels
      are of an unknown range.
  """
  with Image.open(path) as image:
    image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
      pixels = np.asarray(image, np.float64)
      return Image.fromarray(np.rint(pixels / 257).astype(np.uint8), "L").convert("RGB")
    if image.mode in ("I", "F"):
      raise ValueError(f"{'32-bit integer' if image.mode == 'I' else 'floating-point'} pixels (mode "
                       f"{image.mode}) have no known range; convert the image to 8 or 16 bits per channel.")
    return image.convert("RGB")


def find_images(inputs: Sequence[str]) -> list[Path]:
  """Files given by name, and the .jpg/.jpeg/.png files of folders (sorted), in the order given."""
  paths = []
  for name in inputs:
    path = Path(name)
    if path.is_dir():
      paths += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
      paths.append(path)  # a missing file is reported when it is read
  return paths


def _drawing_names(paths: Sequence[Path]) -> list[str]:
  """One distinct file name per input: `<stem>.png`, or `<stem>_<k>.png` (the least k >= 1) when taken.

  Names are compared case-insensitively, as on the file systems that do.
  """
  taken, names = set(), []
  for path in paths:
    name, k = f"{path.stem}.png", 0
    while name.lower() in taken:
      k += 1
      name = f"{path.stem}_{k}.png"
    taken.add(name.lower())
    names.append(name)
  return names


def _check_outputs(paths: Sequence[Path], output: Path, draw_dir: Path | None) -> None:
  """Refuses, before any work, an output that would overwrite an input or cannot be written.

  Raises:
    ValueError: `output` is an input image or a folder; `draw_dir` is a file
      or holds input images; either lies where nothing can be written.
  """
  inputs = {path.resolve() for path in paths if path.exists()}
  if output.resolve() in inputs:
    raise ValueError(f"--output {output} is one of the input images; choose another file.")
  if output.is_dir():
    raise ValueError(f"--output {output} is a folder; give a file name (e.g. {output / 'predictions.json'}).")
  _check_writable(output.parent, "--output")
  if draw_dir is None:
    return
  if draw_dir.exists() and not draw_dir.is_dir():
    raise ValueError(f"--draw {draw_dir} is a file; give a folder for the drawings.")
  if any(path.parent == draw_dir.resolve() for path in inputs):
    raise ValueError(f"--draw {draw_dir} holds input images, which drawings must never replace; give the "
                     "drawings a folder of their own.")
  _check_writable(draw_dir, "--draw")


def _check_writable(directory: Path, flag: str) -> None:
  """Raises ValueError unless `directory`, or the nearest existing folder above it, can be written in."""
  existing = directory.absolute()
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise ValueError(f"{flag}: {existing} is a file, so {directory} cannot be a folder.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{flag}: cannot write in {existing} (permission denied or a read-only file system).")


def _write_new(path: Path, write) -> None:
  """`write(partial_path)`, then renames the file onto `path`.

  A kill leaves the old file or the new one, never half of one; a symbolic
  link at `path` is replaced by the file, never followed.
  """
  partial = path.with_name(f".{path.name}.partial{path.suffix}")
  write(partial)
  os.replace(partial, path)


def coco_results(file_name: str, image_id: int, result: dict, category_ids: Sequence[int]) -> list[dict]:
  """COCO-style result entries (`bbox` as `[x, y, w, h]`) of one image's detections."""
  return [{"file_name": file_name, "image_id": image_id, "category_id": int(category_ids[c]),
           "category_name": name, "bbox": bbox.tolist(), "score": float(score)}
          for bbox, score, c, name in zip(coco_bboxes(result["boxes"]), result["scores"],
                                          result["classes"], result["class_names"])]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m focal_jax.predict",
      description="Detect objects in images with a trained RetinaNet and write the detections as COCO-style "
                  "JSON (and, with --draw, as pictures).",
      epilog="Exit status: 0 when every image was processed, 1 when some could not be read (each is named on "
             "stderr; the others are still processed), 2 on an error that stops everything.")
  parser.add_argument("images", nargs="+", metavar="IMAGE",
                      help="image files (any format Pillow reads) or folders (their .jpg, .jpeg and .png files, "
                           "sorted by name)")
  parser.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                      help="a training work dir (the --workdir of python -m experiments.coco_retinanet): its "
                           "config.json and checkpoints/ are used")
  parser.add_argument("--step", type=int, metavar="N", help="the checkpoint to use (default: the latest)")
  parser.add_argument("--output", default="predictions.json", metavar="FILE",
                      help="where to write the detections (default: predictions.json): a JSON list of "
                           "{file_name, image_id, category_id, category_name, bbox: [x, y, w, h] in original "
                           "pixels, score}")
  parser.add_argument("--draw", metavar="DIR",
                      help="also write each image at its original size with its boxes, class names and scores "
                           "drawn, as DIR/<name>.png")
  parser.add_argument("--score_threshold", type=float, metavar="S",
                      help="keep detections scoring above S, in [0, 1] (default: the run's "
                           "postprocess.score_threshold, 0.05 in the recipes)")
  parser.add_argument("--batch_size", type=int, default=8, metavar="B",
                      help="images per predict step (default: 8); larger is faster on accelerators, "
                           "uses more memory")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error(f"--batch_size must be positive; got {args.batch_size}.")
  return args


def _read_images(paths: Sequence[Path], indices: Sequence[int], debug: bool) -> dict[int, Image.Image]:
  """The readable images among `paths[indices]`, by index; each unreadable one is named on stderr."""
  images = {}
  for i in indices:
    try:
      images[i] = read_image(paths[i])
    except Exception as error:  # pylint: disable=broad-except  (Pillow raises many kinds for a bad file)
      if debug:
        traceback.print_exc()
      print(f"error: {paths[i]}: cannot read this image ({error}); skipped.", file=sys.stderr)
  return images


def run(args: argparse.Namespace) -> int:
  """Predicts on `args.images` and writes the results; the exit status (0, or 1 if an image failed)."""
  paths = find_images(args.images)
  if not paths:
    raise ValueError(f"no .jpg, .jpeg or .png images in {', '.join(args.images)}.")
  output = Path(args.output)
  draw_dir = None if args.draw is None else Path(args.draw)
  _check_outputs(paths, output, draw_dir)
  predictor = Predictor.from_workdir(args.checkpoint, step=args.step, score_threshold=args.score_threshold,
                                     batch_size=args.batch_size)
  if draw_dir is not None:
    draw_dir.mkdir(parents=True, exist_ok=True)
  drawing_names = _drawing_names(paths)
  results, failed = [], 0
  for start in range(0, len(paths), args.batch_size):
    chunk = range(start, min(start + args.batch_size, len(paths)))
    images = _read_images(paths, chunk, args.debug)
    failed += len(chunk) - len(images)
    for i, result in zip(images, predictor.predict([np.asarray(image) for image in images.values()])):
      results += coco_results(str(paths[i]), i, result, predictor.category_ids)
      if draw_dir is not None:
        drawing = draw_detections(images[i], result["boxes"], result["scores"], result["class_names"])
        _write_new(draw_dir / drawing_names[i], drawing.save)
    if len(paths) > args.batch_size:
      print(f"{chunk[-1] + 1}/{len(paths)} images", file=sys.stderr, flush=True)
  output.parent.mkdir(parents=True, exist_ok=True)
  _write_new(output, lambda path: path.write_text(json.dumps(results, indent=1) + "\n"))
  print(f"{output}: {len(results)} detections in {len(paths) - failed} of {len(paths)} images (checkpoint step "
        f"{predictor.step})")
  return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (0 ok, 1 some images failed, 2 error, 130 interrupted)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  return run_command(lambda: run(args), debug=args.debug,
                     interrupted=f"interrupted; {args.output} was not written.")


if __name__ == "__main__":
  sys.exit(main())
