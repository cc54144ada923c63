"""RetinaNet anchors: 9 per location on every pyramid level (levels 3-7 by default).

Anchors are one `[A_total, 4]` xyxy array: levels concatenated from `min_level`
to `max_level`, each level in `(y, x, anchor)` order, and at each location the
anchors ordered ratio-major then scale, where ratio = height / width (the order
of torchvision's `AnchorGenerator`). An anchor of size `s` and ratio `r` has
width `s / sqrt(r)` and height `s * sqrt(r)`, so its area is `s**2`.

Level `l` has a feature map of `ceil(H / 2**l) x ceil(W / 2**l)` locations (what
stride-2 convolutions with "same" padding produce); location `(i, j)` is centred
at `((j + offset) * stride, (i + offset) * stride)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from focal_jax._fields import check_field_types


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
  """Where the anchors are and what shapes they have.

  Attributes:
    min_level: finest pyramid level (stride 2**min_level).
    max_level: coarsest pyramid level.
    sizes: base anchor size (side of the square anchor, in pixels) per level.
    scales: multipliers of the base size at each location.
    aspect_ratios: height / width ratios at each location.
    offset: anchor centre within its cell, in cells: 0.0 puts it on the cell's
      top-left corner (torchvision, detectron2), 0.5 on the cell centre (TF
      Model Garden).
    truncate_sizes: truncate each `size * scale` to an integer (torchvision).
    round_base_anchors: round the anchor corners around the origin to integers
      before shifting them (torchvision).
    stride_from_feature_size: use `image_size // feature_size` as a level's
      stride instead of `2**level` (torchvision; the two agree when the image
      size is a multiple of the level's stride).
  """

  min_level: int = 3
  max_level: int = 7
  sizes: Sequence[float] = (32.0, 64.0, 128.0, 256.0, 512.0)
  scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  offset: float = 0.0
  truncate_sizes: bool = False
  round_base_anchors: bool = False
  stride_from_feature_size: bool = False

  def __post_init__(self):
    check_field_types(self, "anchors")
    for name in ("sizes", "scales", "aspect_ratios"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    if not 0 <= self.min_level <= self.max_level:
      raise ValueError(f"anchors: need 0 <= min_level <= max_level; got {self.min_level}, {self.max_level}.")
    if len(self.sizes) != self.num_levels:
      raise ValueError(
          f"anchors.sizes must give one size per level ({self.num_levels} levels); got {len(self.sizes)}.")
    for name in ("sizes", "scales", "aspect_ratios"):
      values = getattr(self, name)
      if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"anchors.{name} must be non-empty, finite and positive; got {values}.")
    if not 0.0 <= self.offset < 1.0:
      raise ValueError(f"anchors.offset must be in [0, 1); got {self.offset}.")

  @classmethod
  def torchvision(cls) -> AnchorConfig:
    """The anchors of torchvision's `retinanet_resnet50_fpn`, corner for corner."""
    return cls(truncate_sizes=True, round_base_anchors=True, stride_from_feature_size=True)

  @property
  def levels(self) -> range:
    return range(self.min_level, self.max_level + 1)

  @property
  def num_levels(self) -> int:
    return self.max_level - self.min_level + 1

  @property
  def anchors_per_location(self) -> int:
    return len(self.scales) * len(self.aspect_ratios)


def feature_sizes(image_size: Sequence[int], config: AnchorConfig) -> list[tuple[int, int]]:
  """`(height, width)` of each level's feature map for an input of `image_size`."""
  height, width = _check_image_size(image_size)
  sizes = []
  for level in range(config.max_level + 1):
    if level >= config.min_level:
      sizes.append((height, width))
    height, width = -(-height // 2), -(-width // 2)
  return sizes


def anchors_per_level(image_size: Sequence[int], config: AnchorConfig) -> list[int]:
  """Number of anchors of each level, in the order of `generate_anchors`."""
  return [rows * cols * config.anchors_per_location for rows, cols in feature_sizes(image_size, config)]


def _check_image_size(image_size):
  if len(image_size) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in image_size):
    raise ValueError(f"image_size must be (height, width) of positive integers; got {image_size!r}.")
  return int(image_size[0]), int(image_size[1])


def _base_anchors(size: float, config: AnchorConfig) -> np.ndarray:
  """`[A, 4]` anchors centred on the origin, ratio-major then scale."""
  scales = np.asarray([size * s for s in config.scales], np.float64)
  if config.truncate_sizes:
    scales = np.trunc(scales)
  ratios = np.asarray(config.aspect_ratios, np.float64)
  heights = (np.sqrt(ratios)[:, None] * scales[None, :]).reshape(-1)
  widths = ((1 / np.sqrt(ratios))[:, None] * scales[None, :]).reshape(-1)
  base = np.stack([-widths, -heights, widths, heights], axis=-1) / 2
  return np.round(base) if config.round_base_anchors else base


def generate_anchors(image_size: Sequence[int], config: AnchorConfig = AnchorConfig()) -> np.ndarray:
  """All anchors of an `(height, width)` network input.

  Returns:
    float32 `[A_total, 4]` xyxy anchors in input pixels, where
    `A_total = sum over levels of H_l * W_l * anchors_per_location`
    (49,104 for 512x512 and 76,725 for 640x640 with the defaults). Computed
    once on the host with NumPy: image sizes are static.
  """
  height, width = _check_image_size(image_size)
  per_level = []
  for level, size, (rows, cols) in zip(config.levels, config.sizes, feature_sizes(image_size, config)):
    if config.stride_from_feature_size:
      stride_y, stride_x = height // rows, width // cols
    else:
      stride_y = stride_x = 2 ** level
    ys = (np.arange(rows, dtype=np.float64) + config.offset) * stride_y
    xs = (np.arange(cols, dtype=np.float64) + config.offset) * stride_x
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    shifts = np.stack([grid_x, grid_y, grid_x, grid_y], axis=-1).reshape(-1, 1, 4)
    per_level.append((shifts + _base_anchors(size, config)[None]).reshape(-1, 4))
  return np.concatenate(per_level).astype(np.float32)
