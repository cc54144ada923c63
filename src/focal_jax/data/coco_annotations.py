"""Reading and checking a COCO-format split (annotation json and image files) for `coco_folder`.

`load_annotations` reads a json, `merge_categories` makes the classes of all
splits, and `plan_split` checks a split's annotations against its image files
and plans what to store: each image with its objects in the `coco/2017`
features (boxes clipped to the image, empty ones skipped and counted). Every
problem of a split is gathered and raised at once as a `CocoFolderError`
(the checks are listed in the `coco_folder` module docstring); nothing here
writes a file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from focal_jax._extras import require
from focal_jax._messages import LISTED, problem_line
from focal_jax.data._tensorflow import tfds

Image = require("PIL.Image")

_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS = range(2, 9)  # EXIF orientations other than "as stored" (1)
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # those that swap width and height
_MAX_IMAGE_ID = 2**31 - 1  # image ids travel as int32 in evaluation


class CocoFolderError(ValueError):
  """The annotations or images cannot be used as they are; nothing was written."""


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
    lines += [problem_line(kind, items) for kind, items in self._items.items()]
    raise CocoFolderError("\n".join(lines))


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def load_annotations(path: str | os.PathLike) -> dict:
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


def merge_categories(annotation_files: Mapping[str, dict]) -> tuple[tuple[str, ...], tuple[int, ...]]:
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
class PlannedImage:
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
class SplitReport:
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
      more = ", ..." if len(self.skipped) > LISTED else ""
      text += (f"; skipped (zero size or outside their image): {len(self.skipped)} "
               f"(annotations {', '.join(self.skipped[:LISTED])}{more})")
    return text


def _file_name_problem(file_name: str) -> str | None:
  """Why `file_name` cannot name a file inside the images folder, or None if it can."""
  try:
    os.fsencode(file_name)
  except UnicodeError:
    return "file names that the file system cannot encode"
  if not file_name or "\0" in file_name:
    return "empty file names or file names with a NUL character"
  normalized = os.path.normpath(file_name)
  if os.path.isabs(file_name) or normalized == ".." or normalized.startswith(".." + os.sep):
    return "file names that leave the images folder (absolute, or through ..)"
  return None


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


def _object(annotation: dict, box, label: int, width: int, height: int, report: SplitReport,
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


def plan_split(images_dir: str | os.PathLike, coco: dict, category_ids, source: str
               ) -> tuple[list[PlannedImage], SplitReport]:
  """Checks one split (its json and its image files) and plans what to store.

  Args:
    images_dir: the folder that `file_name`s are relative to.
    coco: the split's annotation json (see `load_annotations`).
    category_ids: the category id of each label (see `merge_categories`).
    source: how error messages name the split.

  Raises:
    CocoFolderError: the problems listed in the `coco_folder` module docstring, all at once.
  """
  images_dir = Path(images_dir)
  if not images_dir.is_dir():
    raise CocoFolderError(f"the images folder {images_dir} of {source} is not a folder; nothing was written.")
  if not coco["images"]:
    raise CocoFolderError(f"{source} lists no images; nothing was written.")
  problems = _Problems()
  sizes, entries = {}, []
  for entry in coco["images"]:
    image_id, file_name = entry.get("id"), entry.get("file_name")
    if not (_is_int(image_id) and 0 <= image_id <= _MAX_IMAGE_ID and isinstance(file_name, str)):
      problems.add(f"images without an integer id in [0, {_MAX_IMAGE_ID}] and a file_name", str(entry))
      continue
    if (reason := _file_name_problem(file_name)) is not None:
      problems.add(reason, repr(file_name))
      continue
    if image_id in sizes:
      problems.add("duplicate image ids", str(image_id))
      continue
    width, height = entry.get("width"), entry.get("height")
    declared = (width, height) if _is_int(width) and _is_int(height) else None
    sizes[image_id] = _inspect_image(images_dir / file_name, declared, problems)
    entries.append((image_id, file_name))

  label_of = {category_id: label for label, category_id in enumerate(category_ids)}
  report = SplitReport()
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
    planned.append(PlannedImage(images_dir / file_name, image_id, file_name, width, height, keep_bytes,
                          apply_orientation, tuple(objects[image_id])))
  report.images = len(planned)
  report.negatives = sum(not image.objects for image in planned)
  return planned, report
