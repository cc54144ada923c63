"""Convolutions with `nn.Conv`'s variables, computed the way XLA:CPU runs fastest.

Each module here declares exactly `nn.Conv`'s variables (`kernel [kh, kw,
C_in, C_out]`, optional `bias [C_out]`) and returns `nn.Conv`'s result, so
weights convert and checkpoints load unchanged; only the computation differs:

* `PointwiseConv`: a 1x1 convolution as one `[pixels, C_in] x [C_in, C_out]`
  matrix product (forward and backward several times faster on XLA:CPU than
  a 1x1 `conv_general_dilated`).
* `StridedConv3x3`: a 3x3, stride-2, padding-1 convolution whose input
  gradient is four stride-1 convolutions, one per phase of the input, instead
  of XLA's convolution over a zero-dilated gradient (up to 3x faster on CPU).
* `Conv3x3`: a 3x3 stride-1 convolution whose kernel gradient can be nine
  matrix products, one per shifted input (`kernel_grad_as_matmul`).

The gradient rewrites are taken on CPU only (`lax.platform_dependent`); other
backends keep XLA's own.

Where the nine products pay depends on the CPU. They always do for outputs at
least twice as wide as the input (COCO's classifier: 2x faster). For other 3x3
kernels (stride 1 or 2) with at least `MATMUL_MIN_CHANNELS` input channels
they replace XLA's kernel gradient only where XLA's is slow: on some x86 CPUs
XLA:CPU's (YNNPACK's) kernel gradient of a batch-2 3x3 convolution runs at a
quarter of its forward pass's rate, on others at its full rate.
`matmul_kernel_grad_pays()` decides once per process by timing both on one
problem; the environment variable `FOCAL_JAX_CONV_KERNEL_GRAD` (`xla` or
`matmul`) overrides it.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

_NHWC = ("NHWC", "HWIO", "NHWC")


class ConvVariables(nn.Module):
  """Base of the modules here: `nn.Conv`'s attributes (the kernel size is each module's own)."""

  features: int
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  def variables_for(self, x: Array, kernel_size: tuple[int, int]) -> tuple[Array, Array, Array | None]:
    """`(x, kernel, bias)` declared as `nn.Conv` declares them, promoted to `dtype`."""
    kernel = self.param("kernel", self.kernel_init, (*kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) \
        if self.use_bias else None
    return nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)


def _add_bias(y: Array, bias: Array | None) -> Array:
  return y if bias is None else y + bias


class PointwiseConv(ConvVariables):
  """`nn.Conv(features, (1, 1), strides, padding=0)` as a matrix product.

  Stride `s` reads rows and columns `0, s, 2s, ...` (`ceil(n / s)` of them).
  """

  strides: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self.variables_for(x, (1, 1))
    if self.strides != 1:
      x = x[:, ::self.strides, ::self.strides]
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0]).reshape(*x.shape[:-1], self.features)
    return _add_bias(y, bias)


def _strided_conv(x: Array, kernel: Array) -> Array:
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def _input_grad_by_phase(grad: Array, kernel: Array, height: int, width: int) -> Array:
  """The input gradient of `_strided_conv`, phase by phase of the padded input.

  Output `(i, j)` reads padded input `(2i + a, 2j + b)` for taps `a, b` in
  0..2. Even padded rows receive taps 0 and 2 (from outputs `i` and `i - 1`),
  odd rows tap 1; likewise for columns. Each of the four (row, column) phases
  is so a stride-1 convolution of `grad` with its taps of the kernel (2x2,
  2x1, 1x2, 1x1), the kernel read as `[.., C_out, C_in]`; the phases are then
  interleaved and the padding cropped.
  """

  def phase(taps, row_padding, col_padding):
    return jax.lax.conv_general_dilated(grad, taps, (1, 1), (row_padding, col_padding),
                                        dimension_numbers=("NHWC", "HWOI", "NHWC"))

  # Every phase comes out [out_h + 1, out_w + 1]; odd phases end with a zero row/column.
  even_even = phase(kernel[::-2, ::-2], (1, 1), (1, 1))
  even_odd = phase(kernel[::-2, 1:2], (1, 1), (0, 1))
  odd_even = phase(kernel[1:2, ::-2], (0, 1), (1, 1))
  odd_odd = phase(kernel[1:2, 1:2], (0, 1), (0, 1))
  batch, rows, cols, channels = even_even.shape
  padded = jnp.stack([jnp.stack([even_even, even_odd], 3), jnp.stack([odd_even, odd_odd], 3)], 2)
  return padded.reshape(batch, 2 * rows, 2 * cols, channels)[:, 1:height + 1, 1:width + 1]


@jax.custom_vjp
def strided_conv3x3(x: Array, kernel: Array) -> Array:
  """A 3x3, stride-2, padding-1 convolution (NHWC, HWIO); on CPU, the input gradient by phase."""
  return _strided_conv(x, kernel)


def _strided_conv3x3_fwd(x, kernel):
  return _strided_conv(x, kernel), (x, kernel)


def _strided_conv3x3_bwd(residuals, grad):
  x, kernel = residuals
  _, height, width, _ = x.shape
  x_grad = jax.lax.platform_dependent(
      grad, kernel, cpu=lambda grad, kernel: _input_grad_by_phase(grad, kernel, height, width),
      default=lambda grad, kernel: jax.vjp(lambda x: _strided_conv(x, kernel), x)[1](grad)[0])
  kernel_grad = jax.lax.platform_dependent(
      x, grad, cpu=lambda x, grad: _cpu_kernel_grad(x, grad, kernel, 2, widening=False),
      default=lambda x, grad: _xla_kernel_grad(_strided_conv, x, grad, kernel))
  return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


strided_conv3x3.defvjp(_strided_conv3x3_fwd, _strided_conv3x3_bwd)


class StridedConv3x3(ConvVariables):
  """`nn.Conv(features, (3, 3), (2, 2), padding=((1, 1), (1, 1)))` through `strided_conv3x3`."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self.variables_for(x, (3, 3))
    return _add_bias(strided_conv3x3(x, kernel), bias)


def _conv3x3(x: Array, kernel: Array) -> Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def _xla_kernel_grad(conv, x: Array, grad: Array, kernel: Array) -> Array:
  """XLA's own gradient of `conv(x, kernel)` with respect to `kernel`, for the output gradient `grad`."""
  return jax.vjp(lambda k: conv(x, k), kernel)[1](grad)[0]


def kernel_grad_as_matmul(x: Array, grad: Array, stride: int = 1) -> Array:
  """The gradient of a 3x3, padding-1 convolution's kernel as nine matrix products, one per tap.

  Tap `(dy, dx)` of the kernel meets the padded input at rows `dy, dy + s,
  ...` and columns `dx, dx + s, ...` (stride `s`); its gradient is that
  slice, as `[pixels, C_in]`, transposed times `grad` as `[pixels, C_out]`.
  XLA copies each slice for its product; one product over the nine slices
  concatenated (9 x C_in channels per pixel) measured slower.
  """
  channels = x.shape[-1]
  out_h, out_w = grad.shape[1:3]
  rows, cols = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  grad = grad.reshape(-1, grad.shape[-1])
  taps = [jnp.dot(padded[:, dy:dy + rows:stride, dx:dx + cols:stride].reshape(-1, channels).T, grad)
          for dy in range(3) for dx in range(3)]
  return jnp.stack(taps).reshape(3, 3, channels, grad.shape[-1])


MATMUL_MIN_CHANNELS = 128
KERNEL_GRAD_CHOICES = ("xla", "matmul")
_PROBE_SHAPE = (2, 32, 32, 256)  # batch 2 at P4 of a 512x512 input, 256 -> 256 channels


def _best_of(fn, *args, calls: int = 3) -> float:
  jax.block_until_ready(fn(*args))  # compiles
  times = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


@functools.cache
def matmul_kernel_grad_pays() -> bool:
  """Whether `kernel_grad_as_matmul` replaces XLA's 3x3 kernel gradient in this process (on CPU).

  `FOCAL_JAX_CONV_KERNEL_GRAD=xla` or `=matmul` decides; unset, both are
  timed once on a `[2, 32, 32, 256]` input and a 256-channel gradient (under
  a second), and the nine products are taken when XLA's takes more than 1.5
  times as long, so that a CPU where the two are close keeps XLA's from run
  to run. On a 2-core Ice Lake Xeon XLA's took 44-60 ms against 15-19 ms (the
  R50-FPN train step 16% faster with the products); on the 2-core machine
  this project was first tuned on, XLA's was the faster. Always False when
  JAX's default backend is not the CPU.
  """
  choice = os.environ.get("FOCAL_JAX_CONV_KERNEL_GRAD")
  if choice is not None:
    if choice not in KERNEL_GRAD_CHOICES:
      raise ValueError(f"FOCAL_JAX_CONV_KERNEL_GRAD must be one of {KERNEL_GRAD_CHOICES}; got {choice!r}.")
    return choice == "matmul"
  if jax.default_backend() != "cpu":
    return False
  with jax.ensure_compile_time_eval():
    x = jnp.asarray(np.random.default_rng(0).normal(size=_PROBE_SHAPE), jnp.float32)
    kernel = jnp.zeros((3, 3, x.shape[-1], x.shape[-1]), jnp.float32)
    xla = jax.jit(lambda x, grad: _xla_kernel_grad(_conv3x3, x, grad, kernel))
    matmul = jax.jit(kernel_grad_as_matmul)
    return _best_of(xla, x, x) > 1.5 * _best_of(matmul, x, x)


def _cpu_kernel_grad(x: Array, grad: Array, kernel: Array, stride: int, widening: bool) -> Array:
  """The kernel gradient on CPU: nine products where they pay (see the module docstring), else XLA's."""
  if widening or (x.shape[-1] >= MATMUL_MIN_CHANNELS and matmul_kernel_grad_pays()):
    return kernel_grad_as_matmul(x, grad, stride)
  return _xla_kernel_grad(_conv3x3 if stride == 1 else _strided_conv, x, grad, kernel)


@jax.custom_vjp
def conv3x3(x: Array, kernel: Array) -> Array:
  """A 3x3, stride-1, padding-1 convolution (NHWC, HWIO).

  The value and the gradients are a plain convolution's. On CPU, the
  kernel's gradient is computed as matrix products over the nine shifted
  inputs when the output is at least twice as wide as the input (XLA:CPU's
  convolution kernel gradient runs at half that speed there: COCO's
  classifier, 256 -> 819 channels at 64x64, batch 2, 435 against 215 ms) and,
  for `MATMUL_MIN_CHANNELS` or more input channels, where
  `matmul_kernel_grad_pays()`.
  """
  return _conv3x3(x, kernel)


def _conv3x3_fwd(x, kernel):
  return _conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, grad):
  x, kernel = residuals
  x_grad, = jax.vjp(lambda x: _conv3x3(x, kernel), x)[1](grad)
  widening = kernel.shape[-1] >= 2 * kernel.shape[-2]
  kernel_grad = jax.lax.platform_dependent(
      x, grad, cpu=lambda x, grad: _cpu_kernel_grad(x, grad, kernel, 1, widening),
      default=lambda x, grad: _xla_kernel_grad(_conv3x3, x, grad, kernel))
  return x_grad, kernel_grad.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(ConvVariables):
  """`nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)))` through `conv3x3`."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self.variables_for(x, (3, 3))
    return _add_bias(conv3x3(x, kernel), bias)


def make_conv(features: int, kernel_size: tuple[int, int], strides: tuple[int, int], padding,
              **kwargs) -> nn.Module:
  """`nn.Conv(features, kernel_size, strides, padding, **kwargs)` or its faster equivalent here.

  An unpadded 1x1 kernel becomes `PointwiseConv`, a 3x3 padding-1 one
  `StridedConv3x3` (stride 2) or `Conv3x3` (stride 1); anything else stays
  `nn.Conv`.
  """
  kernel_size, strides = tuple(kernel_size), tuple(strides)
  padding = tuple(map(tuple, padding))
  if kernel_size == (1, 1) and padding == ((0, 0), (0, 0)) and strides[0] == strides[1]:
    return PointwiseConv(features, strides=strides[0], **kwargs)
  if kernel_size == (3, 3) and padding == ((1, 1), (1, 1)) and strides == (2, 2):
    return StridedConv3x3(features, **kwargs)
  if kernel_size == (3, 3) and padding == ((1, 1), (1, 1)) and strides == (1, 1):
    return Conv3x3(features, **kwargs)
  return nn.Conv(features, kernel_size, strides, padding, **kwargs)
