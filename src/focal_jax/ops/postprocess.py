"""From head outputs to a fixed number of detections per image.

Per image and per pyramid level: keep the `topk_per_level` highest class
scores (sigmoid of the logits) above `score_threshold`, decode their boxes from
their anchors and clip them to the image; then merge the levels, run
class-aware NMS and keep the best `max_detections`. Every shape is static, so
the whole thing runs inside jit; unused detection slots are marked invalid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from focal_jax._fields import check_field_types
from focal_jax.ops._checks import check_unit_interval
from focal_jax.ops.box_coder import DEFAULT_SCALE_CLIP, DEFAULT_WEIGHTS, decode_boxes
from focal_jax.ops.nms import batched_nms


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
  """Inference thresholds (the paper's and torchvision's defaults)."""

  score_threshold: float = 0.05
  topk_per_level: int = 1000
  iou_threshold: float = 0.5
  max_detections: int = 100

  def __post_init__(self):
    check_field_types(self, "postprocess")
    check_unit_interval("postprocess.score_threshold", self.score_threshold)
    check_unit_interval("postprocess.iou_threshold", self.iou_threshold)
    if self.topk_per_level < 1 or self.max_detections < 1:
      raise ValueError(f"postprocess.topk_per_level and postprocess.max_detections must be positive; got "
                       f"{self.topk_per_level} and {self.max_detections}.")


@flax.struct.dataclass
class Detections:
  """Fixed-size detections: `[..., D, 4]` xyxy boxes, `[..., D]` scores, classes and valid mask.

  Valid detections come first, by decreasing score; invalid slots have
  score 0, class -1 and a zero box.
  """

  boxes: jax.Array
  scores: jax.Array
  classes: jax.Array
  valid: jax.Array


def _top_k_pairs(cls_logits, best_per_anchor, start: int, count: int, k: int):
  """The `k` highest (anchor, class) logits of the level `[start, start + count)`.

  Returns `(logits, anchor, class)` (anchors indexed over all levels), the
  same as `top_k` over the level's flattened `count * K` logits (ties to the
  lower flat index), without scanning all of them: the `k` best pairs lie on
  at most `k` anchors, which are among the `k` anchors of highest
  `best_per_anchor` (each anchor's maximum logit). Those anchors, in index
  order, keep their flat order, and a `top_k` over their `k * K` logits
  finishes the job. Each of those anchors has a pair at or above the `k`-th
  best anchor maximum, so the `k` best pairs all are: the pairs below it can
  be set to -inf first, which spares `top_k` most of its heap updates.
  """
  num_classes = cls_logits.shape[-1]
  if count > k:
    best_maxima, best_anchors = jax.lax.top_k(best_per_anchor[start:start + count], k)
    best_anchors = start + jnp.sort(best_anchors)
    threshold = jnp.min(best_maxima)  # not best_maxima[-1]: XLA would make that top_k a full sort
  else:
    best_anchors = jnp.arange(start, start + count)
    threshold = -jnp.inf
  candidates = cls_logits[best_anchors]
  candidates = jnp.where(candidates < threshold, -jnp.inf, candidates)
  top_logits, flat_index = jax.lax.top_k(candidates.reshape(-1), k)
  return top_logits, best_anchors[flat_index // num_classes], flat_index % num_classes


def _image_detections(cls_logits, box_deltas, anchors, level_counts, image_size, config, box_weights, clip):
  logit_threshold = math.log(config.score_threshold / (1 - config.score_threshold)) if (
      0 < config.score_threshold < 1) else (-math.inf if config.score_threshold == 0 else math.inf)
  best_per_anchor = jnp.max(cls_logits, axis=-1)  # once for all levels: slicing first is slower on CPU
  boxes, scores, classes = [], [], []
  start = 0
  for count in level_counts:
    k = min(config.topk_per_level, count * cls_logits.shape[-1])
    top_logits, anchor_index, level_class = _top_k_pairs(cls_logits, best_per_anchor, start, count, k)
    boxes.append(decode_boxes(box_deltas[anchor_index], anchors[anchor_index], box_weights, clip))
    # NaN: under the threshold, never kept by NMS, whose loop ends when only such scores are left.
    scores.append(jnp.where(top_logits > logit_threshold, jax.nn.sigmoid(top_logits), jnp.nan))
    classes.append(level_class)
    start += count
  height, width = image_size
  boxes = jnp.clip(jnp.concatenate(boxes), 0, jnp.array([width, height, width, height], jnp.float32))
  scores, classes = jnp.concatenate(scores), jnp.concatenate(classes).astype(jnp.int32)

  keep = batched_nms(boxes, scores, classes, iou_threshold=config.iou_threshold,
                     max_outputs=config.max_detections)
  picked = jnp.maximum(keep, 0)
  valid = (keep >= 0) & jnp.isfinite(scores[picked])
  return Detections(
      boxes=jnp.where(valid[:, None], boxes[picked], 0.0),
      scores=jnp.where(valid, scores[picked], 0.0),
      classes=jnp.where(valid, classes[picked], -1),
      valid=valid)


def postprocess(cls_logits, box_deltas, anchors, level_counts: Sequence[int], image_size: Sequence[int],
                config: PostprocessConfig = PostprocessConfig(), *, box_weights=DEFAULT_WEIGHTS,
                clip=DEFAULT_SCALE_CLIP) -> Detections:
  """Turns `[B, A, K]` logits and `[B, A, 4]` deltas into `Detections` of `[B, max_detections]`.

  Args:
    cls_logits: `[B, A, K]` classification logits, in anchor order.
    box_deltas: `[B, A, 4]` box deltas.
    anchors: `[A, 4]` xyxy anchors.
    level_counts: anchors of each level (`focal_jax.ops.anchors.anchors_per_level`).
    image_size: `(height, width)` of the network input; boxes are clipped to it.
    config: thresholds.
    box_weights, clip: box coder parameters.

  Returns:
    `Detections` with boxes in network-input pixels.
  """
  if cls_logits.ndim != 3 or box_deltas.shape != (*cls_logits.shape[:2], 4):
    raise ValueError(f"cls_logits must be [B, A, K] and box_deltas [B, A, 4]; got {cls_logits.shape} "
                     f"and {box_deltas.shape}.")
  if sum(level_counts) != cls_logits.shape[1] or anchors.shape != (cls_logits.shape[1], 4):
    raise ValueError(f"{cls_logits.shape[1]} predictions per image, but {anchors.shape[0]} anchors and "
                     f"level counts summing to {sum(level_counts)}.")
  anchors = jnp.asarray(anchors)
  return jax.vmap(lambda logits, deltas: _image_detections(
      logits.astype(jnp.float32), deltas.astype(jnp.float32), anchors, tuple(level_counts),
      tuple(image_size), config, box_weights, clip))(cls_logits, box_deltas)


def to_original_pixels(boxes, scale, original_size):
  """Maps `[B, D, 4]` network-input boxes to original-image pixels.

  `scale` `[B]` is network pixels per original pixel (the input pipeline's
  resize factor) and `original_size` `[B, 2]` the original `(height, width)`.
  """
  boxes = boxes / scale[:, None, None]
  height, width = original_size[:, 0], original_size[:, 1]
  limits = jnp.stack([width, height, width, height], axis=-1).astype(boxes.dtype)[:, None, :]
  return jnp.clip(boxes, 0, limits)
