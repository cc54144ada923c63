"""The backbone's batch norms, each with the block's residual sum and ReLU fused in.

Both modules compute `act(norm(x) + residual)`, where the residual and the
ReLU are optional (`residual=None`, `relu=False` give the plain norm), and
declare the variables of their peers, so checkpoints and weight converters see
no difference:

* `BatchNorm`: `flax.linen.BatchNorm`'s semantics and variables (`scale`,
  `bias` in `params`; float32 `mean`, `var` in `batch_stats`). In training
  the batch statistics normalize and update the running averages; the
  normalization, residual and ReLU are one custom-VJP function whose backward
  pass reads the input, the output and the output's gradient twice (one
  reduction, one elementwise pass): autodiff of the composed operations makes
  XLA:CPU write and re-read the intermediate results of each.
* `FrozenBatchNorm`: torchvision's `FrozenBatchNorm2d` (fixed statistics, all
  four vectors in `batch_stats`, no gradient).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # flax convention; torch's momentum=0.1


def _finish(z: Array, residual: Array | None, relu: bool, dtype: Dtype) -> Array:
  """`act(z + residual)` cast to `dtype`."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def batch_norm_train(x: Array, scale: Array, bias: Array, residual: Array | None, relu: bool,
                     epsilon: float) -> tuple[Array, Array, Array]:
  """Training-mode batch norm with an optional residual sum and ReLU.

  Returns `(y, mean, var)`: `y = act(scale * (x - mean) / sqrt(var + eps) +
  bias + residual)` in `x`'s dtype, and the float32 per-channel batch mean and
  biased variance (over every axis but the last) that normalized it. The
  variance is `E[x^2] - E[x]^2` (clamped at 0), as `flax.linen.BatchNorm`'s
  default. Differentiable in `x`, `scale`, `bias` and `residual`, through all
  three outputs.
  """
  return _batch_norm_forward(x, scale, bias, residual, relu, epsilon)[0]


def _batch_norm_forward(x, scale, bias, residual, relu, epsilon):
  mean, var = _moments(x)
  inv_std = jax.lax.rsqrt(var + epsilon)
  mul = scale.astype(jnp.float32) * inv_std
  y = _finish(x.astype(jnp.float32) * mul + (bias.astype(jnp.float32) - mean * mul), residual, relu, x.dtype)
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


class BatchNorm(nn.Module):
  """Batch norm over the last axis, with an optional residual sum and ReLU fused in.

  `__call__(x, residual=None, relu=False)` returns
  `act(scale * (x - mean) / sqrt(var + eps) + bias + residual)`. With
  `use_running_average=False` the batch statistics normalize (float32,
  biased variance) and the running averages in `batch_stats` move by
  `momentum` (not while initializing), exactly as `flax.linen.BatchNorm`'s,
  whose variables it declares; with `True` the running averages normalize.

  Attributes:
    use_running_average: normalize with the running averages (inference,
      or a backbone whose statistics stay fixed).
    momentum: running-average decay (0.9 = torch's momentum 0.1).
    epsilon: added to the variance (1e-5, torch's).
    dtype: output dtype (default: the input's); statistics are float32.
    param_dtype: dtype of `scale` and `bias`.
  """

  use_running_average: bool = False
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, residual: Array | None = None, relu: bool = False) -> Array:
    features = (x.shape[-1],)
    scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
    dtype = self.dtype or x.dtype
    if self.use_running_average:
      mul = scale.astype(jnp.float32) * jax.lax.rsqrt(running_var.value + self.epsilon)
      add = bias.astype(jnp.float32) - running_mean.value * mul
      return _finish(x.astype(jnp.float32) * mul + add, residual, relu, dtype)
    y, mean, var = batch_norm_train(x, scale, bias, residual, relu, self.epsilon)
    if not self.is_initializing():
      running_mean.value = self.momentum * running_mean.value + (1.0 - self.momentum) * mean
      running_var.value = self.momentum * running_var.value + (1.0 - self.momentum) * var
    return y.astype(dtype)


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine parameters.

  Computes `x * scale / sqrt(var + eps) + (bias - mean * scale / sqrt(var + eps))`
  in every mode, exactly as torchvision's `FrozenBatchNorm2d` (eps 1e-5), then
  adds `residual` and applies the ReLU if asked. The four per-channel float32
  vectors `scale`, `bias`, `mean`, `var` are stored in the `batch_stats`
  collection (not `params`): they are never updated, they get no gradient
  (wrapped in `stop_gradient`), and an optimizer over `params` never sees
  them. A converter fills them from torchvision's `weight`, `bias`,
  `running_mean`, `running_var`.
  """

  epsilon: float = BN_EPSILON
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: Array, residual: Array | None = None, relu: bool = False) -> Array:
    features = x.shape[-1]
    init = lambda fn: (lambda: fn((features,), jnp.float32))
    scale = self.variable("batch_stats", "scale", init(jnp.ones)).value
    bias = self.variable("batch_stats", "bias", init(jnp.zeros)).value
    mean = self.variable("batch_stats", "mean", init(jnp.zeros)).value
    var = self.variable("batch_stats", "var", init(jnp.ones)).value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    mul, add = jax.lax.stop_gradient((mul, add))
    dtype = self.dtype or x.dtype
    return _finish(x.astype(dtype) * mul.astype(dtype) + add.astype(dtype), residual, relu, dtype)
