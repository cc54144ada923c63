import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax import batch_match_anchors, match_anchors
from references import iou

# Anchors chosen so that each hits one branch (IoUs worked out by hand).
ANCHORS = np.array([
    [0, 0, 10, 10],        # 0: IoU 1 with gt0 -> foreground, class 3
    [100, 100, 110, 110],  # 1: overlaps only the padded slot -> background
    [0, 0, 10, 4.5],       # 2: IoU 0.45 with gt0 -> ignored
    [200, 200, 210, 210],  # 3: IoU 0.25 with gt1, its best -> low-quality foreground, class 1
    [210, 210, 220, 220],  # 4: ties with anchor 3 for gt1 -> low-quality foreground, class 1
    [300, 300, 312, 312],  # 5: IoU 100/144 with gt3 and gt2's best (144/1600) -> keeps gt3, class 2
    [0, 0, 20, 20],        # 6: IoU 0.25 with gt0, not its best -> background
    [0, 0, 10, 5],         # 7: IoU exactly 0.5 -> foreground
    [0, 0, 10, 4],         # 8: IoU exactly 0.4 -> ignored (background is strictly below)
], np.float32)
GT_BOXES = np.array([
    [0, 0, 10, 10],
    [200, 200, 220, 220],
    [300, 300, 340, 340],
    [300, 300, 310, 310],
    [100, 100, 110, 110],  # padding
], np.float32)
GT_CLASSES = np.array([3, 1, 5, 2, 9], np.int32)
GT_VALID = np.array([True, True, True, True, False])


def test_every_branch_hand_worked():
  classes, boxes = jax.jit(match_anchors)(ANCHORS, GT_BOXES, GT_CLASSES, GT_VALID)
  np.testing.assert_array_equal(classes, [3, -1, -2, 1, 1, 2, -1, 3, -2])
  for anchor, gt in [(0, 0), (3, 1), (4, 1), (5, 3), (7, 0)]:
    np.testing.assert_array_equal(boxes[anchor], GT_BOXES[gt])


def test_without_low_quality_matches():
  classes, _ = match_anchors(ANCHORS, GT_BOXES, GT_CLASSES, GT_VALID, allow_low_quality=False)
  np.testing.assert_array_equal(classes, [3, -1, -2, -1, -1, 2, -1, 3, -2])


def test_no_valid_ground_truth_is_all_background():
  classes, _ = match_anchors(ANCHORS, GT_BOXES, GT_CLASSES, np.zeros(5, bool))
  np.testing.assert_array_equal(classes, np.full(9, -1))
  classes, boxes = match_anchors(ANCHORS, np.zeros((0, 4), np.float32), np.zeros(0, np.int32),
                                 np.zeros(0, bool))
  np.testing.assert_array_equal(classes, np.full(9, -1))
  assert boxes.shape == (9, 4)


def _match_reference(anchors, gt, cls, valid, hi=0.5, lo=0.4):
  """torchvision Matcher semantics, in float64 with loops."""
  idx = [m for m in range(len(gt)) if valid[m]]
  labels = np.full(len(anchors), -1)
  if not idx:
    return labels
  table = np.array([[iou(gt[m], a) for a in anchors] for m in idx])
  best = table.argmax(0)
  best_iou = table.max(0)
  labels = np.where(best_iou >= hi, [cls[idx[b]] for b in best], np.where(best_iou < lo, -1, -2))
  for row in table:
    if row.max() > 0:
      for j in np.flatnonzero(row == row.max()):
        labels[j] = cls[idx[best[j]]]
  return labels


def test_random_scenes_against_reference():
  rng = np.random.default_rng(3)
  # Integer coordinates make exact IoU ties frequent.
  anchors = np.concatenate([rng.integers(0, 60, (300, 2)), np.zeros((300, 2))], 1)
  anchors[:, 2:] = anchors[:, :2] + rng.integers(4, 30, (300, 2))
  for _ in range(5):
    gt = np.concatenate([rng.integers(0, 60, (6, 2)), np.zeros((6, 2))], 1)
    gt[:, 2:] = gt[:, :2] + rng.integers(2, 40, (6, 2))
    cls = rng.integers(0, 4, 6)
    valid = rng.random(6) < 0.7
    got, _ = match_anchors(jnp.float32(anchors), jnp.float32(gt), jnp.int32(cls), jnp.asarray(valid))
    np.testing.assert_array_equal(got, _match_reference(anchors, gt, cls, valid))


def test_batched_with_vmap():
  gt = np.stack([GT_BOXES, GT_BOXES])
  cls = np.stack([GT_CLASSES, GT_CLASSES])
  valid = np.stack([GT_VALID, np.zeros(5, bool)])
  classes, boxes = jax.jit(batch_match_anchors)(ANCHORS, gt, cls, valid)
  assert classes.shape == (2, 9) and boxes.shape == (2, 9, 4)
  np.testing.assert_array_equal(classes[0], [3, -1, -2, 1, 1, 2, -1, 3, -2])
  np.testing.assert_array_equal(classes[1], np.full(9, -1))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="foreground_iou"):
    match_anchors(ANCHORS, GT_BOXES, GT_CLASSES, GT_VALID, foreground_iou=1.5)
  with pytest.raises(ValueError, match="must not exceed"):
    match_anchors(ANCHORS, GT_BOXES, GT_CLASSES, GT_VALID, foreground_iou=0.3)
  with pytest.raises(ValueError, match="gt_classes"):
    match_anchors(ANCHORS, GT_BOXES, GT_CLASSES[:3], GT_VALID)
