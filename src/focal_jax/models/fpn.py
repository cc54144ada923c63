"""Feature Pyramid Network (Lin et al., 2017) with RetinaNet's P6/P7.

P3-P5 (or `min_level`..5): a 1x1 lateral conv per backbone level, a top-down
path that upsamples the coarser merged map with nearest-neighbour
interpolation to the lateral's exact size (torchvision's
`F.interpolate(size=..., mode="nearest")`, so odd sizes work), and a 3x3
output conv. P6 is a stride-2 3x3 conv on C5 (`p6_from="c5"`: detectron2,
torchvision v2) or on P5 (`p6_from="p5"`: torchvision v1); P7 and beyond are
stride-2 3x3 convs after a ReLU. All convs have biases, kaiming-uniform(a=1)
kernels (LeCun uniform) and zero biases, as torchvision's `FeaturePyramidNetwork`
and `LastLevelP6P7`. Stride-2 convs pad by 1, mapping size `n` to `ceil(n / 2)`.
`cpu_rewrites` chooses how XLA computes the convolutions
(`focal_jax.models.cpu_rewrites`), never their variables.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from focal_jax.models.cpu_rewrites import CpuRewrites, make_conv

Array = jax.Array
Dtype = Any

# torchvision: nn.init.kaiming_uniform_(w, a=1) -> uniform(+-sqrt(3 / fan_in)).
fpn_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
BACKBONE_MAX_LEVEL = 5


def upsample_nearest(x: Array, size: Sequence[int]) -> Array:
  """Nearest-neighbour resize of NHWC `x` to `size = (height, width)`.

  Same indices as torch's `F.interpolate(mode="nearest", size=size)`:
  output row `i` reads input row `floor(i * in / out)`. For the FPN's case
  (`out` is `2 * in` or `2 * in - 1`) this is a 2x repeat then a crop.
  """
  _, in_h, in_w, _ = x.shape
  out_h, out_w = size
  if out_h in (2 * in_h, 2 * in_h - 1) and out_w in (2 * in_w, 2 * in_w - 1):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, :out_h, :out_w]
  rows = np.floor(np.arange(out_h) * (in_h / out_h)).astype(np.int32)
  cols = np.floor(np.arange(out_w) * (in_w / out_w)).astype(np.int32)
  return x[:, rows][:, :, cols]


class FPN(nn.Module):
  """Turns backbone features `{level: C_level}` into `{level: P_level}`, min..max level.

  Attributes:
    channels: channels of every P level (256).
    min_level: finest output level (needs `C_min_level` from the backbone).
    max_level: coarsest output level; levels above 5 come from stride-2 convs.
    p6_from: "p5" (torchvision v1) or "c5" (detectron2, torchvision v2).
    dtype: computation dtype; parameters stay `param_dtype`.
    param_dtype: parameter dtype (float32).
    cpu_rewrites: how the convolutions are computed (`CpuRewrites`).
  """

  channels: int = 256
  min_level: int = 3
  max_level: int = 7
  p6_from: str = "p5"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  cpu_rewrites: CpuRewrites = CpuRewrites()

  def __post_init__(self):
    super().__post_init__()
    if not 1 <= self.min_level <= min(self.max_level, BACKBONE_MAX_LEVEL):
      raise ValueError(f"need 1 <= min_level <= min(max_level, 5); got {self.min_level}, "
                       f"{self.max_level}.")
    if self.p6_from not in ("p5", "c5"):
      raise ValueError(f"p6_from must be 'p5' or 'c5'; got {self.p6_from!r}.")
    if self.channels < 1:
      raise ValueError(f"FPN channels must be positive; got {self.channels}.")

  @nn.compact
  def __call__(self, features: Mapping[int, Array]) -> dict[int, Array]:
    conv = functools.partial(make_conv, self.channels, use_bias=True, dtype=self.dtype,
                             param_dtype=self.param_dtype, kernel_init=fpn_kernel_init,
                             bias_init=nn.initializers.zeros, cpu_rewrites=self.cpu_rewrites)
    top = min(self.max_level, BACKBONE_MAX_LEVEL)
    missing = [l for l in range(self.min_level, top + 1) if l not in features]
    if missing:
      raise ValueError(f"FPN needs backbone levels {missing}; got levels {sorted(features)}.")

    outputs = {}
    inner = None
    for level in range(top, self.min_level - 1, -1):
      lateral = conv(kernel_size=(1, 1), strides=(1, 1), padding=((0, 0), (0, 0)),
                     name=f"lateral{level}")(
          features[level])
      if inner is not None:
        lateral = lateral + upsample_nearest(inner, lateral.shape[1:3])
      inner = lateral
      outputs[level] = conv(kernel_size=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                            name=f"output{level}")(inner)

    if self.max_level > BACKBONE_MAX_LEVEL:
      x = outputs[BACKBONE_MAX_LEVEL] if self.p6_from == "p5" else features[BACKBONE_MAX_LEVEL]
      for level in range(BACKBONE_MAX_LEVEL + 1, self.max_level + 1):
        if level > BACKBONE_MAX_LEVEL + 1:
          x = nn.relu(x)
        x = conv(kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name=f"p{level}")(
            jnp.asarray(x, self.dtype))
        outputs[level] = x
    return dict(sorted(outputs.items()))
