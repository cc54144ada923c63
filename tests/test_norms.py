"""Tests of focal_jax.models.norms against float64 formulas, autodiff and flax's BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax.models import BatchNorm, FrozenBatchNorm, batch_norm_train

SHAPE = (2, 5, 7, 6)  # odd sizes, a few channels
EPS = 1e-5
VARIANTS = [(None, False), (None, True), ("residual", False), ("residual", True)]


def _inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = 3.0 + 2.0 * jax.random.normal(keys[0], SHAPE)  # mean far from 0, as after a conv
  scale = 1.0 + 0.5 * jax.random.normal(keys[1], SHAPE[-1:])
  bias = 0.5 * jax.random.normal(keys[2], SHAPE[-1:])
  residual = jax.random.normal(keys[3], SHAPE)
  return x, scale, bias, residual


def _reference64(x, scale, bias, residual, relu):
  """The paper's batch norm in float64 numpy: biased batch variance over N, H, W."""
  x, scale, bias = (np.asarray(v, np.float64) for v in (x, scale, bias))
  mean = x.mean(axis=(0, 1, 2))
  var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
  y = (x - mean) / np.sqrt(var + EPS) * scale + bias
  if residual is not None:
    y = y + np.asarray(residual, np.float64)
  return (np.maximum(y, 0.0) if relu else y), mean, var


def _composed(x, scale, bias, residual, relu):
  """The same formula as composed jnp operations, for autodiff."""
  mean = jnp.mean(x, (0, 1, 2))
  var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
  y = (x - mean) * jax.lax.rsqrt(var + EPS) * scale + bias
  if residual is not None:
    y = y + residual
  return (jnp.maximum(y, 0.0) if relu else y), mean, var


@pytest.mark.parametrize("residual_kind,relu", VARIANTS)
def test_batch_norm_train_matches_the_float64_formula(residual_kind, relu):
  x, scale, bias, residual = _inputs()
  residual = residual if residual_kind else None
  outputs = batch_norm_train(x, scale, bias, residual, relu, EPS)
  for got, expected in zip(outputs, _reference64(x, scale, bias, residual, relu)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("residual_kind,relu", VARIANTS)
def test_batch_norm_train_gradients_match_autodiff_of_the_formula(residual_kind, relu):
  x, scale, bias, residual = _inputs(1)
  residual = residual if residual_kind else None
  keys = jax.random.split(jax.random.key(2), 3)
  cotangents = (jax.random.normal(keys[0], SHAPE), jax.random.normal(keys[1], SHAPE[-1:]),
                jax.random.normal(keys[2], SHAPE[-1:]))
  fused = lambda *args: batch_norm_train(*args, relu, EPS)
  composed = lambda *args: _composed(*args, relu)
  _, fused_vjp = jax.vjp(fused, x, scale, bias, residual)
  _, composed_vjp = jax.vjp(composed, x, scale, bias, residual)
  got, expected = fused_vjp(cotangents), composed_vjp(cotangents)
  for name, g, e in zip(("x", "scale", "bias", "residual"), got, expected):
    if e is None:
      assert g is None
      continue
    np.testing.assert_allclose(g, e, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(e))), err_msg=name)


def test_batch_norm_module_matches_flax_batch_norm_in_training_and_evaluation():
  x, _, _, residual = _inputs(3)
  ours, peer = BatchNorm(), nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=EPS)
  variables = ours.init(jax.random.key(0), x)
  peer_variables = peer.init(jax.random.key(0), x)
  assert jax.tree.map(lambda v: (v.shape, v.dtype), variables) == \
      jax.tree.map(lambda v: (v.shape, v.dtype), peer_variables)
  params = {"scale": 1.0 + 0.3 * jax.random.normal(jax.random.key(4), SHAPE[-1:]),
            "bias": 0.2 * jax.random.normal(jax.random.key(5), SHAPE[-1:])}
  variables = {"params": params, "batch_stats": variables["batch_stats"]}

  y, updates = ours.apply(variables, x, residual, True, mutable=["batch_stats"])
  peer_y, peer_updates = peer.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y, jnp.maximum(peer_y + residual, 0.0), rtol=1e-5, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(updates["batch_stats"][name], peer_updates["batch_stats"][name],
                               rtol=1e-5, atol=1e-6)
  _, mean, var = _reference64(x, params["scale"], params["bias"], None, False)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)

  trained = {"params": params, **updates}
  y_eval = BatchNorm(use_running_average=True).apply(trained, x)
  peer_eval = nn.BatchNorm(use_running_average=True, epsilon=EPS).apply(trained, x)
  np.testing.assert_allclose(y_eval, peer_eval, rtol=1e-5, atol=1e-5)


def test_batch_norm_init_leaves_the_running_statistics_alone():
  variables = BatchNorm().init(jax.random.key(0), _inputs()[0])
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(SHAPE[-1]))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(SHAPE[-1]))


def test_batch_norm_bfloat16_keeps_float32_statistics():
  x = _inputs()[0].astype(jnp.bfloat16)
  module = BatchNorm(dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  y, updates = module.apply(variables, x, relu=True, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert updates["batch_stats"]["mean"].dtype == jnp.float32
  expected, mean, _ = _reference64(x.astype(jnp.float32), 1.0, 0.0, None, True)
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, atol=0.05)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-3)


def test_frozen_batch_norm_adds_the_residual_before_the_relu():
  x, _, _, residual = _inputs(6)
  stats = {"scale": jnp.full(SHAPE[-1:], 2.0), "bias": jnp.full(SHAPE[-1:], -7.0),
           "mean": jnp.full(SHAPE[-1:], 1.0), "var": jnp.full(SHAPE[-1:], 4.0)}
  y = FrozenBatchNorm().apply({"batch_stats": stats}, x, residual, True)
  expected = np.maximum((np.asarray(x) - 1.0) / np.sqrt(4.0 + EPS) * 2.0 - 7.0 + np.asarray(residual), 0.0)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  assert 0 < np.mean(expected == 0) < 1  # the ReLU clips some values, not all
