"""Training-mode batch norm with the residual sum and ReLU fused into one custom VJP."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


def residual_relu(z: Array, residual: Array | None, relu: bool, dtype: Dtype) -> Array:
  """`act(z + residual)` cast to `dtype`: the end of every batch norm of `focal_jax.models.norms`."""
  if residual is not None:
    z = z + residual.astype(z.dtype)
  if relu:
    z = jnp.maximum(z, 0)
  return z.astype(dtype)


def _moments(x: Array) -> tuple[Array, Array]:
  """Per-channel float32 mean and (biased) variance over all but the last axis, in one pass."""
  axes = tuple(range(x.ndim - 1))
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axes)
  var = jnp.maximum(jnp.mean(jnp.square(x), axes) - jnp.square(mean), 0.0)
  return mean, var


def batch_norm_composed(x: Array, scale: Array, bias: Array, residual: Array | None, relu: bool,
                        epsilon: float) -> tuple[Array, Array, Array]:
  """Training-mode batch norm with an optional residual sum and ReLU, as plain operations.

  Returns `(y, mean, var)`: `y = act(scale * (x - mean) / sqrt(var + eps) +
  bias + residual)` in `x`'s dtype, and the float32 per-channel batch mean and
  biased variance (over every axis but the last) that normalized it. The
  variance is `E[x^2] - E[x]^2` (clamped at 0), as `flax.linen.BatchNorm`'s
  default. Differentiated by autodiff; `batch_norm_train` gives the same
  values with the closed-form gradient.
  """
  mean, var = _moments(x)
  mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var + epsilon)
  y = residual_relu(x.astype(jnp.float32) * mul + (bias.astype(jnp.float32) - mean * mul), residual,
                    relu, x.dtype)
  return y, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm_train(x: Array, scale: Array, bias: Array, residual: Array | None, relu: bool,
                     epsilon: float) -> tuple[Array, Array, Array]:
  """`batch_norm_composed` with its closed-form gradient (a custom VJP).

  Returns `(y, mean, var)` as `batch_norm_composed` does. Differentiable in
  `x`, `scale`, `bias` and `residual`, through all three outputs.
  """
  return batch_norm_composed(x, scale, bias, residual, relu, epsilon)


def _batch_norm_forward(x, scale, bias, residual, relu, epsilon):
  y, mean, var = batch_norm_composed(x, scale, bias, residual, relu, epsilon)
  inv_std = jax.lax.rsqrt(var + epsilon)
  return (y, mean, var), (x, y if relu else None, scale, bias, residual, mean, inv_std)


def _batch_norm_backward(relu, epsilon, saved, cotangents):
  """The closed-form gradient: one reduction and one elementwise pass over the activations.

  With `x_hat = (x - mean) * inv_std` and `g` the gradient at the
  normalized, shifted value (the output's gradient where the ReLU passed it):
  `d bias = sum(g)`, `d scale = sum(g * x_hat)`, `d residual = g` and
  `dx = scale * inv_std * (g - d bias / n - x_hat * d scale / n)`, plus the
  terms of the `mean` and `var` outputs' gradients (`d mean / n` and
  `2 * d var * (x - mean) / n`). `dx` is affine in `x` per channel once `g`
  is known: `dx = a * g + c1 * x + c0`.
  """
  del epsilon
  x, y, scale, bias, residual, mean, inv_std = saved
  y_cotangent, mean_cotangent, var_cotangent = cotangents
  g = y_cotangent.astype(jnp.float32)
  if relu:
    g = jnp.where(y > 0, g, 0.0)
  axes = tuple(range(x.ndim - 1))
  count = x.size // x.shape[-1]
  x32 = x.astype(jnp.float32)
  sum_g = jnp.sum(g, axes)
  d_scale = jnp.sum(g * (x32 - mean), axes) * inv_std
  a = scale.astype(jnp.float32) * inv_std
  c1 = (2.0 * var_cotangent - a * inv_std * d_scale) / count
  c0 = (mean_cotangent - a * sum_g) / count - c1 * mean
  dx = (a * g + c1 * x32 + c0).astype(x.dtype)
  d_residual = None if residual is None else g.astype(residual.dtype)
  return dx, d_scale.astype(scale.dtype), sum_g.astype(bias.dtype), d_residual


batch_norm_train.defvjp(_batch_norm_forward, _batch_norm_backward)
