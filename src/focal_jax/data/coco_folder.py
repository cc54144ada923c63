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

import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from focal_jax.data.config import (FOLDER_DATASET_VERSION, LABEL_MAP_FILE, default_data_dir,
                                   folder_dataset_dir)
from focal_jax.data.synthetic_shapes import coco_2017_features

_NAME = re.compile(r"[a-z][a-z0-9_]*")
_RESERVED = ("coco", "synthetic_shapes")  # names the pipelines give a meaning of their own
_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS = range(2, 9)  # EXIF orientations other than "as stored" (1)
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # those that swap width and height
_MAX_IMAGE_ID = 2**31 - 1  # image ids travel as int32 in evaluation
_LISTED = 8


class CocoFolderError(ValueError):
  """The annotations or images cannot be used as they are; nothing was written."""


# --------------------------------------------------------------------------- checks


class _Problems:
  """Errors gathered by kind, each kind listing its first offenders."""

  def __init__(self):
    self._items = collections.defaultdict(list)

  def add(self, kind: str, item: str) -> None:
    self._items[kind].append(item)

  def raise_if_any(self, what: str) -> None:
    if not self._items:
      return
    lines = [f"Problems in {what}; nothing was written."]
    for kind, items in self._items.items():
      more = f", ... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
      lines.append(f"  {kind} ({len(items)}): {', '.join(items[:_LISTED])}{more}")
    raise CocoFolderError("\n".join(lines))


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _load_annotations(path: str | os.PathLike) -> dict:
  """A COCO annotation json as a dict (`annotations` may be absent: no objects)."""
  path = Path(path)
  try:
    coco = json.loads(path.read_text())
  except FileNotFoundError:
    raise CocoFolderError(f"annotation file {path} does not exist.") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise CocoFolderError(f"{path} is not a readable JSON file: {error}") from None
  if not isinstance(coco, dict) or any(not isinstance(coco.get(key), list)
                                       for key in ("images", "categories")):
    raise CocoFolderError(f"{path} is not a COCO annotation file: it needs 'images' and "
                          "'categories' lists (and 'annotations').")
  coco.setdefault("annotations", [])
  for key in ("images", "annotations", "categories"):
    if not isinstance(coco[key], list) or not all(isinstance(entry, dict) for entry in coco[key]):
      raise CocoFolderError(f"{path} is not a COCO annotation file: '{key}' must be a list of objects.")
  return coco


def _merge_categories(annotation_files: Mapping[str, dict]) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """`(names, category_ids)` of the categories of all files, sorted by id.

  Raises:
    CocoFolderError: a category without an integer id or a one-line name, an
      id with two names, or a name with two ids.
  """
  names_by_id = {}
  problems = _Problems()
  for source, coco in annotation_files.items():
    for category in coco["categories"]:
      category_id, name = category.get("id"), category.get("name")
      if not (_is_int(category_id) and isinstance(name, str) and name.strip() and "\n" not in name):
        problems.add("categories without an integer id and a one-line name", f"{category} in {source}")
      elif names_by_id.setdefault(category_id, name) != name:
        problems.add("category ids with two names",
                     f"{category_id} ({names_by_id[category_id]!r} and {name!r})")
  ids_by_name = collections.defaultdict(list)
  for category_id, name in names_by_id.items():
    ids_by_name[name].append(category_id)
  for name, ids in ids_by_name.items():
    if len(ids) > 1:
      problems.add("category names with two ids", f"{name!r} ({', '.join(map(str, sorted(ids)))})")
  if not names_by_id:
    problems.add("no categories", "the files define none")
  problems.raise_if_any("the categories")
  ids = tuple(sorted(names_by_id))
  return tuple(names_by_id[i] for i in ids), ids


@dataclasses.dataclass(frozen=True)
class _Image:
  """One image to store: where it is, how to read it, and its objects."""

  path: Path
  image_id: int
  file_name: str
  width: int  # as stored in the dataset (after the EXIF orientation, where applied)
  height: int
  keep_bytes: bool  # an 8-bit RGB JPEG/PNG stored as it is
  apply_orientation: bool
  objects: tuple[dict, ...]


@dataclasses.dataclass
class _SplitReport:
  """What `prepare` did with one split's annotations."""

  images: int = 0
  negatives: int = 0  # images without a box
  boxes: int = 0  # boxes stored (crowd boxes included)
  crowd: int = 0
  clipped: int = 0  # boxes that reached outside their image, clipped
  skipped: list[str] = dataclasses.field(default_factory=list)  # annotations of empty boxes

  def summary(self) -> str:
    text = f"images {self.images} ({self.negatives} without boxes), boxes {self.boxes} ({self.crowd} crowd)"
    if self.clipped:
      text += f"; clipped to their image: {self.clipped}"
    if self.skipped:
      more = ", ..." if len(self.skipped) > _LISTED else ""
      text += (f"; skipped (zero size or outside their image): {len(self.skipped)} "
               f"(annotations {', '.join(self.skipped[:_LISTED])}{more})")
    return text


def _inspect_image(path: Path, declared: tuple[int, int] | None, problems: _Problems):
  """`(width, height, keep_bytes, apply_orientation)` of an image file, or None after a problem."""
  if not path.is_file():
    problems.add("image files missing", str(path))
    return None
  try:
    with Image.open(path) as image:
      image_format, mode, raw = image.format, image.mode, image.size
      orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
  except (OSError, ValueError, Image.DecompressionBombError) as error:
    problems.add("image files unreadable", f"{path} ({error})")
    return None
  if mode.startswith("I") or mode == "F":
    problems.add("16-bit or floating-point images (convert them to 8 bits)", f"{path} (mode {mode})")
    return None
  oriented = raw[::-1] if orientation in _TRANSPOSED_ORIENTATIONS else raw
  apply_orientation = orientation in _ORIENTATIONS and declared in (None, oriented)
  size = oriented if apply_orientation else raw
  if declared is not None and declared != size:
    problems.add("images of another size than the json says",
                 f"{path} ({size[0]}x{size[1]}, json {declared[0]}x{declared[1]})")
    return None
  keep_bytes = image_format in ("JPEG", "PNG") and mode == "RGB" and not apply_orientation
  return size[0], size[1], keep_bytes, apply_orientation


def _annotation_name(annotation: dict, index: int) -> str:
  return str(annotation["id"]) if _is_int(annotation.get("id")) else f"#{index}"


def _box(annotation: dict):
  """`[x, y, w, h]` as 4 finite floats, or None."""
  bbox = annotation.get("bbox")
  if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
    return None
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox):
    return None
  return [float(v) for v in bbox]


def _object(annotation: dict, box, label: int, width: int, height: int, report: _SplitReport,
            name: str) -> dict | None:
  """The TFDS object of an annotation (box clipped to the image), or None for an empty box."""
  x, y, w, h = box
  x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
  x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
  if w <= 0 or h <= 0 or x2 <= x1 or y2 <= y1:
    report.skipped.append(name)
    return None
  report.clipped += (x1, y1, x2, y2) != (x, y, x + w, y + h)
  area = annotation.get("area")
  if not (isinstance(area, (int, float)) and math.isfinite(area) and area > 0):
    area = (x2 - x1) * (y2 - y1)
  is_crowd = bool(annotation.get("iscrowd", 0))
  report.boxes += 1
  report.crowd += is_crowd
  return {
      "id": annotation["id"] if _is_int(annotation.get("id")) else 0,
      "area": int(round(area)),
      "bbox": tfds.features.BBox(ymin=y1 / height, xmin=x1 / width, ymax=y2 / height, xmax=x2 / width),
      "label": label,
      "is_crowd": is_crowd,
  }


def _plan_split(images_dir: str | os.PathLike, coco: dict, category_ids, source: str
               ) -> tuple[list[_Image], _SplitReport]:
  """Checks one split (its json and its image files) and plans what to store.

  Args:
    images_dir: the folder that `file_name`s are relative to.
    coco: the split's annotation json (see `_load_annotations`).
    category_ids: the category id of each label (see `_merge_categories`).
    source: how error messages name the split.

  Raises:
    CocoFolderError: the problems listed in the module docstring, all at once.
  """
  images_dir = Path(images_dir)
  problems = _Problems()
  sizes, entries = {}, []
  for entry in coco["images"]:
    image_id, file_name = entry.get("id"), entry.get("file_name")
    if not (_is_int(image_id) and 0 <= image_id <= _MAX_IMAGE_ID and isinstance(file_name, str)):
      problems.add(f"images without an integer id in [0, {_MAX_IMAGE_ID}] and a file_name", str(entry))
      continue
    if image_id in sizes:
      problems.add("duplicate image ids", str(image_id))
      continue
    width, height = entry.get("width"), entry.get("height")
    declared = (width, height) if _is_int(width) and _is_int(height) else None
    sizes[image_id] = _inspect_image(images_dir / file_name, declared, problems)
    entries.append((image_id, file_name))

  label_of = {category_id: label for label, category_id in enumerate(category_ids)}
  report = _SplitReport()
  objects = collections.defaultdict(list)
  for index, annotation in enumerate(coco["annotations"]):
    name = _annotation_name(annotation, index)
    image_id, category_id, box = annotation.get("image_id"), annotation.get("category_id"), _box(annotation)
    if not (_is_int(category_id) and category_id in label_of):
      problems.add("annotations of an unknown category id", f"{name} (category {category_id})")
    elif not (_is_int(image_id) and image_id in sizes):
      problems.add("annotations of an unknown image id", f"{name} (image {image_id})")
    elif box is None:
      problems.add("annotations without a bbox of 4 finite numbers", f"{name} ({annotation.get('bbox')})")
    elif sizes[image_id] is not None:
      width, height = sizes[image_id][:2]
      stored = _object(annotation, box, label_of[category_id], width, height, report, name)
      if stored is not None:
        objects[image_id].append(stored)
  problems.raise_if_any(source)

  planned = []
  for image_id, file_name in entries:
    width, height, keep_bytes, apply_orientation = sizes[image_id]
    planned.append(_Image(images_dir / file_name, image_id, file_name, width, height, keep_bytes,
                          apply_orientation, tuple(objects[image_id])))
  report.images = len(planned)
  report.negatives = sum(not image.objects for image in planned)
  return planned, report


# --------------------------------------------------------------------------- writing


def _encode_image(image: _Image) -> bytes:
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


def _examples(images: list[_Image]) -> Iterator[tuple[int, dict]]:
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
  annotations = {split: _load_annotations(json_path) for split, (_, json_path) in splits.items()}
  class_names, category_ids = _merge_categories(
      {str(splits[split][1]): coco for split, coco in annotations.items()})
  planned = {split: _plan_split(images_dir, annotations[split], category_ids,
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
  args = parser.parse_args(argv)
  from focal_jax.data.coco import hide_accelerators_from_tf  # pylint: disable=g-import-not-at-top

  hide_accelerators_from_tf()
  splits = {"train": tuple(args.train)}
  if args.validation:
    splits["validation"] = tuple(args.validation)
  try:
    builder = prepare(args.name, splits, args.data_dir)
  except (CocoFolderError, FileExistsError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  data_dir = Path(builder.data_dir).parents[1]
  print(f"Train on it with\n    python -m experiments.coco_retinanet --config finetune "
        f"--data.dataset={args.name} --data.data_dir={data_dir}")
  if not args.validation:
    print("There is no validation split: evaluate on part of train, e.g. with "
          "--data.train_split='train[:90%]' --data.eval_split='train[90%:]'.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
