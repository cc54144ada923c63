"""The core install (`pip install focal-jax`: jax, flax, optax, numpy) on its own.

CI runs this file in a virtual environment that holds only the core install
and pytest, and again with the whole suite. Every expected value is worked
out by hand or from the paper's formula in float64 NumPy, never from the
library itself. The last test repeats every check in a fresh interpreter and
then asserts that none of the optional heavy dependencies got imported (the
suite's own conftest imports torchvision, so that cannot be checked in the
pytest process itself).

Run alone: `python -m pytest --noconftest tests/core/test_core_install.py`.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import focal_jax
from focal_jax.ops.anchors import AnchorConfig, anchors_per_level

# Modules of the optional extras that the ops and models must never import.
HEAVY_MODULES = ("tensorflow", "tensorflow_datasets", "pycocotools", "torch", "matplotlib")

# Logits with a mixture of both targets, including |x| = 20 (where 1 - p_t is about 2e-9).
LOGITS = np.array([-20.0, -3.0, -0.5, 0.0, 0.7, 4.0, 20.0, -20.0, -2.0, 0.0, 1.5, 20.0])
TARGETS = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def _log_sigmoid(x):
  """log(sigmoid(x)) in float64, exact for large |x|."""
  return -np.logaddexp(0.0, -x)


def _paper_focal_loss(x, y, alpha, gamma):
  """FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t) (Lin et al., 2017, eq. 5), float64, y in {0, 1}."""
  log_p_t = np.where(y == 1, _log_sigmoid(x), _log_sigmoid(-x))
  one_minus_p_t = np.where(y == 1, np.exp(_log_sigmoid(-x)), np.exp(_log_sigmoid(x)))
  alpha_t = 1.0 if alpha is None else np.where(y == 1, alpha, 1 - alpha)
  return -alpha_t * one_minus_p_t ** gamma * log_p_t


def _paper_focal_grad(x, y, alpha, gamma):
  """d FL / dx of the formula above, differentiated by hand (p = sigmoid(x)).

  y = 1: alpha (1 - p)^gamma (gamma p log p - (1 - p));
  y = 0: (1 - alpha) p^gamma (p - gamma (1 - p) log(1 - p)).
  """
  p, q = np.exp(_log_sigmoid(x)), np.exp(_log_sigmoid(-x))  # q = 1 - p
  log_p, log_q = _log_sigmoid(x), _log_sigmoid(-x)
  a1, a0 = (1.0, 1.0) if alpha is None else (alpha, 1 - alpha)
  positive = a1 * q ** gamma * (gamma * p * log_p - q)
  negative = a0 * p ** gamma * (p - gamma * q * log_q)
  return np.where(y == 1, positive, negative)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (None, 0.0), (0.5, 1.5)])
def test_focal_loss_matches_the_paper(alpha, gamma):
  x, y = LOGITS, TARGETS
  # The hand-derived gradient agrees with central differences of the formula (float64).
  h = 1e-6
  numeric = (_paper_focal_loss(x + h, y, alpha, gamma) - _paper_focal_loss(x - h, y, alpha, gamma)) / (2 * h)
  np.testing.assert_allclose(_paper_focal_grad(x, y, alpha, gamma), numeric, rtol=1e-6, atol=1e-9)

  logits, targets = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  loss = focal_jax.focal_loss(logits, targets, alpha=alpha, gamma=gamma)
  grad = jax.grad(lambda v: focal_jax.focal_loss(v, targets, alpha=alpha, gamma=gamma, reduction="sum"))(logits)
  assert loss.shape == x.shape and grad.shape == x.shape
  assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(loss, _paper_focal_loss(x, y, alpha, gamma), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, _paper_focal_grad(x, y, alpha, gamma), rtol=1e-5, atol=1e-7)
  mean = focal_jax.focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
  np.testing.assert_allclose(mean, _paper_focal_loss(x, y, alpha, gamma).mean(), rtol=1e-5)


def test_focal_loss_at_large_logits():
  """The well-classified and the badly misclassified ends, worked by hand (alpha 0.25, gamma 2)."""
  logits = jnp.array([20.0, -20.0, -20.0, 20.0])
  targets = jnp.array([1.0, 0.0, 1.0, 0.0])
  loss = focal_jax.focal_loss(logits, targets)
  # Misclassified by 20: (1 - p_t)^2 ~ 1 and -log p_t ~ 20 + e^-20.
  np.testing.assert_allclose(loss[2:], [0.25 * 20, 0.75 * 20], rtol=1e-6)
  # Well classified: 1 - p_t ~ e^-20, so the loss is ~ alpha_t e^-60, tiny but finite and positive.
  np.testing.assert_allclose(loss[:2], [0.25 * math.exp(-60), 0.75 * math.exp(-60)], rtol=1e-5)


def test_box_iou_by_hand():
  a = [0.0, 0.0, 2.0, 2.0]        # area 4
  b = [1.0, 1.0, 3.0, 3.0]        # area 4; with a: intersection 1, union 7
  far = [5.0, 5.0, 6.0, 6.0]      # touches neither
  half = [0.0, 0.0, 1.0, 2.0]     # inside a (area 2), touches b only along x = 1
  iou = focal_jax.box_iou(jnp.array([a, b]), jnp.array([a, b, far, half]))
  np.testing.assert_allclose(iou, [[1.0, 1 / 7, 0.0, 0.5], [1 / 7, 1.0, 0.0, 0.0]], rtol=1e-6, atol=1e-7)


def test_nms_by_hand():
  boxes = jnp.array([
      [0.0, 0.0, 10.0, 10.0],   # 0: score 0.9
      [1.0, 1.0, 11.0, 11.0],   # 1: score 0.8; IoU with 0 = 81 / 119 = 0.68, with 3 = 36 / 114 = 0.32
      [20.0, 20.0, 30.0, 30.0],  # 2: score 0.7; overlaps nothing
      [0.0, 0.0, 10.0, 5.0],    # 3: score 0.95; IoU with 0 = 50 / 100 = 0.5 exactly
  ])
  scores = jnp.array([0.9, 0.8, 0.7, 0.95])
  # Threshold 0.5: 3 is kept, 0 stays (0.5 does not exceed 0.5), 1 goes (0.68 with 0), 2 stays.
  keep = focal_jax.nms(boxes, scores, iou_threshold=0.5, max_outputs=5)
  np.testing.assert_array_equal(keep, [3, 0, 2, -1, -1])
  # Threshold 0.4: 0 goes (0.5 with 3), so 1 is no longer suppressed by it (0.32 with 3).
  keep = focal_jax.nms(boxes, scores, iou_threshold=0.4, max_outputs=5)
  np.testing.assert_array_equal(keep, [3, 1, 2, -1, -1])
  keep = focal_jax.nms(boxes, scores, iou_threshold=0.4, max_outputs=2)
  np.testing.assert_array_equal(keep, [3, 1])


def test_anchors_by_hand():
  config = AnchorConfig(min_level=3, max_level=5, sizes=(32.0, 64.0, 128.0))
  anchors = np.asarray(focal_jax.generate_anchors((64, 64), config))
  # Strides 8, 16, 32: 8x8 + 4x4 + 2x2 locations, 3 ratios x 3 scales each.
  assert anchors.shape == ((64 + 16 + 4) * 9, 4) and anchors.dtype == np.float32
  assert anchors_per_level((64, 64), config) == [576, 144, 36]
  # Level 4 (stride 16), location row 1, column 2: centre (x, y) = (32, 16) with offset 0.
  # At each location the anchors are ratio-major: ratio 2.0 (height / width), scale 2^(1/3) is 2 * 3 + 1.
  index = 576 + (1 * 4 + 2) * 9 + (2 * 3 + 1)
  side = 64 * 2 ** (1 / 3)
  width, height = side / math.sqrt(2), side * math.sqrt(2)
  expected = [32 - width / 2, 16 - height / 2, 32 + width / 2, 16 + height / 2]
  np.testing.assert_allclose(anchors[index], expected, rtol=1e-5, atol=1e-4)
  # The first anchor: level 3 at the origin, ratio 0.5, scale 1 (32 / sqrt(0.5) wide, 32 sqrt(0.5) high).
  np.testing.assert_allclose(anchors[0], [-16 * math.sqrt(2), -8 * math.sqrt(2), 16 * math.sqrt(2),
                                          8 * math.sqrt(2)], rtol=1e-5)


def _tiny_model():
  return focal_jax.RetinaNet(num_classes=3, stage_sizes=(1, 1, 1, 1), block="basic", width=8, fpn_channels=16,
                             head_channels=16, head_convs=1, min_level=3, max_level=5)


def test_tiny_retinanet_and_postprocess():
  model = _tiny_model()
  image_size = (64, 64)
  images = jax.random.normal(jax.random.key(0), (2, *image_size, 3), jnp.float32)
  variables = model.init(jax.random.key(1), images)
  cls_logits, box_deltas = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert cls_logits.shape == (2, 756, 3) and box_deltas.shape == (2, 756, 4)
  assert cls_logits.dtype == jnp.float32 and box_deltas.dtype == jnp.float32
  assert np.all(np.isfinite(cls_logits)) and np.all(np.isfinite(box_deltas))
  # The classifier starts at the prior foreground probability 0.01: logits near log(0.01 / 0.99).
  assert abs(float(jnp.median(cls_logits)) - math.log(0.01 / 0.99)) < 1.0

  anchor_config = AnchorConfig(min_level=3, max_level=5, sizes=(32.0, 64.0, 128.0))
  anchors = focal_jax.generate_anchors(image_size, anchor_config)
  counts = anchors_per_level(image_size, anchor_config)

  # Score threshold 0: every slot is filled, and the best (anchor, class) pair always survives NMS.
  config = focal_jax.PostprocessConfig(score_threshold=0.0, max_detections=10)
  detections = jax.jit(lambda c, d: focal_jax.postprocess(c, d, anchors, counts, image_size, config))(
      cls_logits, box_deltas)
  assert isinstance(detections, focal_jax.Detections)
  assert detections.boxes.shape == (2, 10, 4) and detections.scores.shape == (2, 10)
  assert detections.classes.shape == (2, 10) and detections.valid.shape == (2, 10)
  assert np.all(detections.valid)
  scores = np.asarray(detections.scores)
  np.testing.assert_allclose(scores[:, 0], jax.nn.sigmoid(cls_logits.max(axis=(1, 2))), rtol=1e-6)
  assert np.all(np.diff(scores, axis=1) <= 0) and np.all((scores > 0) & (scores < 1))
  assert np.all((detections.classes >= 0) & (detections.classes < 3))
  boxes = np.asarray(detections.boxes)
  assert np.all((boxes >= 0) & (boxes <= 64)) and np.all(boxes[..., 2:] >= boxes[..., :2])

  # The default thresholds (score > 0.05): valid slots first, invalid ones zeroed with class -1.
  detections = focal_jax.postprocess(cls_logits, box_deltas, anchors, counts, image_size)
  valid = np.asarray(detections.valid)
  assert detections.scores.shape == (2, 100)
  assert np.all(np.asarray(detections.scores)[valid] > 0.05)
  assert np.all(np.asarray(detections.scores)[~valid] == 0) and np.all(np.asarray(detections.classes)[~valid] == -1)
  assert np.all(np.sort(valid, axis=1)[:, ::-1] == valid)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="tensorflow is installed: the core install's message is not shown")
def test_missing_extra_names_the_extra():
  from focal_jax._extras import require  # pylint: disable=g-import-not-at-top

  with pytest.raises(ModuleNotFoundError, match=r"focal-jax\[train\]"):
    require("tensorflow")


CHECKS = (
    lambda: [test_focal_loss_matches_the_paper(a, g) for a, g in [(0.25, 2.0), (None, 0.0), (0.5, 1.5)]],
    test_focal_loss_at_large_logits,
    test_box_iou_by_hand,
    test_nms_by_hand,
    test_anchors_by_hand,
    test_tiny_retinanet_and_postprocess,
)


def test_core_imports_no_heavy_dependency():
  """Every check above, in a fresh interpreter, loads none of the optional extras' modules."""
  result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.strip().splitlines()[-1] == "loaded: none", result.stdout + result.stderr


if __name__ == "__main__":
  for check in CHECKS:
    check()
  loaded = sorted(name for name in HEAVY_MODULES if name in sys.modules)
  print("loaded:", ", ".join(loaded) or "none")
