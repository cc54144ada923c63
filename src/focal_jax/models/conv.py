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
* `widening_conv3x3`: a 3x3 stride-1 convolution whose kernel gradient is nine
  matrix products, one per shifted input, for outputs at least twice as wide
  as the input (2x faster on CPU).

The gradient rewrites are taken on CPU only (`lax.platform_dependent`); other
backends keep XLA's own.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
  kernel_grad, = jax.vjp(lambda kernel: _strided_conv(x, kernel), kernel)[1](grad)
  return x_grad.astype(x.dtype), kernel_grad


strided_conv3x3.defvjp(_strided_conv3x3_fwd, _strided_conv3x3_bwd)


class StridedConv3x3(ConvVariables):
  """`nn.Conv(features, (3, 3), (2, 2), padding=((1, 1), (1, 1)))` through `strided_conv3x3`."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self.variables_for(x, (3, 3))
    return _add_bias(strided_conv3x3(x, kernel), bias)


def _conv3x3(x: Array, kernel: Array) -> Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def _kernel_grad_as_matmul(x: Array, grad: Array) -> Array:
  """The 3x3 kernel's gradient as nine products `[C_in, pixels] x [pixels, C_out]`, one per tap.

  Each tap's shifted input is a slice of the padded input; the products read
  the slices directly (a single product over the nine slices concatenated
  costs a copy of all of them: 9 x C_in channels per pixel).
  """
  _, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  grad = grad.reshape(-1, grad.shape[-1])
  taps = [jnp.dot(padded[:, dy:dy + height, dx:dx + width].reshape(-1, channels).T, grad)
          for dy in range(3) for dx in range(3)]
  return jnp.stack(taps).reshape(3, 3, channels, grad.shape[-1])


@jax.custom_vjp
def widening_conv3x3(x: Array, kernel: Array) -> Array:
  """A 3x3, stride-1, padding-1 convolution (NHWC, HWIO) for an output wider than the input.

  The value and the gradients are a plain convolution's, but on CPU the
  kernel's gradient is computed as matrix products over the nine shifted
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


class Conv3x3(ConvVariables):
  """`nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)))`; `widening_conv3x3` when `features >= 2 C_in`."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self.variables_for(x, (3, 3))
    conv = widening_conv3x3 if self.features >= 2 * x.shape[-1] else _conv3x3
    return _add_bias(conv(x, kernel), bias)


def make_conv(features: int, kernel_size: tuple[int, int], strides: tuple[int, int], padding,
              **kwargs) -> nn.Module:
  """`nn.Conv(features, kernel_size, strides, padding, **kwargs)` or its faster equivalent here.

  An unpadded 1x1 kernel becomes `PointwiseConv`, a 3x3 stride-2 padding-1
  one `StridedConv3x3`; anything else stays `nn.Conv`.
  """
  kernel_size, strides = tuple(kernel_size), tuple(strides)
  padding = tuple(map(tuple, padding))
  if kernel_size == (1, 1) and padding == ((0, 0), (0, 0)) and strides[0] == strides[1]:
    return PointwiseConv(features, strides=strides[0], **kwargs)
  if kernel_size == (3, 3) and strides == (2, 2) and padding == ((1, 1), (1, 1)):
    return StridedConv3x3(features, **kwargs)
  return nn.Conv(features, kernel_size, strides, padding, **kwargs)
