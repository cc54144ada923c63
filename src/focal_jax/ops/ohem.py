"""Online hard example mining (OHEM) for the classification loss, as the focal loss paper runs it.

The paper's baseline against the focal loss (Lin et al., 2017, sec. 5.1,
after Shrivastava et al., 2016): every non-ignored anchor of an image is scored
by its loss, NMS at IoU 0.7 on the anchors' boxes with the loss as the score
removes near-duplicates, and the minibatch is the `batch_size` highest-loss
survivors; the SSD variant keeps at most one positive per three negatives
(`positive_fraction=0.25`). The classification loss is then the plain
cross-entropy over the selected anchors, divided by their number.

Static shapes throughout: the selection is a `[B, A]` mask. With a
positive fraction the survivors are taken from the `2 * batch_size`
highest-loss ones (enough whenever at most `batch_size` positives survive,
as with RetinaNet's few foreground anchors per image).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from focal_jax.ops._checks import check_boxes, check_unit_interval
from focal_jax.ops.nms import nms


def _image_selection(losses, anchors, positive, candidate, batch_size, positive_fraction, iou_threshold):
  """The `[A]` mask of one image's OHEM minibatch."""
  num_anchors = losses.shape[0]
  pool = batch_size if positive_fraction is None else min(2 * batch_size, num_anchors)
  # NaN scores are never kept by `nms`: ignored anchors take no part.
  order = nms(anchors, jnp.where(candidate, losses, jnp.nan), iou_threshold=iou_threshold, max_outputs=pool)
  survived = order >= 0
  index = jnp.maximum(order, 0)
  if positive_fraction is None:
    chosen = survived
  else:
    is_positive = survived & positive[index]
    is_negative = survived & ~positive[index]
    max_positives = int(positive_fraction * batch_size)
    positives = is_positive & (jnp.cumsum(is_positive) <= max_positives)
    taken_positives = jnp.sum(positives)
    negatives = is_negative & (jnp.cumsum(is_negative) <= batch_size - taken_positives)
    chosen = positives | negatives
  return jnp.zeros(num_anchors, bool).at[jnp.where(chosen, index, num_anchors)].set(True, mode="drop")


def ohem_selection(losses, anchors, matched_classes, *, batch_size, positive_fraction=None, iou_threshold=0.7):
  """Which anchors each image's OHEM minibatch holds.

  Args:
    losses: `[B, A]` per-anchor losses that rank the anchors (not differentiated).
    anchors: `[A, 4]` xyxy anchor boxes (the boxes NMS compares).
    matched_classes: `[B, A]` from `match_anchors` (>= 0 foreground, -1
      background, -2 ignored: never selected).
    batch_size: anchors per image in the minibatch (fewer where fewer survive).
    positive_fraction: None (no ratio) or the largest share of positives,
      e.g. 0.25 for at most 1:3 positives to negatives.
    iou_threshold: NMS threshold (0.7 in the paper).

  Returns:
    bool `[B, A]`: True for the selected anchors.
  """
  check_boxes("anchors", anchors, rank=2)
  if losses.ndim != 2 or losses.shape != matched_classes.shape or losses.shape[1] != anchors.shape[0]:
    raise ValueError(f"losses {losses.shape} and matched_classes {matched_classes.shape} must be [B, A] for "
                     f"{anchors.shape[0]} anchors.")
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= anchors.shape[0]:
    raise ValueError(f"the OHEM batch size must be a whole number in 1..{anchors.shape[0]} (the anchors of an "
                     f"image); got {batch_size!r}.")
  if positive_fraction is not None:
    check_unit_interval("positive_fraction", positive_fraction)
  check_unit_interval("iou_threshold", iou_threshold)
  losses = jax.lax.stop_gradient(losses)
  return jax.vmap(lambda l, m: _image_selection(l, anchors, m >= 0, m != -2, batch_size, positive_fraction,
                                                iou_threshold))(losses, matched_classes)
