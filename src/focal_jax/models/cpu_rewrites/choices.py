"""`CpuRewrites`: which rewrites the network computes with (see the package docstring)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from focal_jax._fields import check_field_types
from focal_jax.models.cpu_rewrites.winograd import output_blocks

KERNEL_GRAD_MODES = ("never", "widening", "wide")
WIDE_MIN_CHANNELS = 128
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_MIN_BLOCKS = 128


@dataclasses.dataclass(frozen=True)
class CpuRewrites:
  """Which rewrites of `focal_jax.models.cpu_rewrites` the network computes with.

  Frozen and hashable, so that it can be a field of the Flax modules and of
  a config. No field changes the variables or, beyond float rounding, any
  value; each changes only how XLA computes it (see the package docstring).

  Attributes:
    pointwise_conv_as_matmul: unpadded 1x1 convolutions are one matrix
      product, because XLA:CPU runs matrix products several times faster than
      1x1 convolutions.
    strided_conv_input_grad_by_phase: on CPU, the input gradient of a 3x3
      stride-2 convolution is four stride-1 convolutions, one per input phase,
      because XLA's own convolves a zero-dilated gradient, three multiplies in
      four by zero.
    kernel_grad_as_matmul: which 3x3 convolutions get, on CPU, their kernel
      gradient as nine matrix products, because XLA:CPU's own is slow there:
      "never"; "widening" (stride-1 convolutions whose output is at least
      twice as wide as their input, slow on every CPU); "wide" (those and
      every 3x3 convolution, stride 1 or 2, with at least `WIDE_MIN_CHANNELS`
      input channels, slow on some CPUs only).
    fused_batch_norm: training batch norm with its residual sum and ReLU is
      one custom VJP with the closed-form gradient, because autodiff of the
      composed operations makes XLA:CPU write and re-read every intermediate.
    max_pool_grad_by_phase: the stem's 3x3 stride-2 max pool is nine strided
      slices with a gradient scattered by phase, because XLA:CPU's
      `select_and_scatter`, the gradient of `nn.max_pool`, is several times
      slower.
    winograd_conv3x3: on CPU, float32 3x3 stride-1 convolutions with at
      least `WINOGRAD_MIN_CHANNELS` input channels and `WINOGRAD_MIN_BLOCKS`
      4x4 output blocks (batch included) are computed, with their gradients,
      by Winograd's F(4x4, 3x3), with a quarter of the multiplies (and a
      larger rounding error, about 1e-5 of the output's scale); smaller ones
      run faster as XLA's own.
  """

  pointwise_conv_as_matmul: bool = True
  strided_conv_input_grad_by_phase: bool = True
  kernel_grad_as_matmul: str = "widening"
  fused_batch_norm: bool = True
  max_pool_grad_by_phase: bool = True
  winograd_conv3x3: bool = True

  def __post_init__(self):
    check_field_types(self, "cpu_rewrites")
    if self.kernel_grad_as_matmul not in KERNEL_GRAD_MODES:
      raise ValueError(f"cpu_rewrites.kernel_grad_as_matmul must be one of "
                       f"{', '.join(map(repr, KERNEL_GRAD_MODES))}; got {self.kernel_grad_as_matmul!r}.")

  def kernel_grad_by_matmul(self, in_channels: int, out_channels: int, stride: int) -> bool:
    """Whether a 3x3 convolution's kernel gradient is nine matrix products on CPU.

    Args:
      in_channels: the convolution's input channels (`C_in`).
      out_channels: its output channels (`C_out`).
      stride: its stride, 1 or 2.
    """
    if self.kernel_grad_as_matmul == "never":
      return False
    widening = stride == 1 and out_channels >= 2 * in_channels
    return widening or (self.kernel_grad_as_matmul == "wide" and in_channels >= WIDE_MIN_CHANNELS)

  def winograd(self, x: jax.Array) -> bool:
    """Whether a 3x3, stride-1, padding-1 convolution of `x` `[N, H, W, C_in]` is Winograd's on CPU.

    A batch size unknown when tracing (a symbolic dimension of `jax.export`)
    counts as 1, the least it can be.
    """
    batch = x.shape[0] if isinstance(x.shape[0], int) else 1
    return (self.winograd_conv3x3 and x.dtype == jnp.float32 and x.shape[-1] >= WINOGRAD_MIN_CHANNELS
            and output_blocks((batch, *x.shape[1:])) >= WINOGRAD_MIN_BLOCKS)


def on_cpu(rewrite, xla, *args):
  """`rewrite(*args)` when the computation runs on CPU, `xla(*args)` on every other backend."""
  return jax.lax.platform_dependent(*args, cpu=rewrite, default=xla)
