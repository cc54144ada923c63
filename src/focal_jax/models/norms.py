"""The backbone's batch norms, each with the block's residual sum and ReLU fused in.

Both modules compute `act(norm(x) + residual)`, where the residual and the
ReLU are optional (`residual=None`, `relu=False` give the plain norm), and
declare the variables of their peers, so checkpoints and weight converters see
no difference:

* `BatchNorm`: `flax.linen.BatchNorm`'s semantics and variables (`scale`,
  `bias` in `params`; float32 `mean`, `var` in `batch_stats`). In training
  the batch statistics normalize and update the running averages, through
  `focal_jax.models.cpu_rewrites.batch_norm_train` (one custom VJP for the
  normalization, residual and ReLU) or, with `fused=False`, the same formula
  as plain operations differentiated by autodiff.
* `FrozenBatchNorm`: torchvision's `FrozenBatchNorm2d` (fixed statistics, all
  four vectors in `batch_stats`, no gradient).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from focal_jax.models.cpu_rewrites import batch_norm_composed, batch_norm_train, residual_relu

Array = jax.Array
Dtype = Any

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # flax convention; torch's momentum=0.1


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
    fused: in training, normalize through `batch_norm_train` (closed-form
      gradient) rather than `batch_norm_composed` (autodiff); the values are
      the same (`CpuRewrites.fused_batch_norm`).
  """

  use_running_average: bool = False
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  fused: bool = True

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
      return residual_relu(x.astype(jnp.float32) * mul + add, residual, relu, dtype)
    normalize = batch_norm_train if self.fused else batch_norm_composed
    y, mean, var = normalize(x, scale, bias, residual, relu, self.epsilon)
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
    return residual_relu(x.astype(dtype) * mul.astype(dtype) + add.astype(dtype), residual, relu,
                         dtype)
