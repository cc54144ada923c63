"""The R-CNN box parameterization (Girshick et al.), as RetinaNet uses it.

With anchor centre `(xa, ya)` and size `(wa, ha)`, a box of centre `(x, y)` and
size `(w, h)` is encoded as

    dx = wx (x - xa) / wa,  dy = wy (y - ya) / ha,
    dw = ww log(w / wa),    dh = wh log(h / ha).

`decode_boxes(encode_boxes(b, a), a) == b` for boxes of positive size (up to
float rounding) as long as `|dw|, |dh|` stay under the clip.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from focal_jax.ops._checks import check_boxes

DEFAULT_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
DEFAULT_SCALE_CLIP = math.log(1000.0 / 16)


def _centers_and_sizes(boxes):
  widths = boxes[..., 2] - boxes[..., 0]
  heights = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def _check_pair(boxes, anchors, boxes_name):
  check_boxes(boxes_name, boxes)
  check_boxes("anchors", anchors)
  try:
    jnp.broadcast_shapes(boxes.shape, anchors.shape)
  except ValueError:
    raise ValueError(
        f"{boxes_name} {boxes.shape} and anchors {anchors.shape} do not broadcast together.") from None


def encode_boxes(boxes, anchors, weights=DEFAULT_WEIGHTS):
  """Encodes xyxy `boxes` relative to xyxy `anchors` as `(dx, dy, dw, dh)`.

  Args:
    boxes: `[..., 4]` target boxes of positive width and height.
    anchors: `[..., 4]` anchors, broadcast against `boxes`.
    weights: `(wx, wy, ww, wh)` multipliers of the four deltas.

  Returns:
    `[..., 4]` deltas.
  """
  _check_pair(boxes, anchors, "boxes")
  wx, wy, ww, wh = weights
  x, y, w, h = _centers_and_sizes(boxes)
  xa, ya, wa, ha = _centers_and_sizes(anchors)
  return jnp.stack(
      [wx * (x - xa) / wa, wy * (y - ya) / ha, ww * jnp.log(w / wa), wh * jnp.log(h / ha)], axis=-1)


def decode_boxes(deltas, anchors, weights=DEFAULT_WEIGHTS, clip=DEFAULT_SCALE_CLIP):
  """Inverse of `encode_boxes`: `(dx, dy, dw, dh)` deltas -> xyxy boxes.

  `dw / ww` and `dh / wh` are clipped from above at `clip` (log(1000 / 16) by
  default) so that an untrained head cannot produce overflowing boxes.
  """
  _check_pair(deltas, anchors, "deltas")
  wx, wy, ww, wh = weights
  xa, ya, wa, ha = _centers_and_sizes(anchors)
  dw = jnp.minimum(deltas[..., 2] / ww, clip)
  dh = jnp.minimum(deltas[..., 3] / wh, clip)
  x = deltas[..., 0] / wx * wa + xa
  y = deltas[..., 1] / wy * ha + ya
  half_w = 0.5 * jnp.exp(dw) * wa
  half_h = 0.5 * jnp.exp(dh) * ha
  return jnp.stack([x - half_w, y - half_h, x + half_w, y + half_h], axis=-1)
