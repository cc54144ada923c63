"""The sigmoid focal loss, box regression losses, and the RetinaNet loss.

Focal loss (Lin et al., 2017, eq. 5), for a logit `x`, `p = sigmoid(x)` and a
target `t` in [0, 1]:

    p_t     = p t + (1 - p)(1 - t)
    alpha_t = alpha t + (1 - alpha)(1 - t)
    FL      = -alpha_t (1 - p_t)**gamma log(p_t)   (soft targets: times the
              binary cross-entropy instead of -log p_t)

`gamma = 0` and no alpha is the sigmoid cross-entropy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from focal_jax.ops._checks import check_boxes
from focal_jax.ops.box_coder import DEFAULT_WEIGHTS, decode_boxes, encode_boxes
from focal_jax.ops.boxes import elementwise_generalized_box_iou
from focal_jax.ops.ohem import ohem_selection

_REDUCTIONS = ("none", "sum", "mean")


def _sum_last_axis(values):
  """`values.sum(-1)` as a product with a vector of ones.

  On XLA:CPU a reduction absorbs the elementwise work that produces its
  input into one single-threaded loop, slower than the same work as a
  parallel elementwise pass (`benchmarks/RESULTS.md` has the figures); a dot
  takes a materialized input. `HIGHEST` keeps float32 sums exact on TPUs and GPUs.
  """
  ones = jnp.ones(values.shape[-1:], values.dtype)
  return jnp.dot(values, ones, precision=jax.lax.Precision.HIGHEST)


def _reduce(values, reduction):
  if reduction == "none":
    return values
  total = jnp.sum(_sum_last_axis(values)) if values.ndim else values
  return total if reduction == "sum" else total / values.size


def _check_reduction(reduction):
  if reduction not in _REDUCTIONS:
    raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}.")


def _power(base, exponent):
  """base ** exponent for base >= 0, taken as 0 where base == 0 (any exponent)."""
  if exponent == 2:
    return base * base
  positive = base > 0
  return jnp.where(positive, jnp.where(positive, base, 1) ** exponent, 0)


def _focal_terms(logits, targets, gamma, exp_neg_abs):
  """`(p, 1 - p, cross-entropy, 1 - p_t)` from `exp(-|x|)`, exact for |x| large.

  No `1 - sigmoid` and no `softplus(x) - x` cancellation: the cross-entropy is
  `max(x, 0) - x t + log(1 + exp(-|x|))` and both sigmoids are built from
  `exp(-|x|)`, the one transcendental besides the log.
  """
  cross_entropy = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(exp_neg_abs)
  if not gamma:
    return None, None, cross_entropy, None
  nonnegative = logits >= 0
  inverse = 1 / (1 + exp_neg_abs)
  sigmoid = jnp.where(nonnegative, 1, exp_neg_abs) * inverse
  sigmoid_of_negative = jnp.where(nonnegative, exp_neg_abs, 1) * inverse
  one_minus_p_t = targets * sigmoid_of_negative + (1 - targets) * sigmoid
  return sigmoid, sigmoid_of_negative, cross_entropy, one_minus_p_t


def _finite(logits):
  """Logits clipped to +-sqrt(the dtype's largest value) (1.8e19 in float32): +-inf give finite results.

  Beyond that bound the sigmoid is 0 or 1 in every float dtype and the loss
  grows linearly; the bound leaves room to sum many such losses.
  """
  bound = float(jnp.finfo(logits.dtype).max) ** 0.5
  return jnp.clip(logits, -bound, bound)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _sigmoid_focal(logits, targets, alpha, gamma):
  logits = _finite(logits)
  _, _, loss, one_minus_p_t = _focal_terms(logits, targets, gamma, jnp.exp(-jnp.abs(logits)))
  if gamma:
    loss = loss * _power(one_minus_p_t, gamma)
  if alpha is not None and alpha >= 0:
    loss = loss * ((1 - alpha) + (2 * alpha - 1) * targets)
  return loss


def _sigmoid_focal_forward(logits, targets, alpha, gamma):
  return _sigmoid_focal(logits, targets, alpha, gamma), (logits, targets)


def _sigmoid_focal_backward(alpha, gamma, residuals, cotangent):
  """The closed-form gradient, one fused pass over the residual logits and targets.

  With `q = 1 - p_t`, `w = alpha_t` and `CE` the cross-entropy:
    dFL/dx = w (gamma q**(gamma-1) (1 - 2t) p (1 - p) CE + q**gamma (p - t))
    dFL/dt = dw/dt q**gamma CE + w (gamma q**(gamma-1) (1 - 2p) CE - q**gamma x)
  `p (1 - p) <= q`, so the first term is computed as `q**gamma * p(1-p)/q`,
  which stays finite for gamma < 1 where `q**(gamma-1)` alone would not.
  """
  logits, targets = residuals
  logits = _finite(logits)
  # exp(-|x|) spelled unlike the forward pass's: were the two merged (XLA's
  # common-subexpression elimination), the forward and backward passes would
  # share materialized intermediates instead of being one fused pass each.
  exp_neg_abs = jnp.exp(jnp.minimum(logits, -logits))
  sigmoid, sigmoid_of_negative, cross_entropy, q = _focal_terms(logits, targets, gamma, exp_neg_abs)
  if gamma:
    modulation = _power(q, gamma)
    if gamma == 2:
      slope = 2 * q
      slope_times_variance = 2 * q * sigmoid * sigmoid_of_negative
    else:
      variance = sigmoid * sigmoid_of_negative
      slope = gamma * _power(q, gamma - 1)
      slope_times_variance = gamma * modulation * jnp.where(q > 0, variance / jnp.where(q > 0, q, 1), 0)
    d_logits = slope_times_variance * (1 - 2 * targets) * cross_entropy + modulation * (sigmoid - targets)
    d_targets = slope * (1 - 2 * sigmoid) * cross_entropy - modulation * logits
  else:
    modulation = 1
    d_logits = jax.nn.sigmoid(logits) - targets
    d_targets = -logits
  if alpha is not None and alpha >= 0:
    weight = (1 - alpha) + (2 * alpha - 1) * targets
    d_targets = weight * d_targets + (2 * alpha - 1) * modulation * cross_entropy
    d_logits = weight * d_logits
  return cotangent * d_logits, cotangent * d_targets


_sigmoid_focal.defvjp(_sigmoid_focal_forward, _sigmoid_focal_backward)


def _static_number(name: str, value) -> float:
  """`value` as a Python float; ValueError for a traced, non-numeric or NaN value."""
  if isinstance(value, jax.core.Tracer):
    raise ValueError(f"{name} must be a static number, not a traced value: it decides how the loss is "
                     f"computed. Pass it as a Python float (close over it, or mark it static in jax.jit).")
  try:
    number = float(value)
  except (TypeError, ValueError):
    number = float("nan")
  if isinstance(value, (bool, str, bytes)) or number != number:
    raise ValueError(f"{name} must be a number; got {value!r}.")
  return number


def focal_loss(logits, targets, *, alpha=0.25, gamma=2.0, reduction="none"):
  """Sigmoid focal loss, with the meaning of `torchvision.ops.sigmoid_focal_loss`.

  Args:
    logits: float array of any shape.
    targets: 0/1 (or soft) floats of the logits' shape.
    alpha: weight of the positive targets in [0, 1]; `None` or a negative value
      turns alpha weighting off.
    gamma: focusing parameter >= 0; `gamma = 0` is sigmoid cross-entropy.
    reduction: "none" (elementwise), "sum" or "mean".

  Returns:
    The loss, elementwise or reduced. Value and gradient are finite for logits
    of any magnitude, +-inf included (logits beyond +-sqrt of the dtype's
    largest value, 1.8e19 in float32, count as that bound); NaN logits give
    NaN. The gradient (with respect to logits and targets) is written in
    closed form: the backward pass is one fused elementwise pass over the
    logits and targets, with no stored intermediates.

  Raises:
    ValueError: shapes differ, `reduction` is unknown, or `gamma`/`alpha` is
      not a concrete number in range (NaN, or traced under jit: they choose
      the computation, so they must be static Python numbers).

  Example:
    >>> loss = focal_loss(jnp.array([2.0, -1.0]), jnp.array([1.0, 0.0]), reduction="sum")
  """
  logits = jnp.asarray(logits)
  targets = jnp.asarray(targets, logits.dtype)
  if logits.shape != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} must have one shape.")
  gamma = _static_number("gamma", gamma)
  if not 0 <= gamma < float("inf"):
    raise ValueError(f"gamma must be a finite number >= 0; got {gamma}.")
  if alpha is not None:
    alpha = _static_number("alpha", alpha)
    if alpha > 1:
      raise ValueError(f"alpha must be at most 1 (negative or None turns it off); got {alpha}.")
  _check_reduction(reduction)
  return _reduce(_sigmoid_focal(logits, targets, alpha, float(gamma)), reduction)


def l1_loss(predictions, targets, *, reduction="none"):
  """|predictions - targets| summed over the last (box) axis."""
  _check_reduction(reduction)
  return _reduce(jnp.sum(jnp.abs(predictions - targets), axis=-1), reduction)


def smooth_l1_loss(predictions, targets, *, beta=1.0 / 9, reduction="none"):
  """Huber-like smooth L1 (Fast R-CNN), summed over the last (box) axis.

  `0.5 d**2 / beta` for `|d| < beta`, else `|d| - 0.5 beta`; `beta = 0` is L1.
  """
  _check_reduction(reduction)
  if beta < 0:
    raise ValueError(f"beta must be >= 0; got {beta}.")
  diff = jnp.abs(predictions - targets)
  if beta == 0:
    per_coordinate = diff
  else:
    per_coordinate = jnp.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
  return _reduce(jnp.sum(per_coordinate, axis=-1), reduction)


def giou_loss(predicted_boxes, target_boxes, *, reduction="none"):
  """1 - GIoU of matching xyxy box pairs `[..., 4]` -> `[...]` in [0, 2]."""
  _check_reduction(reduction)
  return _reduce(1 - elementwise_generalized_box_iou(predicted_boxes, target_boxes), reduction)


BOX_LOSSES = ("l1", "smooth_l1", "giou")
NORMALIZERS = ("batch", "image")
CLASSIFICATION_LOSSES = ("focal", "ohem")


def retinanet_loss(cls_logits, box_deltas, anchors, matched_classes, matched_boxes, *, alpha=0.25,
                   gamma=2.0, box_loss="smooth_l1", smooth_l1_beta=0.1, box_weights=DEFAULT_WEIGHTS,
                   normalizer="batch", classification="focal", ohem_batch_size=256, ohem_positive_fraction=None,
                   ohem_iou_threshold=0.7):
  """The RetinaNet training loss of a batch.

  The classification term is the focal loss summed over all non-ignored anchors
  and classes (`classification="focal"`; `gamma=0` is the alpha-balanced
  cross-entropy); the box term is summed over foreground anchors. Both are
  divided by the number of foreground anchors, at least 1:

  * `normalizer="batch"` (default, detectron2 style): counted over the whole
    batch; under data parallelism on a global array this is the global batch.
  * `normalizer="image"` (torchvision): each image's sums divided by its own
    count, then averaged over images.

  `classification="ohem"` replaces the focal term by the paper's OHEM
  baseline (`focal_jax.ops.ohem`): the plain cross-entropy (no alpha, no
  gamma) of the anchors that `ohem_selection` picks, divided by their number
  (over the batch, or per image with `normalizer="image"`).

  Args:
    cls_logits: `[B, A, K]` classification logits.
    box_deltas: `[B, A, 4]` predicted `(dx, dy, dw, dh)`.
    anchors: `[A, 4]` xyxy anchors.
    matched_classes: `[B, A]` int targets from `match_anchors` (>= 0 class,
      -1 background, -2 ignored).
    matched_boxes: `[B, A, 4]` xyxy matched ground truth.
    alpha, gamma: focal loss parameters.
    box_loss: "l1" or "smooth_l1" on encoded deltas, or "giou" on decoded boxes.
    smooth_l1_beta: beta of the smooth L1 loss.
    box_weights: box coder weights.
    normalizer: "batch" or "image".
    classification: "focal" or "ohem".
    ohem_batch_size, ohem_positive_fraction, ohem_iou_threshold: the OHEM
      minibatch per image, its largest share of positives (None: no ratio)
      and its NMS threshold.

  Returns:
    dict with `loss` (total), `classification_loss`, `box_loss` and
    `num_foreground` (float, over the batch).
  """
  if cls_logits.ndim != 3 or box_deltas.shape != (*cls_logits.shape[:2], 4):
    raise ValueError(f"cls_logits must be [B, A, K] and box_deltas [B, A, 4]; got {cls_logits.shape} "
                     f"and {box_deltas.shape}.")
  check_boxes("anchors", anchors, rank=2)
  if anchors.shape[0] != cls_logits.shape[1]:
    raise ValueError(f"{anchors.shape[0]} anchors for {cls_logits.shape[1]} predictions per image.")
  if matched_classes.shape != cls_logits.shape[:2] or matched_boxes.shape != box_deltas.shape:
    raise ValueError(f"matched_classes {matched_classes.shape} / matched_boxes {matched_boxes.shape} do "
                     f"not fit predictions {cls_logits.shape[:2]}.")
  if box_loss not in BOX_LOSSES:
    raise ValueError(f"box_loss must be one of {BOX_LOSSES}; got {box_loss!r}.")
  if normalizer not in NORMALIZERS:
    raise ValueError(f"normalizer must be one of {NORMALIZERS}; got {normalizer!r}.")
  if classification not in CLASSIFICATION_LOSSES:
    raise ValueError(f"classification must be one of {CLASSIFICATION_LOSSES}; got {classification!r}.")

  cls_logits = cls_logits.astype(jnp.float32)
  box_deltas = box_deltas.astype(jnp.float32)
  num_classes = cls_logits.shape[-1]
  foreground = matched_classes >= 0
  not_ignored = matched_classes != -2

  targets = (matched_classes[..., None] == jnp.arange(num_classes)).astype(jnp.float32)
  if classification == "ohem":
    cls_per_anchor = _sum_last_axis(focal_loss(cls_logits, targets, alpha=None, gamma=0.0))
    selected = ohem_selection(cls_per_anchor, anchors, matched_classes, batch_size=ohem_batch_size,
                              positive_fraction=ohem_positive_fraction, iou_threshold=ohem_iou_threshold)
    cls_per_image = jnp.sum(jnp.where(selected, cls_per_anchor, 0.0), axis=-1)
    cls_count = jnp.sum(selected, axis=-1).astype(jnp.float32)
  else:
    cls_per_anchor = _sum_last_axis(focal_loss(cls_logits, targets, alpha=alpha, gamma=gamma))
    cls_per_image = jnp.sum(jnp.where(not_ignored, cls_per_anchor, 0.0), axis=-1)

  # Non-foreground anchors regress onto themselves: no log(0) from padded boxes.
  safe_boxes = jnp.where(foreground[..., None], matched_boxes, anchors)
  if box_loss == "giou":
    predicted = decode_boxes(box_deltas, anchors, box_weights)
    box_per_anchor = giou_loss(predicted, safe_boxes)
  else:
    target_deltas = encode_boxes(safe_boxes, anchors, box_weights)
    beta = smooth_l1_beta if box_loss == "smooth_l1" else 0.0
    box_per_anchor = smooth_l1_loss(box_deltas, target_deltas, beta=beta)
  box_per_image = jnp.sum(jnp.where(foreground, box_per_anchor, 0.0), axis=-1)

  fg_per_image = jnp.sum(foreground, axis=-1).astype(jnp.float32)
  if classification != "ohem":
    cls_count = fg_per_image
  if normalizer == "batch":
    cls_total = jnp.sum(cls_per_image) / jnp.maximum(jnp.sum(cls_count), 1.0)
    box_total = jnp.sum(box_per_image) / jnp.maximum(jnp.sum(fg_per_image), 1.0)
  else:
    cls_total = jnp.mean(cls_per_image / jnp.maximum(cls_count, 1.0))
    box_total = jnp.mean(box_per_image / jnp.maximum(fg_per_image, 1.0))
  return {
      "loss": cls_total + box_total,
      "classification_loss": cls_total,
      "box_loss": box_total,
      "num_foreground": jnp.sum(fg_per_image),
  }
