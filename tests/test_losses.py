import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from focal_jax import focal_loss, giou_loss, retinanet_loss, smooth_l1_loss
from focal_jax.ops.box_coder import encode_boxes


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _focal_reference(x, t, alpha=0.25, gamma=2.0):
  """Lin et al. (2017) eq. 5 in float64, soft targets through the cross-entropy."""
  x, t = np.float64(x), np.float64(t)
  p = _sigmoid(x)
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  alpha_t = 1.0 if alpha is None else alpha * t + (1 - alpha) * (1 - t)
  return alpha_t * (1 - p_t) ** gamma * ce


@pytest.fixture
def logits_and_targets():
  rng = np.random.default_rng(0)
  return rng.normal(0, 3, (4, 50, 7)).astype(np.float32), (rng.random((4, 50, 7)) < 0.2).astype(np.float32)


def test_matches_paper_formula(logits_and_targets):
  x, t = logits_and_targets
  np.testing.assert_allclose(jax.jit(focal_loss)(x, t), _focal_reference(x, t), rtol=1e-5, atol=1e-7)


def test_soft_targets_match_formula():
  rng = np.random.default_rng(1)
  x, t = rng.normal(0, 2, 200).astype(np.float32), rng.random(200).astype(np.float32)
  np.testing.assert_allclose(focal_loss(x, t, gamma=1.5), _focal_reference(x, t, gamma=1.5), rtol=1e-5)


def test_gamma_zero_without_alpha_is_cross_entropy(logits_and_targets):
  x, t = logits_and_targets
  p = _sigmoid(np.float64(x))
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  np.testing.assert_allclose(focal_loss(x, t, alpha=None, gamma=0.0), ce, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(focal_loss(x, t, alpha=-1, gamma=0.0), ce, rtol=1e-5, atol=1e-7)


def test_ratio_to_cross_entropy_is_modulating_factor(logits_and_targets):
  x, t = logits_and_targets
  p = _sigmoid(np.float64(x))
  p_t = np.where(t == 1, p, 1 - p)
  ratio = focal_loss(x, t, alpha=None, gamma=2.0) / focal_loss(x, t, alpha=None, gamma=0.0)
  np.testing.assert_allclose(ratio, (1 - p_t) ** 2, rtol=1e-4)


def test_alpha_weights_positives_and_negatives(logits_and_targets):
  x, t = logits_and_targets
  ratio = focal_loss(x, t, alpha=0.25) / focal_loss(x, t, alpha=None)
  np.testing.assert_allclose(ratio, np.where(t == 1, 0.25, 0.75), rtol=1e-5)


def test_equals_optax(logits_and_targets):
  x, t = logits_and_targets
  for alpha in (0.25, None):
    np.testing.assert_allclose(focal_loss(x, t, alpha=alpha, gamma=2.0),
                               optax.losses.sigmoid_focal_loss(x, t, alpha=alpha, gamma=2.0),
                               rtol=1e-5, atol=1e-7)


def test_reductions(logits_and_targets):
  x, t = logits_and_targets
  reference = _focal_reference(x, t)
  np.testing.assert_allclose(focal_loss(x, t, reduction="sum"), reference.sum(), rtol=1e-5)
  np.testing.assert_allclose(focal_loss(x, t, reduction="mean"), reference.mean(), rtol=1e-5)


def test_gradient_matches_finite_differences():
  x = np.array([-4.0, -0.5, 0.3, 2.0, 6.0])
  t = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
  eps = 1e-6
  numeric = (_focal_reference(x + eps, t) - _focal_reference(x - eps, t)) / (2 * eps)
  grad = jax.grad(lambda v: focal_loss(v, jnp.float32(t), reduction="sum"))(jnp.float32(x))
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (None, 2.0), (0.25, 0.0), (0.4, 0.5), (None, 1.5),
                                          (0.25, 3.0)])
def test_closed_form_gradients_match_finite_differences(alpha, gamma):
  """Logit and target gradients (soft targets) against float64 central differences of eq. 5."""
  rng = np.random.default_rng(7)
  x = rng.normal(0, 3, 64)
  t = np.concatenate([rng.random(32), (rng.random(32) < 0.5).astype(float)])
  eps = 1e-6
  d_x = (_focal_reference(x + eps, t, alpha, gamma) - _focal_reference(x - eps, t, alpha, gamma)) / (2 * eps)
  d_t = (_focal_reference(x, t + eps, alpha, gamma) - _focal_reference(x, t - eps, alpha, gamma)) / (2 * eps)
  soft = slice(0, 32)  # the loss is not differentiable in t at hard 0/1 targets for gamma < 1
  grad_x, grad_t = jax.grad(lambda v, w: focal_loss(v, w, alpha=alpha, gamma=gamma, reduction="sum"),
                            argnums=(0, 1))(jnp.float32(x), jnp.float32(t))
  np.testing.assert_allclose(grad_x, d_x, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(grad_t[soft], d_t[soft], rtol=2e-4, atol=1e-5)


def test_gradient_under_jit_vmap_and_masking_matches_optax(logits_and_targets):
  x, t = logits_and_targets
  mask = np.arange(x.shape[1]) % 3 != 0

  def masked(loss_fn):
    return lambda v, w: jnp.sum(jnp.where(mask[:, None], loss_fn(v, w), 0.0) ** 1.5)

  ours = jax.jit(jax.vmap(jax.grad(masked(lambda v, w: focal_loss(v, w)))))(x, t)
  peer = jax.vmap(jax.grad(masked(lambda v, w: optax.losses.sigmoid_focal_loss(v, w, alpha=0.25))))(x, t)
  np.testing.assert_allclose(ours, peer, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_finite_at_extreme_logits(gamma):
  x = jnp.array([100.0, -100.0, 100.0, -100.0, 0.0])
  t = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5])
  value = focal_loss(x, t, gamma=gamma)
  grad = jax.grad(lambda v: focal_loss(v, t, gamma=gamma, reduction="sum"))(x)
  assert np.all(np.isfinite(value)) and np.all(np.isfinite(grad))
  # Confidently wrong: alpha_t * 1 * 100; confidently right: ~0.
  np.testing.assert_allclose(value[:4], [0.0, 0.0, 75.0, 25.0], atol=1e-3)
  np.testing.assert_allclose(grad[2:4], [0.75, -0.25], rtol=1e-4)


@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (None, 0.0), (0.5, 0.5)])
def test_infinite_logits_give_a_finite_loss_and_gradient(alpha, gamma):
  x = jnp.array([jnp.inf, -jnp.inf, jnp.inf, -jnp.inf, jnp.inf])
  t = jnp.array([1.0, 0.0, 0.0, 1.0, 0.5])
  value = focal_loss(x, t, alpha=alpha, gamma=gamma)
  d_logits, d_targets = jax.grad(lambda v, w: focal_loss(v, w, alpha=alpha, gamma=gamma, reduction="sum"),
                                 argnums=(0, 1))(x, t)
  for array in (value, d_logits, d_targets):
    assert np.all(np.isfinite(array)), array
  # Right with certainty: no loss and no gradient; wrong: the slope alpha_t of the linear tail, as at 100.
  np.testing.assert_array_equal(value[:2], [0.0, 0.0])
  weights = (0.75, 0.25) if alpha == 0.25 else (0.5, 0.5) if alpha == 0.5 else (1.0, 1.0)
  np.testing.assert_allclose(d_logits[2:4], [weights[0], -weights[1]], rtol=1e-6)
  assert float(focal_loss(x, t, alpha=alpha, gamma=gamma, reduction="sum")) < np.inf


def test_vmap_and_grad_compose(logits_and_targets):
  x, t = logits_and_targets
  per_row = jax.vmap(lambda a, b: focal_loss(a, b, reduction="sum"))(x, t)
  np.testing.assert_allclose(per_row, _focal_reference(x, t).sum(axis=(1, 2)), rtol=1e-5)
  grads = jax.jit(jax.vmap(jax.grad(lambda a, b: focal_loss(a, b, reduction="sum"))))(x, t)
  assert grads.shape == x.shape and np.all(np.isfinite(grads))


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="one shape"):
    focal_loss(jnp.zeros((2, 3)), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="reduction"):
    focal_loss(jnp.zeros(3), jnp.zeros(3), reduction="avg")
  with pytest.raises(ValueError, match="gamma"):
    focal_loss(jnp.zeros(3), jnp.zeros(3), gamma=-1.0)
  for bad in (dict(gamma=float("nan")), dict(alpha=float("nan")), dict(gamma=float("inf")), dict(gamma=True),
              dict(alpha=1.5), dict(gamma="2")):
    with pytest.raises(ValueError, match="gamma|alpha"):
      focal_loss(jnp.zeros(3), jnp.zeros(3), **bad)


def test_a_traced_gamma_is_refused_with_the_reason():
  with pytest.raises(ValueError, match="gamma must be a static number, not a traced value"):
    jax.jit(lambda x, g: focal_loss(x, jnp.zeros(3), gamma=g))(jnp.zeros(3), 2.0)
  with pytest.raises(ValueError, match="alpha must be a static number"):
    jax.grad(lambda a: focal_loss(jnp.zeros(3), jnp.zeros(3), alpha=a, reduction="sum"))(0.25)
  # A static one under jit is fine.
  value = jax.jit(lambda x: focal_loss(x, jnp.ones(3), gamma=1.0, alpha=None, reduction="sum"))(jnp.zeros(3))
  np.testing.assert_allclose(value, 3 * 0.5 * np.log(2), rtol=1e-6)


def test_smooth_l1_and_giou_hand_worked():
  d = smooth_l1_loss(jnp.array([[0.05, 0.5, 0.0, -1.0]]), jnp.zeros((1, 4)), beta=0.1)
  np.testing.assert_allclose(d, [0.5 * 0.05**2 / 0.1 + 0.45 + 0.0 + 0.95], rtol=1e-6)
  g = giou_loss(jnp.array([[0.0, 0.0, 1.0, 1.0]]), jnp.array([[2.0, 0.0, 3.0, 1.0]]))
  np.testing.assert_allclose(g, [1 + 1 / 3], rtol=1e-6)


def _retinanet_case():
  anchors = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [0, 10, 10, 20]], np.float32)
  classes = np.array([[1, -1, -2], [-1, -1, -1]], np.int32)
  boxes = np.zeros((2, 3, 4), np.float32)
  boxes[0, 0] = [1, 1, 11, 12]
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 2, (2, 3, 2)).astype(np.float32)
  deltas = rng.normal(0, 0.3, (2, 3, 4)).astype(np.float32)
  return logits, deltas, anchors, classes, boxes


def test_retinanet_loss_against_reference():
  logits, deltas, anchors, classes, boxes = _retinanet_case()
  out = jax.jit(retinanet_loss, static_argnames=("box_loss", "normalizer"))(
      logits, deltas, anchors, classes, boxes, box_loss="l1")
  targets = np.zeros((2, 3, 2))
  targets[0, 0, 1] = 1
  focal = _focal_reference(logits, targets).sum(-1)
  focal[0, 2] = 0  # ignored anchor
  expected_deltas = np.asarray(encode_boxes(boxes[0, :1], anchors[:1]))
  box = np.abs(deltas[0, 0] - expected_deltas[0]).sum()
  np.testing.assert_allclose(out["num_foreground"], 1.0)
  np.testing.assert_allclose(out["classification_loss"], focal.sum() / 1, rtol=1e-5)
  np.testing.assert_allclose(out["box_loss"], box, rtol=1e-5)
  image = retinanet_loss(logits, deltas, anchors, classes, boxes, box_loss="l1", normalizer="image")
  np.testing.assert_allclose(image["classification_loss"], (focal[0].sum() / 1 + focal[1].sum() / 1) / 2,
                             rtol=1e-5)
  np.testing.assert_allclose(image["box_loss"], box / 2, rtol=1e-5)


def test_retinanet_loss_gradients_finite_with_padding():
  logits, deltas, anchors, classes, boxes = _retinanet_case()
  for box_loss in ("l1", "smooth_l1", "giou"):
    grads = jax.grad(lambda l, d: retinanet_loss(l, d, anchors, classes, boxes, box_loss=box_loss)["loss"],
                     argnums=(0, 1))(logits, deltas)
    assert all(np.all(np.isfinite(g)) for g in grads)
    # Background-only image: no box gradient.
    np.testing.assert_array_equal(grads[1][1], 0.0)


def test_retinanet_loss_rejects_mismatched_shapes():
  logits, deltas, anchors, classes, boxes = _retinanet_case()
  with pytest.raises(ValueError, match="anchors"):
    retinanet_loss(logits, deltas, anchors[:2], classes, boxes)
  with pytest.raises(ValueError, match="box_loss"):
    retinanet_loss(logits, deltas, anchors, classes, boxes, box_loss="l2")
