"""RetinaNet's classification and box subnets, shared across pyramid levels.

Each subnet is `num_convs x (3x3 conv, [GroupNorm,] ReLU)` then a 3x3
predictor conv with `num_anchors * num_outputs` channels. Weights are
normal(std 0.01) with zero biases, except the classification predictor's bias,
`-log((1 - prior) / prior)`, so every anchor starts at foreground probability
`prior` (0.01) and the focal loss is not swamped by background at step 0
(paper, Sec. 4.1). With `norm="group_norm"` (torchvision v2) the tower convs
have no bias and a GroupNorm(32, eps 1e-5) follows each.

A level's prediction `[B, H, W, A * K]` is read as `[B, H, W, A, K]`
(channel `a * K + k`, as torchvision's `view(N, A, K, H, W)`) and flattened to
`[B, H * W * A, K]`, i.e. `(y, x, anchor)` order; levels are concatenated in
order, matching `focal_jax.anchors.generate_anchors`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

head_kernel_init = nn.initializers.normal(stddev=0.01)
HEAD_NORMS = (None, "group_norm")


def _conv3x3(x: Array, kernel: Array) -> Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _kernel_grad_as_matmul(x: Array, grad: Array) -> Array:
  """The 3x3 kernel's gradient as one product: `[9 * C_in, pixels] x [pixels, C_out]`."""
  _, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifted = jnp.concatenate([padded[:, dy:dy + height, dx:dx + width]
                             for dy in range(3) for dx in range(3)], axis=-1)
  product = jnp.dot(shifted.reshape(-1, 9 * channels).T, grad.reshape(-1, grad.shape[-1]))
  return product.reshape(3, 3, channels, grad.shape[-1])


@jax.custom_vjp
def widening_conv3x3(x: Array, kernel: Array) -> Array:
  """A 3x3, stride-1, padding-1 convolution (NHWC, HWIO) for an output wider than the input.

  The value and the gradients are a plain convolution's, but on CPU the
  kernel's gradient is computed as one matrix product over the nine shifted
  inputs: XLA:CPU's convolution kernel gradient runs at half that speed when
  the output is several times wider than the input (COCO's classifier,
  256 -> 819 channels at 64x64, batch 2: 435 ms against 215 ms).
  """
  return _conv3x3(x, kernel)


def _widening_conv3x3_fwd(x, kernel):
  return _conv3x3(x, kernel), (x, kernel)


def _widening_conv3x3_bwd(residuals, grad):
  x, kernel = residuals
  x_grad, = jax.vjp(lambda x: _conv3x3(x, kernel), x)[1](grad)
  kernel_grad = jax.lax.platform_dependent(
      x, grad, cpu=_kernel_grad_as_matmul,
      default=lambda x, grad: jax.vjp(lambda k: _conv3x3(x, k), kernel)[1](grad)[0])
  return x_grad, kernel_grad.astype(kernel.dtype)


widening_conv3x3.defvjp(_widening_conv3x3_fwd, _widening_conv3x3_bwd)


class PredictorConv(nn.Module):
  """The subnets' last 3x3 conv: `nn.Conv(features, (3, 3), padding=1)`'s variables and result.

  When the output is at least twice as wide as the input (the classifier),
  it runs as `widening_conv3x3`, whose kernel gradient is faster on CPU.
  """

  features: int
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = head_kernel_init
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    conv = widening_conv3x3 if self.features >= 2 * x.shape[-1] else _conv3x3
    return conv(x, kernel) + bias


def prior_bias(prior_prob: float) -> float:
  """The logit whose sigmoid is `prior_prob`: `-log((1 - p) / p)`."""
  if not 0.0 < prior_prob < 1.0:
    raise ValueError(f"prior_prob must be in (0, 1); got {prior_prob}.")
  return -math.log((1.0 - prior_prob) / prior_prob)


class RetinaNetSubnet(nn.Module):
  """One conv tower + predictor applied to every level; returns `[B, sum(H*W*A), num_outputs]`.

  Attributes:
    num_outputs: values per anchor (K classes, or 4 box deltas).
    num_anchors: anchors per location (A).
    num_convs: tower depth (4).
    channels: tower width (256).
    norm: None or "group_norm".
    norm_groups: GroupNorm groups (32).
    bias_init_value: predictor bias (0, or `prior_bias(0.01)` for classification).
    dtype: computation dtype; parameters stay `param_dtype`.
    param_dtype: parameter dtype (float32).
  """

  num_outputs: int
  num_anchors: int = 9
  num_convs: int = 4
  channels: int = 256
  norm: str | None = None
  norm_groups: int = 32
  bias_init_value: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Array]) -> Array:
    if self.norm not in HEAD_NORMS:
      raise ValueError(f"head norm must be one of {HEAD_NORMS}; got {self.norm!r}.")
    convs, norms = [], []
    for i in range(self.num_convs):
      convs.append(nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)),
                           use_bias=self.norm is None, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=head_kernel_init,
                           bias_init=nn.initializers.zeros, name=f"conv{i}"))
      if self.norm == "group_norm":
        norms.append(nn.GroupNorm(num_groups=self.norm_groups, epsilon=1e-5, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"norm{i}"))
    predictor = PredictorConv(self.num_anchors * self.num_outputs, dtype=self.dtype,
                              param_dtype=self.param_dtype,
                              bias_init=nn.initializers.constant(self.bias_init_value),
                              name="predictor")
    outputs = []
    for x in features:
      x = jnp.asarray(x, self.dtype)
      for i, conv in enumerate(convs):
        x = conv(x)
        if norms:
          x = norms[i](x)
        x = nn.relu(x)
      x = predictor(x)
      batch, height, width, _ = x.shape
      outputs.append(x.reshape(batch, height * width * self.num_anchors, self.num_outputs))
    return jnp.concatenate(outputs, axis=1)


class RetinaNetHead(nn.Module):
  """The classification and box subnets; returns `(cls_logits, box_deltas)`.

  Shapes `[B, A_total, num_classes]` and `[B, A_total, 4]`, in the order of
  the features given (finest level first) and `(y, x, anchor)` within a level.
  Attributes are those of `RetinaNetSubnet`, plus the classification prior.
  """

  num_classes: int
  num_anchors: int = 9
  num_convs: int = 4
  channels: int = 256
  norm: str | None = None
  norm_groups: int = 32
  prior_prob: float = 0.01
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Array]) -> tuple[Array, Array]:
    common = dict(num_anchors=self.num_anchors, num_convs=self.num_convs, channels=self.channels,
                  norm=self.norm, norm_groups=self.norm_groups, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    cls_logits = RetinaNetSubnet(self.num_classes, bias_init_value=prior_bias(self.prior_prob),
                                 name="classification_head", **common)(features)
    box_deltas = RetinaNetSubnet(4, name="regression_head", **common)(features)
    return cls_logits, box_deltas
