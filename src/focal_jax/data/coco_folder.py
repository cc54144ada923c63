"""Your own COCO-format dataset as a TFDS dataset with the features of `coco/2017`.

    python -m focal_jax.data.coco_folder --name my_objects \\
        --train images/train annotations/train.json \\
        --validation images/val annotations/val.json --data_dir ~/tensorflow_datasets

reads, for each split, a folder of images and its COCO annotation json
(`images`: `id`, `file_name` relative to the folder, `width`, `height`;
`annotations`: `id`, `image_id`, `category_id`, `bbox` `[x, y, w, h]` in
pixels, `iscrowd`; `categories`: `id`, `name`) and writes the TFDS dataset
`<data_dir>/my_objects/1.0.0/` (tfrecord) with exactly the features of
`coco/2017` (`image`, `image/filename`, `image/id`, `objects{id, area, bbox,
label, is_crowd}`), plus `label_map.json`. The input pipelines, evaluation and
`python -m experiments.coco_retinanet --data.dataset=my_objects
--data.data_dir=...` then use it as they use COCO.

Classes: the categories of all splits, sorted by id, are the labels 0..K-1
(a `ClassLabel` of their names) and the model's classes; `label_map.json`
keeps their category ids, so detections and COCO evaluation speak the json's
own ids. A category without annotations still gets a class.

Checked before anything is written (all problems of a split are reported at once):

| problem | what happens |
| --- | --- |
| a box reaching outside its image | clipped to the image (counted) |
| a box of zero width or height, or wholly outside its image | skipped (counted, ids listed) |
| an unknown category id or image id, a malformed bbox | error naming the annotations |
| an image file missing or unreadable, or of another size than the json says | error naming the files |
| duplicate image ids, two categories of one name, an id named twice | error |

On error nothing is written. Images without annotations stay (negatives);
crowd annotations stay with `is_crowd` (never training targets, ignored by
COCO evaluation). Images: 8-bit RGB JPEG and PNG files are stored as they
are; others (grayscale, RGBA, palette, CMYK, BMP, ...) are converted to RGB
(alpha dropped) and stored as PNG, or as JPEG (quality 95) when they were
JPEG. An EXIF orientation is applied, as browsers, annotation tools and
detectron2 do, unless the json's width and height fit only the image as
stored (its tool ignored the orientation). 16-bit and floating-point images
are refused.

The dataset is built in a hidden sibling folder and moved into place when
complete; an existing dataset of the same name is never overwritten.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from focal_jax._cli import run_command
from focal_jax._extras import require
from focal_jax.data._tensorflow import tfds
from focal_jax.data.coco_annotations import (CocoFolderError, PlannedImage, load_annotations,
                                             merge_categories, plan_split)
from focal_jax.data.config import (FOLDER_DATASET_VERSION, LABEL_MAP_FILE, default_data_dir,
                                   folder_dataset_dir)
from focal_jax.data.features import coco_2017_features

Image = require("PIL.Image")
ImageOps = require("PIL.ImageOps")

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED = ("coco", "synthetic_shapes")  # names the pipelines give a meaning of their own


def _encode_image(image: PlannedImage) -> bytes:
  """The bytes to store: the file itself, or the image as 8-bit RGB (PNG, JPEG for JPEG files)."""
  if image.keep_bytes:
    return image.path.read_bytes()
  with Image.open(image.path) as opened:
    image_format = opened.format
    pixels = ImageOps.exif_transpose(opened) if image.apply_orientation else opened
    pixels = pixels.convert("RGB")
  buffer = io.BytesIO()
  if image_format == "JPEG":
    pixels.save(buffer, format="JPEG", quality=95)
  else:
    pixels.save(buffer, format="PNG")
  return buffer.getvalue()


def _examples(images: list[PlannedImage]) -> Iterator[tuple[int, dict]]:
  for image in images:
    yield image.image_id, {
        "image": io.BytesIO(_encode_image(image)),
        "image/filename": image.file_name,
        "image/id": image.image_id,
        "objects": list(image.objects),
    }


def _check_name(name: str, root: Path) -> None:
  if not _NAME.fullmatch(name):
    raise CocoFolderError(f"dataset name {name!r} must be lower case letters, digits and '_', "
                          "starting with a letter (e.g. my_objects).")
  if name in _RESERVED:
    raise CocoFolderError(f"{name!r} is a dataset of focal_jax's own; choose another name.")
  try:
    tfds.builder_cls(name)
  except tfds.core.DatasetNotFoundError:
    pass
  else:
    raise CocoFolderError(f"{name!r} is a dataset of the TFDS catalog; choose another name.")
  if (root / name).exists():
    raise FileExistsError(f"{root / name} exists already; choose another name, or delete that folder "
                          "to prepare the dataset again.")


def prepare(name: str, splits: Mapping[str, tuple[str | os.PathLike, str | os.PathLike]],
            data_dir: str | os.PathLike | None = None, *, verbose: bool = True):
  """Writes the folder dataset `name` into `data_dir` and returns its TFDS builder.

  Args:
    name: the dataset name (`InputConfig.dataset`, `--data.dataset`).
    splits: split name ("train", "validation", ...) -> (images folder, annotation json).
    data_dir: a local TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    verbose: print what was stored (and what was clipped or skipped) per split.

  Returns:
    The builder of `<data_dir>/<name>/1.0.0` (as `tfds.builder_from_directory` gives it).

  Raises:
    CocoFolderError: a bad name or bad annotations/images (see the module docstring).
    FileExistsError: the dataset exists already.
  """
  if not splits:
    raise CocoFolderError("no split to prepare; give at least the train images and annotations.")
  root = Path(os.path.expanduser(data_dir or default_data_dir())).absolute()
  _check_name(name, root)
  annotations = {split: load_annotations(json_path) for split, (_, json_path) in splits.items()}
  class_names, category_ids = merge_categories(
      {str(splits[split][1]): coco for split, coco in annotations.items()})
  planned = {split: plan_split(images_dir, annotations[split], category_ids,
                                f"the {split} split ({json_path})")
             for split, (images_dir, json_path) in splits.items()}

  staging = root / f".{name}.partial"
  shutil.rmtree(staging, ignore_errors=True)
  try:
    tfds.display_progress_bar(False)
    with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints the staging path
      builder = tfds.dataset_builders.store_as_tfds_dataset(
          name=name, version=FOLDER_DATASET_VERSION, features=coco_2017_features(class_names),
          split_datasets={split: _examples(images) for split, (images, _) in planned.items()},
          data_dir=staging, file_format="tfrecord",
          description=f"COCO-format dataset {name} ({', '.join(f'{s}: {splits[s][1]}' for s in splits)}).",
          download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    label_map = {"names": list(class_names), "category_ids": list(category_ids)}
    (Path(builder.data_dir) / LABEL_MAP_FILE).write_text(json.dumps(label_map, indent=2) + "\n")
    (staging / name).rename(root / name)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  directory = folder_dataset_dir(name, str(root))
  if verbose:
    print(f"Prepared {name} at {directory}")
    for split, (_, report) in planned.items():
      print(f"  {split}: {report.summary()}")
    print(f"  {len(class_names)} classes: "
          + ", ".join(f"{n} (id {i})" for n, i in zip(class_names, category_ids)))
  return tfds.builder_from_directory(directory)


def main(argv=None) -> int:
  """The command line: prepares the dataset; returns 2 (and prints why) on bad input."""
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="python -m focal_jax.data.coco_folder",
      description="Turn a folder of images and its COCO annotation json into a TFDS dataset with the "
                  "features of coco/2017 (offline, tfrecord).")
  parser.add_argument("--name", required=True, help="dataset name, e.g. my_objects (--data.dataset=NAME)")
  parser.add_argument("--train", required=True, nargs=2, metavar=("IMAGES_DIR", "ANNOTATIONS_JSON"),
                      help="the training images and their annotations")
  parser.add_argument("--validation", nargs=2, metavar=("IMAGES_DIR", "ANNOTATIONS_JSON"),
                      help="the evaluation images and their annotations")
  parser.add_argument("--data_dir", default=None,
                      help="a local TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
  args = parser.parse_args(argv)
  splits = {"train": tuple(args.train)}
  if args.validation:
    splits["validation"] = tuple(args.validation)

  def run() -> int:
    builder = prepare(args.name, splits, args.data_dir)
    data_dir = Path(builder.data_dir).parents[1]
    print(f"Train on it with\n    python -m experiments.coco_retinanet --config finetune "
          f"--data.dataset={args.name} --data.data_dir={data_dir}")
    if not args.validation:
      print("There is no validation split: evaluate on part of train, e.g. with "
            "--data.train_split='train[:90%]' --data.eval_split='train[90%:]'.")
    return 0

  return run_command(run, debug=args.debug)


if __name__ == "__main__":
  sys.exit(main())
