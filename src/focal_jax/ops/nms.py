"""Greedy non-maximum suppression with static output shapes.

The loop picks the highest-scoring box still available, keeps it, and removes
every available box whose IoU with it exceeds `iou_threshold`; it stops after
`max_outputs` picks or when nothing is left. This is exactly the greedy NMS of
`torchvision.ops.nms` truncated to `max_outputs` (ties in score are taken in
index order). It is computed a tile of boxes at a time (see `_greedy_nms`), so
it needs a few rounds instead of one per pick and never an `[N, N]` IoU matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from focal_jax.ops._checks import check_boxes, check_unit_interval
from focal_jax.ops.boxes import intersection_union


def _check_nms_args(boxes, scores, iou_threshold, max_outputs):
  check_boxes("boxes", boxes, rank=2)
  if scores.shape != boxes.shape[:1]:
    raise ValueError(f"scores must be [{boxes.shape[0]}] to go with boxes {boxes.shape}; got {scores.shape}.")
  check_unit_interval("iou_threshold", iou_threshold)
  if not isinstance(max_outputs, int) or max_outputs < 1:
    raise ValueError(f"max_outputs must be a positive int; got {max_outputs!r}.")


TILE_SIZE = 256


def _greedy_nms(boxes, scores, classes, iou_threshold, max_outputs):
  """Greedy NMS, decided a tile of `TILE_SIZE` boxes at a time.

  Each round takes the next tile in score order (`top_k` over the boxes not
  yet examined; ties to the lower index), drops its boxes that overlap a box
  kept in an earlier round, and settles the greedy decisions inside the tile
  by iterating `keep[j] = no kept i < j overlaps j` to its fixed point (box
  `j` is final once every box before it is, so this ends in at most
  `TILE_SIZE` steps, usually 2-3). A box is suppressed only by kept boxes,
  so checking each tile against the kept boxes (at most `max_outputs`) and
  itself gives exactly the one-box-at-a-time result in a few rounds.
  """
  boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
  if not jnp.issubdtype(scores.dtype, jnp.floating):
    scores = scores.astype(jnp.float32)
  classes = None if classes is None else jnp.asarray(classes)
  num_boxes = boxes.shape[0]
  kept = jnp.full((max_outputs,), -1, jnp.int32)
  if num_boxes == 0:
    return kept
  tile = min(num_boxes, TILE_SIZE)

  def overlapping(rows, cols):
    """[len(rows), len(cols)]: IoU above the threshold (and, for batched NMS, the same class)."""
    # IoU > t without dividing (see `intersection_union`); an empty union has an empty intersection.
    intersection, union = intersection_union(boxes[rows][:, None, :], boxes[cols][None, :, :])
    over = intersection > iou_threshold * union
    return over if classes is None else over & (classes[rows][:, None] == classes[cols][None, :])

  def settle(candidate, suppresses):
    """Greedy decisions in order: `candidate[j] & ~any(kept[i] & suppresses[i, j], i < j)`."""
    def step(carry):
      keep, _ = carry
      new = candidate & ~jnp.any(suppresses & keep[:, None], axis=0)
      return new, jnp.any(new != keep)

    keep, _ = jax.lax.while_loop(lambda carry: carry[1], step, (candidate, jnp.bool_(True)))
    return keep

  def keep_going(carry):
    count, _, rank_key = carry
    return (count < max_outputs) & jnp.any(rank_key > -jnp.inf)

  def next_tile(carry):
    count, kept, rank_key = carry
    _, members = jax.lax.top_k(rank_key, tile)
    candidate = rank_key[members] > -jnp.inf
    earlier = kept >= 0
    candidate &= ~jnp.any(overlapping(jnp.maximum(kept, 0), members) & earlier[:, None], axis=0)
    order = jnp.arange(tile)
    suppresses = overlapping(members, members) & (order[:, None] < order[None, :])
    keep = settle(candidate, suppresses)
    slots = jnp.where(keep, count + jnp.cumsum(keep) - 1, max_outputs)
    kept = kept.at[slots].set(members, mode="drop")
    count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), max_outputs)
    return count, kept, rank_key.at[members].set(-jnp.inf)

  # Examined boxes and NaN scores rank -inf; a score of -inf ranks with the lowest finite float.
  lowest = jnp.finfo(scores.dtype).min
  rank_key = jnp.where(jnp.isnan(scores), -jnp.inf, jnp.maximum(scores, lowest))
  _, kept, _ = jax.lax.while_loop(keep_going, next_tile, (jnp.int32(0), kept, rank_key))
  return kept


def nms(boxes, scores, *, iou_threshold, max_outputs):
  """Greedy NMS of `[N, 4]` xyxy boxes with `[N]` scores.

  Returns:
    int32 `[max_outputs]` indices into the input, highest score first, padded
    with -1. Boxes with a NaN score are never kept; a score of -inf ranks as
    the lowest finite float (tied with it, so taken in index order).
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
