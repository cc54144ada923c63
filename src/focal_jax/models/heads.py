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
order, matching `focal_jax.ops.anchors.generate_anchors`. `cpu_rewrites`
chooses how XLA computes the convolutions (`focal_jax.models.cpu_rewrites`),
never their variables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from focal_jax.models.cpu_rewrites import Conv3x3, CpuRewrites

Array = jax.Array
Dtype = Any

head_kernel_init = nn.initializers.normal(stddev=0.01)
HEAD_NORMS = (None, "group_norm")


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
    cpu_rewrites: how the convolutions are computed (`CpuRewrites`).
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
  cpu_rewrites: CpuRewrites = CpuRewrites()

  def __post_init__(self):
    super().__post_init__()
    if self.norm not in HEAD_NORMS:
      raise ValueError(f"head norm must be one of {HEAD_NORMS}; got {self.norm!r}.")
    if self.num_outputs < 1 or self.num_anchors < 1 or self.channels < 1 or self.num_convs < 0:
      raise ValueError(f"a head needs positive outputs, anchors and channels and >= 0 convs; got "
                       f"{self.num_outputs}, {self.num_anchors}, {self.channels} and {self.num_convs}.")
    if self.norm == "group_norm" and (self.norm_groups < 1 or self.channels % self.norm_groups):
      raise ValueError(f"GroupNorm needs a group count that divides the head's {self.channels} channels; "
                       f"got {self.norm_groups}.")

  @nn.compact
  def __call__(self, features: Sequence[Array]) -> Array:
    convs, norms = [], []
    for i in range(self.num_convs):
      convs.append(Conv3x3(self.channels, use_bias=self.norm is None, dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=head_kernel_init,
                           bias_init=nn.initializers.zeros, cpu_rewrites=self.cpu_rewrites,
                           name=f"conv{i}"))
      if self.norm == "group_norm":
        norms.append(nn.GroupNorm(num_groups=self.norm_groups, epsilon=1e-5, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name=f"norm{i}"))
    predictor = Conv3x3(self.num_anchors * self.num_outputs, use_bias=True, dtype=self.dtype,
                        param_dtype=self.param_dtype, kernel_init=head_kernel_init,
                        bias_init=nn.initializers.constant(self.bias_init_value),
                        cpu_rewrites=self.cpu_rewrites, name="predictor")
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
  cpu_rewrites: CpuRewrites = CpuRewrites()

  def __post_init__(self):
    super().__post_init__()
    self._subnets(parent=None)  # built unbound, so that a bad field fails here

  def _subnets(self, **kwargs) -> tuple[RetinaNetSubnet, RetinaNetSubnet]:
    common = dict(num_anchors=self.num_anchors, num_convs=self.num_convs, channels=self.channels,
                  norm=self.norm, norm_groups=self.norm_groups, dtype=self.dtype,
                  param_dtype=self.param_dtype, cpu_rewrites=self.cpu_rewrites, **kwargs)
    return (RetinaNetSubnet(self.num_classes, bias_init_value=prior_bias(self.prior_prob),
                            name="classification_head", **common),
            RetinaNetSubnet(4, name="regression_head", **common))

  @nn.compact
  def __call__(self, features: Sequence[Array]) -> tuple[Array, Array]:
    classification, regression = self._subnets()
    return classification(features), regression(features)
