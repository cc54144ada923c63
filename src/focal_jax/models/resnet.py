"""ResNet backbones (18/34/50/101/152) that return the C2-C5 feature maps.

The layout follows torchvision's `resnet*` so that a weight converter maps one
tensor to one variable: the stem is `conv1` + `bn1` (7x7 stride 2, padding 3,
then a 3x3 stride-2 max pool with padding 1), blocks are named
`layer{stage}_{index}` with sub-modules `conv1`, `bn1`, `conv2`, `bn2`
(`conv3`, `bn3` for bottlenecks) and `downsample_conv` / `downsample_bn`.
Bottlenecks put the stride on the 3x3 conv (ResNet v1.5). Convolutions have no
bias and use explicit symmetric padding (torchvision's), never "SAME".

Every stride-2 layer maps a size `n` to `ceil(n / 2)`, so level `l` (stride
`2**l`) has `ceil(...ceil(H / 2)... / 2)` rows for any input size: the feature
sizes `focal_jax.ops.anchors.feature_sizes` assumes.

Batch norm comes in two kinds (`norm=`), both from `focal_jax.models.norms`
and both applied with the block's residual sum and ReLU fused in:

* `"bn"`: `BatchNorm`, `flax.linen.BatchNorm`'s semantics and variables
  (momentum 0.9 = torch's 0.1, epsilon 1e-5): `scale`/`bias` in `params`,
  `mean`/`var` in `batch_stats`, batch statistics used and running averages
  updated when `train=True`.
* `"frozen_bn"`: `FrozenBatchNorm`, as torchvision's `FrozenBatchNorm2d` and
  detectron2's `FrozenBN` for pretrained backbones: running statistics always,
  and all four of `scale`, `bias`, `mean`, `var` live in the `batch_stats`
  collection, so an optimizer over `params` never sees them.

`cpu_rewrites` chooses how XLA computes the convolutions, the batch norms
and the stem's max pool (`focal_jax.models.cpu_rewrites`); it never changes
the variables.

`frozen_stages` freezes the stem and the first stages (detectron2's
`FREEZE_AT`): gradients stop at their output, and `trainable_mask` tells the
optimizer which parameters to leave alone (weight decay included).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from focal_jax.models.cpu_rewrites import CpuRewrites, make_conv, stem_max_pool
from focal_jax.models.norms import BatchNorm, FrozenBatchNorm

Array = jax.Array
Dtype = Any

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu"), not truncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

RESNET_STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
RESNET_BLOCKS = {18: "basic", 34: "basic", 50: "bottleneck", 101: "bottleneck", 152: "bottleneck"}
NORMS = ("bn", "frozen_bn")


class BasicBlock(nn.Module):
  """ResNet-18/34 block: two 3x3 convs, identity or 1x1-projection shortcut."""

  features: int
  strides: int
  conv: Any
  norm: Any
  expansion = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_features = self.features * self.expansion
    y = self.conv(self.features, (3, 3), (self.strides,) * 2, ((1, 1), (1, 1)), name="conv1")(x)
    y = self.norm(name="bn1")(y, relu=True)
    y = self.conv(self.features, (3, 3), (1, 1), ((1, 1), (1, 1)), name="conv2")(y)
    return self.norm(name="bn2")(y, residual=_shortcut(self, x, out_features), relu=True)


class BottleneckBlock(nn.Module):
  """ResNet-50/101/152 block: 1x1, 3x3 (carries the stride, v1.5), 1x1 x4."""

  features: int
  strides: int
  conv: Any
  norm: Any
  expansion = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_features = self.features * self.expansion
    y = self.conv(self.features, (1, 1), (1, 1), ((0, 0), (0, 0)), name="conv1")(x)
    y = self.norm(name="bn1")(y, relu=True)
    y = self.conv(self.features, (3, 3), (self.strides,) * 2, ((1, 1), (1, 1)), name="conv2")(y)
    y = self.norm(name="bn2")(y, relu=True)
    y = self.conv(out_features, (1, 1), (1, 1), ((0, 0), (0, 0)), name="conv3")(y)
    return self.norm(name="bn3")(y, residual=_shortcut(self, x, out_features), relu=True)


def _shortcut(block: nn.Module, x: Array, out_features: int) -> Array:
  """Identity, or a strided 1x1 conv + norm when the shape changes (torchvision's)."""
  if block.strides == 1 and x.shape[-1] == out_features:
    return x
  x = block.conv(out_features, (1, 1), (block.strides,) * 2, ((0, 0), (0, 0)),
                 name="downsample_conv")(x)
  return block.norm(name="downsample_bn")(x)


class ResNet(nn.Module):
  """A ResNet trunk without the classifier, returning `{2: C2, 3: C3, 4: C4, 5: C5}`.

  `C_l` has stride `2**l` and `width * 2**(l - 2) * expansion` channels
  (expansion 1 for basic blocks, 4 for bottlenecks): 512/1024/2048 for C3-C5 of
  ResNet-50. Unused levels cost nothing under jit.

  Attributes:
    stage_sizes: blocks per stage (see `RESNET_STAGE_SIZES`).
    block: "basic" or "bottleneck".
    width: channels of the stem and of the first stage's 3x3 convs (64).
    norm: "bn" (trainable batch norm) or "frozen_bn" (`FrozenBatchNorm`).
    frozen_stages: 0 trains everything; 1 freezes the stem; `s >= 2` also
      freezes stages `layer1 .. layer{s-1}` (detectron2's FREEZE_AT; torchvision's
      `trainable_backbone_layers=t` is `frozen_stages = 5 - t`). Implemented with
      `stop_gradient`; use `trainable_mask` in the optimizer as well.
    dtype: computation dtype (e.g. bfloat16); parameters stay `param_dtype`.
    param_dtype: parameter dtype (float32).
    cpu_rewrites: how the convolutions, batch norms and max pool are computed
      (`CpuRewrites`); the variables are the same for every choice.
  """

  stage_sizes: Sequence[int] = RESNET_STAGE_SIZES[50]
  block: str = "bottleneck"
  width: int = 64
  norm: str = "bn"
  frozen_stages: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  cpu_rewrites: CpuRewrites = CpuRewrites()

  def __post_init__(self):
    super().__post_init__()
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"block must be 'basic' or 'bottleneck'; got {self.block!r}.")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}; got {self.norm!r}.")
    if not self.stage_sizes or min(self.stage_sizes) < 1:
      raise ValueError(f"stage_sizes must be positive block counts; got {self.stage_sizes}.")
    if self.width < 1:
      raise ValueError(f"width must be positive; got {self.width}.")
    if not 0 <= self.frozen_stages <= len(self.stage_sizes) + 1:
      raise ValueError(
          f"frozen_stages must be in [0, {len(self.stage_sizes) + 1}]; got {self.frozen_stages}.")

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[int, Array]:
    """Runs the trunk on NHWC images; `train` selects batch statistics for "bn"."""
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC images of rank 4; got shape {x.shape}.")

    conv = functools.partial(make_conv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=conv_kernel_init,
                             cpu_rewrites=self.cpu_rewrites)
    if self.norm == "frozen_bn":
      norm = functools.partial(FrozenBatchNorm, dtype=self.dtype)
    else:
      norm = functools.partial(BatchNorm, use_running_average=not train, dtype=self.dtype,
                               param_dtype=self.param_dtype,
                               fused=self.cpu_rewrites.fused_batch_norm)
    block_cls = BasicBlock if self.block == "basic" else BottleneckBlock

    x = jnp.asarray(x, self.dtype)
    x = conv(self.width, (7, 7), (2, 2), ((3, 3), (3, 3)), name="conv1")(x)
    x = norm(name="bn1")(x, relu=True)
    x = stem_max_pool(x, self.cpu_rewrites)
    if self.frozen_stages >= 1:
      x = jax.lax.stop_gradient(x)
    features = {}
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = block_cls(self.width * 2**stage, strides, conv, norm,
                      name=f"layer{stage + 1}_{index}")(x)
      if self.frozen_stages >= stage + 2:
        x = jax.lax.stop_gradient(x)
      features[stage + 2] = x
    return features


def build_resnet(depth: int, **overrides) -> ResNet:
  """The ResNet of a standard depth (18, 34, 50, 101, 152); `overrides` set any field.

  E.g. `build_resnet(50, norm="frozen_bn", cpu_rewrites=CpuRewrites(kernel_grad_as_matmul="wide"))`.
  """
  if depth not in RESNET_STAGE_SIZES:
    raise ValueError(f"depth must be one of {sorted(RESNET_STAGE_SIZES)}; got {depth}.")
  fields = dict(stage_sizes=RESNET_STAGE_SIZES[depth], block=RESNET_BLOCKS[depth])
  return ResNet(**{**fields, **overrides})


def _frozen_module_names(frozen_stages: int) -> tuple[set[str], tuple[str, ...]]:
  names = {"conv1", "bn1"} if frozen_stages >= 1 else set()
  prefixes = tuple(f"layer{stage}_" for stage in range(1, frozen_stages))
  return names, prefixes


def trainable_mask(params: Any, frozen_stages: int) -> Any:
  """Boolean pytree (same structure as `params`): False for frozen backbone parameters.

  Works on the `params` of a `ResNet` or of a model that holds one under the
  key `backbone` (as `RetinaNet` does). Use it so that the optimizer leaves
  the frozen stages alone, weight decay included (a zero gradient alone does
  not stop decoupled weight decay), e.g.
  `optax.multi_transform({True: tx, False: optax.set_to_zero()}, trainable_mask(params, 2))`
  or `optax.masked(optax.add_decayed_weights(wd), mask)`.
  """
  names, prefixes = _frozen_module_names(frozen_stages)

  def is_trainable(path, _):
    keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    if keys and keys[0] == "backbone":
      keys = keys[1:]
    if not keys:
      return True
    module = str(keys[0])
    return not (module in names or module.startswith(prefixes))

  return jax.tree_util.tree_map_with_path(is_trainable, params)
