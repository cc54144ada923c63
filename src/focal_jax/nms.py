"""Greedy non-maximum suppression with static output shapes.

The loop picks the highest-scoring box still available, keeps it, and removes
every available box whose IoU with it exceeds `iou_threshold`; it stops after
`max_outputs` picks or when nothing is left. This is exactly the greedy NMS of
`torchvision.ops.nms` truncated to `max_outputs` (ties in score are taken in
index order), at a cost of `O(max_outputs * N)` with no `[N, N]` IoU matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from focal_jax._checks import check_boxes, check_unit_interval
from focal_jax.boxes import box_iou


def _check_nms_args(boxes, scores, iou_threshold, max_outputs):
  check_boxes("boxes", boxes, rank=2)
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f"scores must be [{boxes.shape[0]}] to go with boxes {boxes.shape}; got {scores.shape}.")
  check_unit_interval("iou_threshold", iou_threshold)
  if not isinstance(max_outputs, int) or max_outputs < 1:
    raise ValueError(f"max_outputs must be a positive int; got {max_outputs!r}.")


def _greedy_nms(boxes, scores, classes, iou_threshold, max_outputs):
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  classes = None if classes is None else jnp.asarray(classes)
  kept = jnp.full((max_outputs,), -1, jnp.int32)
  if boxes.shape[0] == 0:
    return kept

  def keep_going(carry):
    count, _, available = carry
    return (count < max_outputs) & jnp.any(available)

  def pick_next(carry):
    count, kept, available = carry
    best = jnp.argmax(jnp.where(available, scores, -jnp.inf)).astype(jnp.int32)
    # Among equal maxima argmax returns the lowest index; a box whose score is
    # -inf is still picked once nothing better is available.
    best = jnp.where(available[best], best, jnp.argmax(available).astype(jnp.int32))
    overlaps = box_iou(boxes[best][None], boxes)[0] > iou_threshold
    if classes is not None:
      overlaps = overlaps & (classes == classes[best])
    available = available & ~overlaps
    available = available.at[best].set(False)
    return count + 1, kept.at[count].set(best), available

  available = ~jnp.isnan(scores)
  _, kept, _ = jax.lax.while_loop(keep_going, pick_next, (jnp.int32(0), kept, available))
  return kept


def nms(boxes, scores, *, iou_threshold, max_outputs):
  """Greedy NMS of `[N, 4]` xyxy boxes with `[N]` scores.

  Returns:
    int32 `[max_outputs]` indices into the input, highest score first, padded
    with -1. Boxes with a NaN score are never kept.
  """
  _check_nms_args(boxes, scores, iou_threshold, max_outputs)
  return _greedy_nms(boxes, scores, None, iou_threshold, max_outputs)


def batched_nms(boxes, scores, classes, *, iou_threshold, max_outputs):
  """Class-aware greedy NMS: boxes of different `[N]` classes never suppress each other.

  Returns the same as `nms`: int32 `[max_outputs]` indices, padded with -1.
  """
  _check_nms_args(boxes, scores, iou_threshold, max_outputs)
  if classes.shape != scores.shape:
    raise ValueError(f"classes must be [{scores.shape[0]}]; got {classes.shape}.")
  return _greedy_nms(boxes, scores, classes, iou_threshold, max_outputs)
