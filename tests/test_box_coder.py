import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax import decode_boxes, encode_boxes


def _encode_reference(boxes, anchors, weights):
  """R-CNN parameterization in float64 (Girshick et al.)."""
  wx, wy, ww, wh = weights
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  ax, ay = anchors[:, 0] + aw / 2, anchors[:, 1] + ah / 2
  bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  bx, by = boxes[:, 0] + bw / 2, boxes[:, 1] + bh / 2
  return np.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * np.log(bw / aw), wh * np.log(bh / ah)], 1)


def _boxes(rng, n):
  xy = rng.uniform(0, 500, (n, 2))
  return np.concatenate([xy, xy + rng.uniform(4, 300, (n, 2))], axis=1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_matches_reference_and_round_trips(weights):
  rng = np.random.default_rng(1)
  boxes, anchors = _boxes(rng, 50), _boxes(rng, 50)
  deltas = jax.jit(encode_boxes, static_argnums=2)(jnp.float32(boxes), jnp.float32(anchors), weights)
  np.testing.assert_allclose(deltas, _encode_reference(boxes, anchors, weights), rtol=1e-4, atol=1e-4)
  decoded = decode_boxes(deltas, jnp.float32(anchors), weights)
  np.testing.assert_allclose(decoded, boxes, rtol=1e-5, atol=1e-3)


def test_hand_worked_decode():
  anchor = jnp.array([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size 10 x 20
  deltas = jnp.array([[0.5, -0.25, math.log(2.0), 0.0]])
  # centre (5 + 5, 10 - 5) = (10, 5), size 20 x 20
  np.testing.assert_allclose(decode_boxes(deltas, anchor), [[0.0, -5.0, 20.0, 15.0]], atol=1e-5)


def test_decode_clips_scale():
  anchor = jnp.array([[0.0, 0.0, 16.0, 16.0]])
  boxes = decode_boxes(jnp.array([[0.0, 0.0, 100.0, 100.0]]), anchor)
  # width = 16 * exp(log(1000 / 16)) = 1000
  np.testing.assert_allclose(boxes[0, 2] - boxes[0, 0], 1000.0, rtol=1e-5)
  assert np.all(np.isfinite(boxes))


def test_shapes_checked():
  with pytest.raises(ValueError, match="broadcast"):
    encode_boxes(jnp.zeros((3, 4)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="last axis"):
    decode_boxes(jnp.zeros((3, 3)), jnp.zeros((3, 4)))
