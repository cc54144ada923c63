import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax.ops import boxes as B
from references import iou


def _iou_reference(a, b):
  return np.array([[iou(p, q) for q in b] for p in a])


def _random_boxes(rng, n, scale=100.0):
  xy = rng.uniform(0, scale, (n, 2))
  wh = rng.uniform(1, scale / 2, (n, 2))
  return np.concatenate([xy, xy + wh], axis=1)


def test_box_iou_matches_reference():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 13), _random_boxes(rng, 17)
  np.testing.assert_allclose(jax.jit(B.box_iou)(jnp.float32(a), jnp.float32(b)), _iou_reference(a, b),
                             atol=1e-5)


def test_box_iou_hand_worked():
  a = jnp.array([[0.0, 0.0, 2.0, 2.0]])
  b = jnp.array([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0]])
  np.testing.assert_allclose(B.box_iou(a, b), [[1 / 7, 1.0, 0.0]], rtol=1e-6)


def test_intersection_union_hand_worked_and_broadcast():
  a = jnp.array([[0.0, 0.0, 2.0, 2.0]])
  b = jnp.array([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 0.8]])
  intersection, union = B.intersection_union(a, b)  # [1, 4] against [4, 4] pairs elementwise
  np.testing.assert_allclose(intersection, [1.0, 4.0, 0.0, 1.6], rtol=1e-6)
  np.testing.assert_allclose(union, [7.0, 4.0, 5.0, 4.0], rtol=1e-6)
  intersection, union = B.intersection_union(a[:, None, :], b[None, :, :])
  assert intersection.shape == union.shape == (1, 4)


def test_degenerate_boxes_give_zero_not_nan():
  point = jnp.array([[1.0, 1.0, 1.0, 1.0]])
  line = jnp.array([[0.0, 1.0, 4.0, 1.0]])
  iou = B.box_iou(jnp.concatenate([point, line]), jnp.concatenate([point, line]))
  np.testing.assert_array_equal(iou, np.zeros((2, 2)))
  np.testing.assert_array_equal(B.generalized_box_iou(point, point), [[0.0]])
  grad = jax.grad(lambda x: B.box_iou(x, point).sum())(point)
  assert np.all(np.isfinite(grad))
  grad = jax.grad(lambda x: B.elementwise_generalized_box_iou(x, point).sum())(point)
  assert np.all(np.isfinite(grad))


def test_generalized_iou_hand_worked():
  # Two unit squares two units apart: IoU 0, enclosing box 3x1, union 2 -> -1/3.
  a = jnp.array([[0.0, 0.0, 1.0, 1.0]])
  b = jnp.array([[2.0, 0.0, 3.0, 1.0]])
  np.testing.assert_allclose(B.generalized_box_iou(a, b), [[-1 / 3]], rtol=1e-6)
  # Overlapping: IoU 1/7, enclosing 3x3 = 9, union 7 -> 1/7 - 2/9.
  c = jnp.array([[0.0, 0.0, 2.0, 2.0]])
  d = jnp.array([[1.0, 1.0, 3.0, 3.0]])
  np.testing.assert_allclose(B.elementwise_generalized_box_iou(c, d), [1 / 7 - 2 / 9], rtol=1e-6)


def test_format_round_trips_and_values():
  xyxy = jnp.array([[10.0, 20.0, 30.0, 60.0]])
  np.testing.assert_allclose(B.xyxy_to_cxcywh(xyxy), [[20.0, 40.0, 20.0, 40.0]])
  np.testing.assert_allclose(B.xyxy_to_xywh(xyxy), [[10.0, 20.0, 20.0, 40.0]])
  np.testing.assert_allclose(B.cxcywh_to_xyxy(B.xyxy_to_cxcywh(xyxy)), xyxy)
  np.testing.assert_allclose(B.xywh_to_xyxy(B.xyxy_to_xywh(xyxy)), xyxy)
  np.testing.assert_allclose(B.box_area(xyxy), [800.0])
  np.testing.assert_allclose(B.box_area(jnp.array([[5.0, 5.0, 4.0, 9.0]])), [0.0])


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="last axis"):
    B.box_iou(jnp.zeros((3, 5)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="rank 2"):
    B.box_iou(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="one shape"):
    B.elementwise_generalized_box_iou(jnp.zeros((3, 4)), jnp.zeros((2, 4)))
