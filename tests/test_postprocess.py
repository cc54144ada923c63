import math

import jax
import numpy as np
import pytest

from focal_jax.ops.postprocess import PostprocessConfig, postprocess, to_original_pixels
from references import iou


def _sigmoid(x):
  return 1 / (1 + np.exp(-np.float64(x)))


def _decode(d, a):
  w, h = a[2] - a[0], a[3] - a[1]
  cx, cy = a[0] + w / 2 + d[0] * w, a[1] + h / 2 + d[1] * h
  pw, ph = w * math.exp(min(d[2], math.log(1000 / 16))), h * math.exp(min(d[3], math.log(1000 / 16)))
  return np.array([cx - pw / 2, cy - ph / 2, cx + pw / 2, cy + ph / 2])


def _reference(logits, deltas, anchors, counts, size, cfg):
  """torchvision's RetinaNet postprocess_detections, written with loops in float64."""
  cands = []
  start = 0
  for count in counts:
    scored = [(_sigmoid(logits[a, k]), a, k) for a in range(start, start + count)
              for k in range(logits.shape[1])]
    scored = [s for s in scored if s[0] > cfg.score_threshold]
    scored.sort(key=lambda s: -s[0])
    for score, a, k in scored[:cfg.topk_per_level]:
      box = np.clip(_decode(deltas[a], anchors[a]), 0, [size[1], size[0], size[1], size[0]])
      cands.append((score, box, k))
    start += count
  cands.sort(key=lambda c: -c[0])
  kept = []
  for score, box, k in cands:
    if all(k != k2 or iou(box, b2) <= cfg.iou_threshold for _, b2, k2 in kept):
      kept.append((score, box, k))
  return kept[:cfg.max_detections]


def test_matches_loop_reference():
  rng = np.random.default_rng(0)
  counts = (40, 12)
  xy = rng.uniform(0, 48, (52, 2))
  anchors = np.concatenate([xy, xy + rng.uniform(6, 20, (52, 2))], 1).astype(np.float32)
  logits = rng.normal(-2, 2, (2, 52, 3)).astype(np.float32)
  deltas = rng.normal(0, 0.2, (2, 52, 4)).astype(np.float32)
  cfg = PostprocessConfig(score_threshold=0.2, topk_per_level=15, iou_threshold=0.4, max_detections=10)
  det = jax.jit(postprocess, static_argnums=(3, 4, 5))(logits, deltas, anchors, counts, (50, 60), cfg)
  assert det.boxes.shape == (2, 10, 4) and det.scores.shape == (2, 10)
  for b in range(2):
    expected = _reference(logits[b], deltas[b], anchors, counts, (50, 60), cfg)
    n = len(expected)
    assert int(det.valid[b].sum()) == n
    np.testing.assert_allclose(det.scores[b, :n], [e[0] for e in expected], rtol=1e-5)
    np.testing.assert_array_equal(det.classes[b, :n], [e[2] for e in expected])
    np.testing.assert_allclose(det.boxes[b, :n], np.stack([e[1] for e in expected]), atol=1e-3)
    assert np.all(det.classes[b, n:] == -1) and np.all(det.scores[b, n:] == 0)
    assert np.all(np.diff(det.scores[b, :n]) <= 0)


def test_nothing_over_threshold_gives_no_detections():
  anchors = np.array([[0, 0, 10, 10]], np.float32)
  det = postprocess(np.full((1, 1, 2), -10.0, np.float32), np.zeros((1, 1, 4), np.float32), anchors, (1,),
                    (16, 16))
  assert not det.valid.any() and det.boxes.shape == (1, 100, 4)


def test_to_original_pixels():
  boxes = np.array([[[10.0, 20.0, 200.0, 40.0]]], np.float32)
  out = to_original_pixels(boxes, np.array([0.5], np.float32), np.array([[100, 300]], np.int32))
  np.testing.assert_allclose(out, [[[20.0, 40.0, 300.0, 80.0]]])


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="level counts"):
    postprocess(np.zeros((1, 5, 2)), np.zeros((1, 5, 4)), np.zeros((5, 4)), (3,), (16, 16))
  with pytest.raises(ValueError, match="iou_threshold"):
    PostprocessConfig(iou_threshold=2.0)


@pytest.mark.parametrize("num_anchors, k", [(300, 40), (30, 40), (300, 300)])
def test_top_k_pairs_equal_flat_top_k_with_ties(num_anchors, k):
  from focal_jax.ops.postprocess import _top_k_pairs

  rng = np.random.default_rng(num_anchors + k)
  # Few distinct values: many ties, which flat top-k breaks towards the lower flat index.
  logits = rng.integers(0, 6, (num_anchors + 20, 7)).astype(np.float32)
  level = logits[10:10 + num_anchors]  # the level: anchors 10 .. 10 + num_anchors
  order = np.argsort(-level.reshape(-1), kind="stable")[:k]
  values, anchors, classes = jax.jit(_top_k_pairs, static_argnums=(2, 3, 4))(
      logits, logits.max(-1), 10, num_anchors, k)
  np.testing.assert_array_equal(values, level.reshape(-1)[order])
  np.testing.assert_array_equal(anchors, 10 + order // 7)
  np.testing.assert_array_equal(classes, order % 7)
