"""RetinaNet = ResNet + FPN + shared heads (Lin et al., ICCV 2017).

`RetinaNet(...)(images)` maps NHWC images `[B, H, W, 3]` of any size to
`(cls_logits [B, A_total, K], box_deltas [B, A_total, 4])` in float32, in the
order of `focal_jax.ops.anchors.generate_anchors((H, W), config)` for the same
levels and anchors per location (level `l` has `ceil(H / 2**l) x ceil(W / 2**l)`
locations, computed by repeated ceil-halving).

Variables: `params` (float32) and `batch_stats` (BatchNorm running statistics
and, for `backbone_norm="frozen_bn"`, the frozen batch norms' scale/bias too).
Train with `model.apply(variables, images, train=True, mutable=["batch_stats"])`.

The named constructors mirror torchvision's:

| constructor | backbone | P6 from | head norm |
| --- | --- | --- | --- |
| `retinanet_resnet50_fpn` | ResNet-50 | P5 | none |
| `retinanet_resnet50_fpn_v2` | ResNet-50 | C5 | GroupNorm(32) |
| `retinanet_resnet101_fpn` | ResNet-101 | P5 | none |

Their defaults are the pretrained-backbone recipe of the paper, detectron2 and
torchvision with weights (frozen batch norm, stem + res2 frozen:
`frozen_stages=2`). To train a backbone from scratch, as torchvision's
`weights=None` models do, pass `backbone_norm="bn", frozen_stages=0`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from focal_jax.models.cpu_rewrites import CpuRewrites
from focal_jax.models.fpn import FPN
from focal_jax.models.heads import RetinaNetHead
from focal_jax.models.resnet import RESNET_BLOCKS, RESNET_STAGE_SIZES, ResNet, trainable_mask

Array = jax.Array
Dtype = Any


class RetinaNet(nn.Module):
  """The RetinaNet detector's network; every size and option is a field.

  Attributes:
    num_classes: K, foreground classes (no background class; sigmoid outputs).
    depth: ResNet depth (18, 34, 50, 101, 152); `stage_sizes`/`block` override it.
    stage_sizes: blocks per ResNet stage, e.g. `(1, 1, 1, 1)` for a tiny test net.
    block: "basic" or "bottleneck".
    width: ResNet base width (64); small values (8-16) give fast toy models.
    backbone_norm: "frozen_bn" or "bn" (see `focal_jax.models.resnet`).
    frozen_stages: 0 = train all, 1 = freeze the stem, 2 = stem + res2, ...
    fpn_channels: channels of P levels (256).
    p6_from: "p5" (torchvision v1) or "c5" (torchvision v2, detectron2).
    min_level, max_level: pyramid levels (3..7); must match the anchors.
    num_anchors: anchors per location (9 = 3 ratios x 3 scales).
    head_convs, head_channels: depth and width of each head tower (4, 256).
    head_norm: None or "group_norm" (v2); `head_norm_groups` groups (32).
    prior_prob: initial foreground probability (0.01).
    dtype: computation dtype (bfloat16 on accelerators); outputs are float32.
    param_dtype: parameter dtype (float32).
    cpu_rewrites: how XLA computes the convolutions, batch norms and max pool
      (`CpuRewrites`); every choice has the same variables, so it can differ
      between the run that wrote a checkpoint and the one that reads it.
  """

  num_classes: int = 91
  depth: int = 50
  stage_sizes: Sequence[int] | None = None
  block: str | None = None
  width: int = 64
  backbone_norm: str = "frozen_bn"
  frozen_stages: int = 2
  fpn_channels: int = 256
  p6_from: str = "p5"
  min_level: int = 3
  max_level: int = 7
  num_anchors: int = 9
  head_convs: int = 4
  head_channels: int = 256
  head_norm: str | None = None
  head_norm_groups: int = 32
  prior_prob: float = 0.01
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  cpu_rewrites: CpuRewrites = CpuRewrites()

  def __post_init__(self):
    super().__post_init__()
    if self.num_classes < 1:
      raise ValueError(f"num_classes must be positive; got {self.num_classes}.")
    if not 2 <= self.min_level <= min(self.max_level, 5):
      raise ValueError(f"need 2 <= min_level <= min(max_level, 5); got min_level="
                       f"{self.min_level}, max_level={self.max_level}.")
    if self.stage_sizes is None and self.depth not in RESNET_STAGE_SIZES:
      raise ValueError(f"depth must be one of {sorted(RESNET_STAGE_SIZES)}; got {self.depth}.")
    self._parts(parent=None)  # built unbound, so that a bad field of a part fails here

  def _parts(self, **kwargs) -> tuple[ResNet, FPN, RetinaNetHead]:
    """The backbone, the FPN and the head, with this model's fields."""
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, cpu_rewrites=self.cpu_rewrites, **kwargs)
    backbone = ResNet(
        stage_sizes=tuple(self.stage_sizes or RESNET_STAGE_SIZES[self.depth]),
        block=self.block or RESNET_BLOCKS.get(self.depth, "bottleneck"),
        width=self.width, norm=self.backbone_norm, frozen_stages=self.frozen_stages, name="backbone",
        **common)
    fpn = FPN(channels=self.fpn_channels, min_level=self.min_level, max_level=self.max_level,
              p6_from=self.p6_from, name="fpn", **common)
    head = RetinaNetHead(
        num_classes=self.num_classes, num_anchors=self.num_anchors, num_convs=self.head_convs,
        channels=self.head_channels, norm=self.head_norm, norm_groups=self.head_norm_groups,
        prior_prob=self.prior_prob, name="head", **common)
    return backbone, fpn, head

  @nn.compact
  def __call__(self, images: Array, train: bool = False) -> tuple[Array, Array]:
    """Returns float32 `(cls_logits [B, A_total, K], box_deltas [B, A_total, 4])`."""
    images = jnp.asarray(images)
    if images.ndim != 4:
      raise ValueError(f"RetinaNet expects NHWC images [B, H, W, 3]; got shape {images.shape}.")
    if images.shape[-1] != 3:
      raise ValueError(
          f"RetinaNet expects 3 channels (NHWC RGB) in the last axis; got shape {images.shape}.")
    backbone, fpn, head = self._parts()
    pyramid = fpn(backbone(images, train=train))
    cls_logits, box_deltas = head([pyramid[l] for l in range(self.min_level, self.max_level + 1)])
    return cls_logits.astype(jnp.float32), box_deltas.astype(jnp.float32)

  def trainable_mask(self, params: Any) -> Any:
    """`trainable_mask(params, self.frozen_stages)`: False on the frozen backbone stages."""
    return trainable_mask(params, self.frozen_stages)


def retinanet_resnet50_fpn(num_classes: int = 91, **overrides: Any) -> RetinaNet:
  """torchvision's `retinanet_resnet50_fpn`: ResNet-50, P6 from P5, no head norm.

  With `backbone_norm="bn"` it has torchvision's 34,068,119 parameters for 91
  classes; with the default frozen batch norm, 34,014,999 of them in `params`.
  """
  fields = dict(depth=50, p6_from="p5", head_norm=None)
  return RetinaNet(num_classes=num_classes, **{**fields, **overrides})


def retinanet_resnet50_fpn_v2(num_classes: int = 91, **overrides: Any) -> RetinaNet:
  """torchvision's `retinanet_resnet50_fpn_v2`: ResNet-50, P6 from C5, GroupNorm heads."""
  fields = dict(depth=50, p6_from="c5", head_norm="group_norm")
  return RetinaNet(num_classes=num_classes, **{**fields, **overrides})


def retinanet_resnet101_fpn(num_classes: int = 91, **overrides: Any) -> RetinaNet:
  """RetinaNet with a ResNet-101 backbone (the paper's main model), P6 from P5."""
  fields = dict(depth=101, p6_from="p5", head_norm=None)
  return RetinaNet(num_classes=num_classes, **{**fields, **overrides})
