"""Box formats, areas and overlaps.

Inside the library boxes are float `[..., 4]` arrays in `(x1, y1, x2, y2)`
absolute pixels. Every function here is pure and jit/vmap/grad friendly.
Degenerate (zero-area) boxes give an IoU of 0, never NaN.
"""

from __future__ import annotations

import jax.numpy as jnp

from focal_jax.ops._checks import check_boxes


def xyxy_to_cxcywh(boxes):
  """`(x1, y1, x2, y2)` -> `(cx, cy, w, h)`."""
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes):
  """`(cx, cy, w, h)` -> `(x1, y1, x2, y2)`."""
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_xywh(boxes):
  """`(x1, y1, x2, y2)` -> COCO's `(x, y, w, h)`."""
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([x1, y1, x2 - x1, y2 - y1], axis=-1)


def xywh_to_xyxy(boxes):
  """COCO's `(x, y, w, h)` -> `(x1, y1, x2, y2)`."""
  x, y, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([x, y, x + w, y + h], axis=-1)


def box_area(boxes):
  """Area of `[..., 4]` xyxy boxes; boxes with x2 < x1 or y2 < y1 have area 0."""
  check_boxes("boxes", boxes)
  widths = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0)
  heights = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)
  return widths * heights


def _safe_divide(numerator, denominator):
  """numerator / denominator where denominator > 0, else 0 (with a finite gradient)."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


def intersection_union(boxes1, boxes2):
  """Intersection and union areas of broadcast-compatible `[..., 4]` xyxy boxes.

  For IoU thresholds that must hold exactly on every backend: `IoU >= t` is
  `intersection >= t * union` (where `union > 0`), with no division. A GPU
  need not round a float32 division correctly (XLA:GPU puts an IoU of
  exactly 40/100 just below 0.4), while a product is rounded correctly
  everywhere.
  """
  top_left = jnp.maximum(boxes1[..., :2], boxes2[..., :2])
  bottom_right = jnp.minimum(boxes1[..., 2:], boxes2[..., 2:])
  size = jnp.maximum(bottom_right - top_left, 0)
  intersection = size[..., 0] * size[..., 1]
  union = box_area(boxes1) + box_area(boxes2) - intersection
  return intersection, union


def _generalized_iou(boxes1, boxes2):
  """GIoU of broadcast-compatible boxes (Rezatofighi et al., 2019)."""
  intersection, union = intersection_union(boxes1, boxes2)
  iou = _safe_divide(intersection, union)
  enclosing_size = jnp.maximum(
      jnp.maximum(boxes1[..., 2:], boxes2[..., 2:]) - jnp.minimum(boxes1[..., :2], boxes2[..., :2]), 0)
  enclosing = enclosing_size[..., 0] * enclosing_size[..., 1]
  return iou - _safe_divide(enclosing - union, enclosing)


def box_iou(boxes1, boxes2):
  """Pairwise IoU of `[N, 4]` and `[M, 4]` xyxy boxes -> `[N, M]`.

  A pair whose union is empty (both boxes degenerate) has IoU 0.
  """
  check_boxes("boxes1", boxes1, rank=2)
  check_boxes("boxes2", boxes2, rank=2)
  intersection, union = intersection_union(boxes1[:, None, :], boxes2[None, :, :])
  return _safe_divide(intersection, union)


def generalized_box_iou(boxes1, boxes2):
  """Pairwise generalized IoU of `[N, 4]` and `[M, 4]` xyxy boxes -> `[N, M]` in [-1, 1]."""
  check_boxes("boxes1", boxes1, rank=2)
  check_boxes("boxes2", boxes2, rank=2)
  return _generalized_iou(boxes1[:, None, :], boxes2[None, :, :])


def elementwise_generalized_box_iou(boxes1, boxes2):
  """GIoU of matching pairs: `[..., 4]` and `[..., 4]` of one shape -> `[...]`."""
  check_boxes("boxes1", boxes1)
  check_boxes("boxes2", boxes2)
  if boxes1.shape != boxes2.shape:
    raise ValueError(f"boxes1 and boxes2 must have one shape; got {boxes1.shape} and {boxes2.shape}.")
  return _generalized_iou(boxes1, boxes2)
