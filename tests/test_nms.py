import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax import batched_nms, nms
from focal_jax.ops.nms import TILE_SIZE
from references import greedy_nms


def _padded(indices, size):
  return (list(indices) + [-1] * size)[:size]


def _random_case(rng, n, spread):
  xy = rng.integers(0, spread, (n, 2)).astype(np.float32)
  boxes = np.concatenate([xy, xy + rng.integers(5, 40, (n, 2))], 1).astype(np.float32)
  scores = rng.integers(0, 10, n).astype(np.float32) / 10  # many exact ties
  return boxes, scores


@pytest.mark.parametrize("spread,threshold", [(200, 0.5), (100, 0.3), (10, 0.5), (60, 0.7)])
def test_nms_equalsgreedy_nms(spread, threshold):
  rng = np.random.default_rng(spread)
  run = jax.jit(nms, static_argnames=("iou_threshold", "max_outputs"))
  for _ in range(4):
    boxes, scores = _random_case(rng, 120, spread)
    for max_outputs in (5, 200):
      got = run(boxes, scores, iou_threshold=threshold, max_outputs=max_outputs)
      assert got.dtype == jnp.int32 and got.shape == (max_outputs,)
      assert list(np.asarray(got)) == _padded(greedy_nms(boxes, scores, threshold), max_outputs)


@pytest.mark.parametrize("spread,with_classes", [(40, False), (150, True), (400, False)])
def test_many_tiles_equal_greedy_nms(spread, with_classes):
  # More boxes than one tile, crowded to many tiles' worth of suppression chains.
  rng = np.random.default_rng(spread)
  n = 3 * TILE_SIZE + 17
  boxes, scores = _random_case(rng, n, spread)
  classes = rng.integers(0, 3, n).astype(np.int32) if with_classes else None
  for max_outputs in (40, n):
    if classes is None:
      got = nms(boxes, scores, iou_threshold=0.4, max_outputs=max_outputs)
    else:
      got = batched_nms(boxes, scores, classes, iou_threshold=0.4, max_outputs=max_outputs)
    assert list(np.asarray(got)) == _padded(greedy_nms(boxes, scores, 0.4, classes), max_outputs)


def test_infinite_scores_rank_last_but_count():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
  scores = np.array([-np.inf, 0.2, -np.inf, np.inf], np.float32)
  # 3 (+inf) suppresses 1 and 0; then 2 (-inf) is kept.
  assert list(np.asarray(nms(boxes, scores, iou_threshold=0.5, max_outputs=4))) == [3, 2, -1, -1]


def test_iou_exactly_at_the_threshold_is_not_suppressed():
  # IoU 40/100 = 0.4 and 50/100 = 0.5 exactly: suppression needs IoU strictly above the threshold.
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 4], [0, 0, 10, 5]], np.float32)
  scores = np.array([0.9, 0.8, 0.7], np.float32)
  assert list(np.asarray(jax.jit(lambda b, s: nms(b, s, iou_threshold=0.4, max_outputs=3))(boxes, scores))) \
      == [0, 1, -1]
  assert list(np.asarray(nms(boxes[::2], scores[::2], iou_threshold=0.5, max_outputs=2))) == [0, 1]
  assert list(np.asarray(nms(boxes, scores, iou_threshold=0.39, max_outputs=3))) == [0, -1, -1]


def test_all_boxes_overlapping_keeps_one():
  boxes = np.tile(np.array([[10.0, 10.0, 50.0, 50.0]], np.float32), (30, 1)) + np.linspace(0, 1, 30)[:, None]
  scores = np.linspace(0.1, 0.9, 30).astype(np.float32)
  got = nms(boxes, scores, iou_threshold=0.5, max_outputs=10)
  assert list(np.asarray(got)) == [29] + [-1] * 9


def test_batched_nms_is_class_aware():
  rng = np.random.default_rng(7)
  for _ in range(4):
    boxes, scores = _random_case(rng, 150, 60)
    classes = rng.integers(0, 3, 150).astype(np.int32)
    got = batched_nms(boxes, scores, classes, iou_threshold=0.5, max_outputs=300)
    assert list(np.asarray(got)) == _padded(greedy_nms(boxes, scores, 0.5, classes), 300)


def test_identical_boxes_of_two_classes_both_kept():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
  got = batched_nms(boxes, np.array([0.9, 0.8], np.float32), np.array([0, 1], np.int32), iou_threshold=0.5,
                    max_outputs=3)
  assert list(np.asarray(got)) == [0, 1, -1]


def test_nan_scores_never_kept_and_vmap_works():
  boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
  scores = np.array([np.nan, 0.5], np.float32)
  assert list(np.asarray(nms(boxes, scores, iou_threshold=0.5, max_outputs=2))) == [1, -1]
  batch = jax.vmap(lambda b, s: nms(b, s, iou_threshold=0.5, max_outputs=2))(
      np.stack([boxes, boxes]), np.array([[0.1, 0.2], [0.3, 0.2]], np.float32))
  np.testing.assert_array_equal(batch, [[1, 0], [0, 1]])


def test_bad_arguments_raise():
  boxes, scores = np.zeros((3, 4), np.float32), np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="iou_threshold"):
    nms(boxes, scores, iou_threshold=1.2, max_outputs=2)
  with pytest.raises(ValueError, match="max_outputs"):
    nms(boxes, scores, iou_threshold=0.5, max_outputs=0)
  with pytest.raises(ValueError, match="scores"):
    nms(boxes, scores[:2], iou_threshold=0.5, max_outputs=2)


def test_integer_scores_rank_like_floats():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
  got = nms(boxes, np.array([1, 3, 2], np.int32), iou_threshold=0.5, max_outputs=3)
  assert list(np.asarray(got)) == [1, 2, -1]
