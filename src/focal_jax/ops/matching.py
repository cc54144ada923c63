"""Anchor-to-ground-truth matching: which anchor learns which object.

For one image, with IoU(anchor, gt) over the valid ground truth:
  * IoU >= `foreground_iou` with its best gt: foreground, class of that gt;
  * IoU < `background_iou` with every gt: background (-1);
  * in between: ignored (-2), no loss at all;
  * low-quality matches (`allow_low_quality`): for each gt, the anchors that
    reach that gt's highest IoU become foreground even when below the
    threshold, each keeping its *own* best gt (torchvision and detectron2
    behave so). A gt that overlaps no anchor at all makes no low-quality match
    (an IoU of 0 everywhere would otherwise turn every anchor foreground).

Padded ground-truth slots (`valid == False`) never match; an image without
valid ground truth is all background.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from focal_jax.ops._checks import check_boxes, check_unit_interval
from focal_jax.ops.boxes import box_iou, intersection_union

BACKGROUND = -1
IGNORE = -2


def _iou_at_least(intersection, union, threshold):
  """`intersection / union >= threshold` without dividing; an empty union has IoU 0."""
  return jnp.where(union > 0, intersection >= threshold * union, threshold <= 0)


def match_anchors(anchors, gt_boxes, gt_classes, gt_valid, *, foreground_iou=0.5, background_iou=0.4,
                  allow_low_quality=True):
  """Matches the anchors of one image to its padded ground truth.

  Args:
    anchors: `[A, 4]` xyxy anchors.
    gt_boxes: `[M, 4]` xyxy ground-truth boxes (padded).
    gt_classes: `[M]` int class ids in `0..K-1`.
    gt_valid: `[M]` bool, False for padding (and for crowd boxes).
    foreground_iou: IoU at or above which an anchor is foreground.
    background_iou: IoU below which an anchor is background.
    allow_low_quality: give every gt its best-overlapping anchors.

  Returns:
    `(classes, boxes)`: int32 `[A]` per-anchor class target (`>= 0` class,
    -1 background, -2 ignored) and float `[A, 4]` the box of each anchor's best
    gt (meaningful where the class target is `>= 0`).
  """
  check_boxes("anchors", anchors, rank=2)
  check_boxes("gt_boxes", gt_boxes, rank=2)
  num_gt = gt_boxes.shape[0]
  if gt_classes.shape != (num_gt,) or gt_valid.shape != (num_gt,):
    raise ValueError(f"gt_classes {gt_classes.shape} and gt_valid {gt_valid.shape} must both be "
                     f"[{num_gt}] to go with gt_boxes {gt_boxes.shape}.")
  check_unit_interval("foreground_iou", foreground_iou)
  check_unit_interval("background_iou", background_iou)
  if background_iou > foreground_iou:
    raise ValueError(f"background_iou ({background_iou}) must not exceed foreground_iou ({foreground_iou}).")

  anchors, gt_boxes, gt_classes, gt_valid = map(jnp.asarray, (anchors, gt_boxes, gt_classes, gt_valid))
  num_anchors = anchors.shape[0]
  if num_gt == 0:
    return (jnp.full((num_anchors,), BACKGROUND, jnp.int32),
            jnp.zeros((num_anchors, 4), gt_boxes.dtype))

  # Anchor-major [A, M] so that the per-anchor reductions run along the
  # contiguous axis; padded columns get IoU -1 so that they never win a max.
  # Computed once, then reduced four ways: without the barrier XLA:CPU would
  # recompute the IoU inside each (single-threaded) reduction loop.
  iou = jax.lax.optimization_barrier(jnp.where(gt_valid[None, :], box_iou(anchors, gt_boxes), -1.0))
  best_iou = jnp.max(iou, axis=1)
  # argmax (the first best gt) as a min over indices: plain reductions run
  # several times faster on XLA:CPU than argmax's two-operand one.
  best_gt = jnp.min(jnp.where(iou == best_iou[:, None], jnp.arange(num_gt), num_gt), axis=1)
  # The thresholds are tested on the best gt's areas, not on the IoU quotient,
  # so that an IoU of exactly a threshold is decided the same on every backend.
  has_gt = best_iou >= 0
  matched_boxes = gt_boxes[best_gt]
  intersection, union = intersection_union(anchors, matched_boxes)
  foreground = has_gt & _iou_at_least(intersection, union, foreground_iou)
  if allow_low_quality:
    best_iou_of_gt = jnp.max(iou, axis=0, keepdims=True)
    reaches_best = (iou == best_iou_of_gt) & (best_iou_of_gt > 0) & gt_valid[None, :]
    foreground = foreground | jnp.any(reaches_best, axis=1)

  above_background = has_gt & _iou_at_least(intersection, union, background_iou)
  # The label is looked up in [IGNORE, BACKGROUND, gt classes...] rather than
  # selected: a gather ends the elementwise chain above, so XLA computes it
  # once per anchor. Selects would be cheap enough for XLA:CPU to fuse the
  # whole chain (the boxes' intersection and union included) into every
  # consumer of the labels, recomputed per class in the focal loss's
  # `[B, A, K]` passes (about 5% of the R50 train step).
  choices = jnp.concatenate([jnp.array([IGNORE, BACKGROUND], jnp.int32), gt_classes.astype(jnp.int32)])
  labels = choices[jnp.where(foreground, best_gt + 2, jnp.where(above_background, 0, 1))]
  return labels, matched_boxes


def batch_match_anchors(anchors, gt_boxes, gt_classes, gt_valid, **kwargs):
  """`match_anchors` over a batch: `[B, M, 4]`, `[B, M]`, `[B, M]` -> `[B, A]`, `[B, A, 4]`.

  The anchors `[A, 4]` are shared by all images; keyword arguments are those of
  `match_anchors`.
  """
  check_boxes("gt_boxes", gt_boxes, rank=3)
  return jax.vmap(lambda b, c, v: match_anchors(anchors, b, c, v, **kwargs))(gt_boxes, gt_classes, gt_valid)
