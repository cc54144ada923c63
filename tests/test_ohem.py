"""Tests of focal_jax.ops.ohem and the OHEM / alpha-balanced CE baselines of the RetinaNet loss.

The reference is the paper's definition in plain Python (`ohem_reference`),
with the shared greedy NMS of `references.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from references import greedy_nms

from focal_jax import focal_loss, retinanet_loss
from focal_jax.ops.ohem import ohem_selection


def ohem_reference(losses, anchors, matched, batch_size, positive_fraction=None, iou_threshold=0.7):
  """One image: non-ignored anchors by loss, greedy NMS, the highest-loss survivors (SSD ratio optional)."""
  candidates = [i for i in range(len(losses)) if matched[i] != -2]
  kept = greedy_nms([anchors[i] for i in candidates], [losses[i] for i in candidates], iou_threshold)
  survivors = [candidates[k] for k in kept]
  if positive_fraction is None:
    return set(survivors[:batch_size])
  pool = survivors[:min(2 * batch_size, len(losses))]
  positives = [i for i in pool if matched[i] >= 0][:int(positive_fraction * batch_size)]
  negatives = [i for i in pool if matched[i] < 0][:batch_size - len(positives)]
  return set(positives) | set(negatives)


def _scene(seed, num_anchors=300, positives=20, ignored=30):
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, 100, (num_anchors, 2))
  anchors = np.concatenate([xy, xy + rng.uniform(5, 30, (num_anchors, 2))], 1).astype(np.float32)
  matched = np.full(num_anchors, -1, np.int32)
  labels = rng.permutation(num_anchors)
  matched[labels[:positives]] = rng.integers(0, 3, positives)
  matched[labels[positives:positives + ignored]] = -2
  losses = rng.exponential(1.0, num_anchors).astype(np.float32)
  return anchors, matched, losses


@pytest.mark.parametrize("batch_size, positive_fraction", [(16, None), (64, None), (16, 0.25), (64, 0.25)])
@pytest.mark.parametrize("seed", [0, 1])
def test_selection_matches_the_reference(seed, batch_size, positive_fraction):
  anchors, matched, losses = _scene(seed)
  anchors2, matched2, losses2 = _scene(seed + 10)
  got = np.asarray(jax.jit(lambda l, a, m: ohem_selection(
      l, a, m, batch_size=batch_size, positive_fraction=positive_fraction))(
          np.stack([losses, losses2]), anchors, np.stack([matched, matched2])))
  for row, (image_losses, image_matched) in enumerate([(losses, matched), (losses2, matched2)]):
    want = ohem_reference(image_losses.tolist(), anchors.tolist(), image_matched.tolist(), batch_size,
                          positive_fraction)
    assert set(np.flatnonzero(got[row])) == want
    assert got[row].sum() <= batch_size
    assert not np.any(got[row] & (image_matched == -2))  # ignored anchors never
    if positive_fraction is not None:
      assert (got[row] & (image_matched >= 0)).sum() <= positive_fraction * batch_size


def test_nms_removes_the_duplicates_of_a_hard_anchor():
  anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32)
  losses = np.array([[5.0, 4.0, 3.0, 2.0]], np.float32)  # anchor 1 overlaps anchor 0 at IoU 10/11 > 0.7
  matched = np.array([[-1, -1, -1, -1]], np.int32)
  picked = np.asarray(ohem_selection(losses, anchors, matched, batch_size=2))
  np.testing.assert_array_equal(picked, [[True, False, True, False]])


def test_an_image_without_positives_and_the_ratio():
  anchors, matched, losses = _scene(3, positives=0)
  picked = np.asarray(ohem_selection(losses[None], anchors, matched[None], batch_size=32, positive_fraction=0.25))
  assert picked.sum() == 32 and not np.any(picked & (matched[None] >= 0))  # all negatives: the batch is full
  # Every positive scores above every negative: only a quarter of the batch may be positive.
  anchors, matched, losses = _scene(4, positives=40)
  losses = np.where(matched >= 0, losses + 100, losses)
  picked = np.asarray(ohem_selection(losses[None], anchors, matched[None], batch_size=32, positive_fraction=0.25))
  assert (picked & (matched[None] >= 0)).sum() == 8 and picked.sum() == 32


def test_bad_arguments():
  anchors, matched, losses = _scene(0)
  with pytest.raises(ValueError, match="OHEM batch size must be a whole number in 1..300"):
    ohem_selection(losses[None], anchors, matched[None], batch_size=301)
  with pytest.raises(ValueError, match="positive_fraction"):
    ohem_selection(losses[None], anchors, matched[None], batch_size=8, positive_fraction=1.5)


def test_ohem_loss_is_the_plain_cross_entropy_of_the_selection():
  anchors, matched, _ = _scene(5, num_anchors=120, positives=10, ignored=10)
  rng = np.random.default_rng(5)
  logits = rng.normal(-2, 2, (1, 120, 3)).astype(np.float32)
  boxes = np.repeat(anchors[None], 1, 0) + 1.0
  result = retinanet_loss(logits, np.zeros((1, 120, 4), np.float32), anchors, matched[None], boxes,
                          classification="ohem", ohem_batch_size=24, ohem_positive_fraction=0.25)
  targets = (matched[:, None] == np.arange(3)).astype(np.float64)
  x = logits[0].astype(np.float64)
  cross_entropy = (np.maximum(x, 0) - x * targets + np.log1p(np.exp(-np.abs(x)))).sum(1)
  chosen = sorted(ohem_reference(cross_entropy.tolist(), anchors.tolist(), matched.tolist(), 24, 0.25))
  np.testing.assert_allclose(result["classification_loss"], cross_entropy[chosen].mean(), rtol=1e-5)
  grads = jax.grad(lambda l: retinanet_loss(l, jnp.zeros((1, 120, 4)), anchors, matched[None], boxes,
                                            classification="ohem", ohem_batch_size=24)["loss"])(logits)
  assert np.all(np.isfinite(grads))
  unchosen = np.ones(120, bool)
  unchosen[list(ohem_reference(cross_entropy.tolist(), anchors.tolist(), matched.tolist(), 24))] = False
  assert np.all(np.asarray(grads)[0, unchosen] == 0)  # only the minibatch trains the classifier


@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.75, 0.999])
def test_alpha_balanced_cross_entropy_is_the_focal_loss_at_gamma_zero(alpha):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 4, (50, 7)).astype(np.float32)
  targets = (rng.random((50, 7)) < 0.2).astype(np.float32)
  weights = np.where(targets == 1, alpha, 1 - alpha)
  expected = weights * np.asarray(optax.sigmoid_binary_cross_entropy(logits, targets))
  np.testing.assert_allclose(focal_loss(logits, targets, alpha=alpha, gamma=0.0), expected, rtol=1e-5, atol=1e-7)
