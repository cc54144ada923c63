"""Input configuration and label maps (plain data; no TensorFlow import here)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

from focal_jax._fields import check_field_types

# The 80 COCO 2017 detection categories in the order of their category ids, which
# is also the order of the TFDS `coco/2017` `objects/label` values 0..79.
COCO_2017_CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
    "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup",
    "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
# Real COCO category ids (1..90 with gaps) of the 80 classes above.
COCO_2017_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
    23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
    46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
    65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88,
    89, 90,
)

SYNTHETIC_SHAPES_CLASS_NAMES = ("rectangle", "ellipse", "triangle", "cross")

# Per-channel mean and standard deviation of ImageNet in 0..255 RGB pixels: the
# input pipelines feed `(pixels - mean) / std`, as the ImageNet-pretrained
# backbones expect; drawing a network input undoes it.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class LabelMap:
  """Dataset labels -> contiguous model classes 0..K-1 -> category ids for COCO json.

  Attributes:
    names: name of each contiguous class (K entries).
    label_to_class: for each TFDS `objects/label` value, its contiguous class,
      or -1 for labels that are never targets (dropped by the pipeline).
    category_ids: for each contiguous class, its category id in COCO json.
  """

  names: tuple[str, ...]
  label_to_class: tuple[int, ...]
  category_ids: tuple[int, ...]

  def __post_init__(self):
    check_field_types(self, "data.label_map")
    k = len(self.names)
    if not k:
      raise ValueError("data.label_map must name at least one class.")
    if len(self.category_ids) != k:
      raise ValueError(f"{k} names but {len(self.category_ids)} category ids")
    if any(not -1 <= c < k for c in self.label_to_class):
      raise ValueError(f"label_to_class values must lie in [-1, {k})")

  @property
  def num_classes(self) -> int:
    return len(self.names)

  def coco_categories(self) -> list[dict]:
    """The `categories` list of a COCO json."""
    return [{"id": int(i), "name": n, "supercategory": "none"}
            for i, n in zip(self.category_ids, self.names)]


COCO_2017_LABEL_MAP = LabelMap(
    names=COCO_2017_CLASS_NAMES,
    label_to_class=tuple(range(80)),
    category_ids=COCO_2017_CATEGORY_IDS,
)
# synthetic_shapes keeps the 80-way `ClassLabel` of coco/2017; only labels 0..3 occur.
SYNTHETIC_SHAPES_LABEL_MAP = LabelMap(
    names=SYNTHETIC_SHAPES_CLASS_NAMES,
    label_to_class=(0, 1, 2, 3) + (-1,) * 76,
    category_ids=(1, 2, 3, 4),
)


# A dataset written by `python -m focal_jax.data.coco_folder` is the TFDS folder
# `<data_dir>/<name>/<FOLDER_DATASET_VERSION>/` with this file in it:
# {"names": [...], "category_ids": [...]}, one entry per TFDS label, in label order.
LABEL_MAP_FILE = "label_map.json"
FOLDER_DATASET_VERSION = "1.0.0"


def dataset_base_name(dataset: str) -> str:
  """The dataset name without config and version: "coco/2017:1.1.0" -> "coco"."""
  return dataset.split("/")[0].split(":")[0]


def default_data_dir() -> str:
  """TFDS's default data dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets"))


def folder_dataset_dir(dataset: str, data_dir: str | None = None) -> str:
  """Where `coco_folder` writes (and the pipelines find) the folder dataset `dataset`."""
  root = os.path.expanduser(data_dir or default_data_dir())
  return os.path.join(root, dataset_base_name(dataset), FOLDER_DATASET_VERSION)


@functools.cache
def _read_label_map(path: str) -> LabelMap:
  """Reads a label map file (local or gs://); raises FileNotFoundError (not cached) if there is none."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  file = epath.Path(path)
  if not file.exists():
    raise FileNotFoundError(path)
  contents = json.loads(file.read_text())
  names, category_ids = tuple(contents["names"]), tuple(int(i) for i in contents["category_ids"])
  return LabelMap(names=names, label_to_class=tuple(range(len(names))), category_ids=category_ids)


def folder_label_map(dataset: str, data_dir: str | None = None) -> LabelMap | None:
  """The label map stored with a folder dataset (read once, then cached); None if there is none."""
  try:
    return _read_label_map(os.path.join(folder_dataset_dir(dataset, data_dir), LABEL_MAP_FILE))
  except FileNotFoundError:
    return None


def label_map_for(dataset: str, data_dir: str | None = None) -> LabelMap:
  """The label map of a dataset: "coco/2017", "synthetic_shapes/tiny", or a folder dataset.

  A folder dataset (prepared by `python -m focal_jax.data.coco_folder`) keeps
  its label map in `<data_dir>/<name>/1.0.0/label_map.json`: TFDS label `k` is
  model class `k`, named after its COCO category and carrying its category id.

  Raises:
    ValueError: `dataset` is none of these (the message says how to prepare it).
  """
  base = dataset_base_name(dataset)
  if base == "coco":
    return COCO_2017_LABEL_MAP
  if base == "synthetic_shapes":
    return SYNTHETIC_SHAPES_LABEL_MAP
  label_map = folder_label_map(dataset, data_dir)
  if label_map is None:
    raise ValueError(
        f"no label map for dataset {dataset!r}: it is not coco/2017 or synthetic_shapes, and "
        f"{os.path.join(folder_dataset_dir(dataset, data_dir), LABEL_MAP_FILE)} does not exist. "
        f"Prepare a COCO-format dataset with `python -m focal_jax.data.coco_folder --name {base} ...`, "
        f"pass the data dir that holds it, or pass InputConfig(label_map=...).")
  return label_map


@dataclasses.dataclass(frozen=True)
class InputConfig:
  """Everything the train and eval input pipelines depend on.

  Resize modes (both pad to a fixed `padded_size`, a multiple of `size_divisibility`):
  - "square" (TF Model Garden): scale the image so that its long side is
    `image_size * r` with `r ~ U(scale_range)` (training; r = 1 at eval), then
    take a random `image_size` x `image_size` crop (when larger) and pad to
    `image_size` (rounded up). `scale_range=(0.1, 2.0)` is large-scale jitter,
    `(0.8, 1.25)` a mild one, `(1.0, 1.0)` none.
  - "short_side" (detectron2 ResizeShortestEdge): short side = a uniform choice
    of `short_side_choices` (training) or `eval_short_side`, long side at most
    `max_size`; no crop; pad to `max_size` rounded up, in both dimensions.
  """

  dataset: str = "coco/2017"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "validation"
  label_map: LabelMap | None = None  # None: label_map_for(dataset, data_dir)

  resize: str = "square"  # "square" | "short_side"
  image_size: int = 640
  scale_range: tuple[float, float] = (0.1, 2.0)
  short_side_choices: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
  eval_short_side: int = 800
  max_size: int = 1333
  size_divisibility: int = 128
  flip_prob: float = 0.5  # left-right flip
  vertical_flip_prob: float = 0.0  # top-bottom flip: for data without an up (aerial, microscopy, shapes)
  transpose_prob: float = 0.0  # swap of the axes; at 0.5 with both flips, all 8 right-angle turns and mirrorings

  max_boxes: int = 100
  batch_size: int = 8  # what a pipeline yields; in an experiment, the global batch (see TrainConfig)
  eval_batch_size: int | None = None  # the same for evaluation; None: batch_size
  seed: int = 0
  shuffle_buffer: int = 1024
  num_parallel_calls: int = -1  # -1: one per CPU core (tf.data autotuning is off)
  prefetch: int = 2  # batches
  # Linux: the training pipeline's threads run this much nicer than the process (0 to 19), so
  # that where they share CPU cores with the train step, as on a CPU, the step's threads come first.
  train_nice: int = 10
  auto_prepare: bool = True  # build synthetic_shapes on first use (never downloads)

  def __post_init__(self):
    check_field_types(self, "data")
    if self.resize not in ("square", "short_side"):
      raise ValueError(f"data.resize must be 'square' or 'short_side'; got {self.resize!r}.")
    lo, hi = self.scale_range
    if not 0 < lo <= hi:
      raise ValueError(f"data.scale_range must be (low, high) with 0 < low <= high; got {self.scale_range}.")
    positive = ["image_size", "eval_short_side", "max_size", "size_divisibility", "max_boxes", "batch_size",
                "shuffle_buffer"]
    if self.eval_batch_size is not None:
      positive.append("eval_batch_size")
    for name in positive:
      if getattr(self, name) < 1:
        raise ValueError(f"data.{name} must be positive; got {getattr(self, name)}.")
    if not self.short_side_choices or min(self.short_side_choices) < 1:
      raise ValueError(f"data.short_side_choices must be positive sizes; got {self.short_side_choices}.")
    for name in ("flip_prob", "vertical_flip_prob", "transpose_prob"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"data.{name} is a probability, in [0, 1]; got {getattr(self, name)}.")
    if self.prefetch < 0:
      raise ValueError(f"data.prefetch must be >= 0 batches; got {self.prefetch}.")
    if not 0 <= self.train_nice <= 19:
      raise ValueError(f"data.train_nice must be a nice increment from 0 to 19; got {self.train_nice}.")
    if self.num_parallel_calls == 0 or self.num_parallel_calls < -1:
      raise ValueError(f"data.num_parallel_calls must be positive or -1 (one per CPU core); "
                       f"got {self.num_parallel_calls}.")
    for name in ("dataset", "train_split", "eval_split"):
      if not getattr(self, name).strip():
        raise ValueError(f"data.{name} must not be empty.")

  @property
  def labels(self) -> LabelMap:
    return self.label_map if self.label_map is not None else label_map_for(self.dataset, self.data_dir)

  @property
  def num_classes(self) -> int:
    return self.labels.num_classes

  @property
  def padded_size(self) -> tuple[int, int]:
    """(height, width) of every image the pipelines emit."""
    side = self.image_size if self.resize == "square" else self.max_size
    d = self.size_divisibility
    side = int(math.ceil(side / d) * d)
    return side, side

  @property
  def per_process_eval_batch_size(self) -> int:
    return self.eval_batch_size or self.batch_size


def coco_lsj_config(image_size: int = 640, **overrides) -> InputConfig:
  """COCO with large-scale jitter to a square `image_size` (TF Model Garden RetinaNet)."""
  return InputConfig(**{"dataset": "coco/2017", "resize": "square", "image_size": image_size,
                        "scale_range": (0.1, 2.0), **overrides})


def coco_detectron2_config(**overrides) -> InputConfig:
  """COCO resized as detectron2's RetinaNet 1x: short side 640-800 (eval 800), long <= 1333."""
  return InputConfig(**{"dataset": "coco/2017", "resize": "short_side",
                        "short_side_choices": (640, 672, 704, 736, 768, 800),
                        "eval_short_side": 800, "max_size": 1333, **overrides})


def synthetic_shapes_config(**overrides) -> InputConfig:
  """synthetic_shapes at its native 128x128 (no scale jitter, flips only)."""
  return InputConfig(**{"dataset": "synthetic_shapes", "resize": "square", "image_size": 128,
                        "scale_range": (1.0, 1.0), "batch_size": 16, "shuffle_buffer": 8192,
                        **overrides})
