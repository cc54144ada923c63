"""Convolutions with `nn.Conv`'s variables whose gradients XLA:CPU computes faster."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from focal_jax.models.cpu_rewrites.choices import CpuRewrites, on_cpu
from focal_jax.models.cpu_rewrites.winograd import winograd_conv3x3

Array = jax.Array
Dtype = Any

_NHWC = ("NHWC", "HWIO", "NHWC")
# Each module declares exactly `nn.Conv`'s variables (`kernel [kh, kw, C_in,
# C_out]`, optional `bias [C_out]`) and returns its result.


class ConvVariables(nn.Module):
  """Base of the convolutions here: `nn.Conv`'s attributes (the kernel size is each module's own)."""

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


def _conv3x3(x: Array, kernel: Array) -> Array:
  """XLA's 3x3, stride-1, padding-1 convolution (NHWC, HWIO)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def _strided_conv(x: Array, kernel: Array) -> Array:
  """XLA's 3x3, stride-2, padding-1 convolution (NHWC, HWIO)."""
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


def _xla_kernel_grad(conv, x: Array, grad: Array, kernel: Array) -> Array:
  """XLA's own gradient of `conv(x, kernel)` with respect to `kernel`, for the output gradient `grad`."""
  return jax.vjp(lambda k: conv(x, k), kernel)[1](grad)[0]


def kernel_grad_as_matmul(x: Array, grad: Array, stride: int = 1) -> Array:
  """The gradient of a 3x3, padding-1 convolution's kernel as nine matrix products, one per tap.

  Tap `(dy, dx)` of the kernel meets the padded input at rows `dy, dy + s,
  ...` and columns `dx, dx + s, ...` (stride `s`); its gradient is that
  slice, as `[pixels, C_in]`, transposed times `grad` as `[pixels, C_out]`.

  Args:
    x: the convolution's input `[N, H, W, C_in]`.
    grad: the gradient of its output `[N, ceil(H / s), ceil(W / s), C_out]`.
    stride: `s`, 1 or 2.

  Returns:
    The kernel's gradient `[3, 3, C_in, C_out]` (HWIO).
  """
  channels = x.shape[-1]
  out_h, out_w = grad.shape[1:3]
  rows, cols = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  grad = grad.reshape(-1, grad.shape[-1])
  taps = [jnp.dot(padded[:, dy:dy + rows:stride, dx:dx + cols:stride].reshape(-1, channels).T, grad)
          for dy in range(3) for dx in range(3)]
  return jnp.stack(taps).reshape(3, 3, channels, grad.shape[-1])


@jax.custom_vjp
def conv3x3(x: Array, kernel: Array) -> Array:
  """XLA's 3x3, stride-1, padding-1 convolution (NHWC, HWIO); on CPU, its kernel gradient by taps.

  The value and the input gradient are XLA's; the kernel gradient is
  `kernel_grad_as_matmul` on CPU and XLA's own on other backends.
  """
  return _conv3x3(x, kernel)


def _conv3x3_fwd(x, kernel):
  return _conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, grad):
  x, kernel = residuals
  x_grad, = jax.vjp(lambda x: _conv3x3(x, kernel), x)[1](grad)
  kernel_grad = on_cpu(kernel_grad_as_matmul, lambda x, grad: _xla_kernel_grad(_conv3x3, x, grad, kernel),
                        x, grad)
  return x_grad, kernel_grad.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def _input_grad_by_phase(grad: Array, kernel: Array, height: int, width: int) -> Array:
  """The input gradient of `_strided_conv`, phase by phase of the padded input.

  Output `(i, j)` reads padded input `(2i + a, 2j + b)` for taps `a, b` in
  0..2. Even padded rows receive taps 0 and 2 (from outputs `i` and `i - 1`),
  odd rows tap 1; likewise for columns. Each of the four (row, column) phases
  is so a stride-1 convolution of `grad` with its taps of the kernel (2x2,
  2x1, 1x2, 1x1), the kernel read as `[.., C_out, C_in]`; the phases are then
  interleaved and the padding cropped to `[N, height, width, C_in]`.
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def strided_conv3x3(x: Array, kernel: Array, input_grad_by_phase: bool,
                    kernel_grad_by_matmul: bool) -> Array:
  """XLA's 3x3, stride-2, padding-1 convolution (NHWC, HWIO), its gradients rewritten on CPU.

  The value is XLA's. On CPU the input gradient is four stride-1
  convolutions, one per phase (`input_grad_by_phase`), and the kernel
  gradient `kernel_grad_as_matmul` (`kernel_grad_by_matmul`); each gradient
  not rewritten, and both on other backends, are XLA's own.
  """
  del input_grad_by_phase, kernel_grad_by_matmul
  return _strided_conv(x, kernel)


def _strided_conv3x3_fwd(x, kernel, input_grad_by_phase, kernel_grad_by_matmul):
  del input_grad_by_phase, kernel_grad_by_matmul
  return _strided_conv(x, kernel), (x, kernel)


def _strided_conv3x3_bwd(input_grad_by_phase, kernel_grad_by_matmul, residuals, grad):
  x, kernel = residuals
  _, height, width, _ = x.shape

  def xla_input_grad(grad, kernel):
    return jax.vjp(lambda x: _strided_conv(x, kernel), x)[1](grad)[0]

  def xla_kernel_grad(x, grad):
    return _xla_kernel_grad(_strided_conv, x, grad, kernel)

  if input_grad_by_phase:
    x_grad = on_cpu(lambda grad, kernel: _input_grad_by_phase(grad, kernel, height, width),
                     xla_input_grad, grad, kernel)
  else:
    x_grad = xla_input_grad(grad, kernel)
  if kernel_grad_by_matmul:
    kernel_grad = on_cpu(lambda x, grad: kernel_grad_as_matmul(x, grad, 2), xla_kernel_grad, x, grad)
  else:
    kernel_grad = xla_kernel_grad(x, grad)
  return x_grad.astype(x.dtype), kernel_grad.astype(kernel.dtype)


strided_conv3x3.defvjp(_strided_conv3x3_fwd, _strided_conv3x3_bwd)


class Conv3x3(ConvVariables):
  """`nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)))`, computed as `cpu_rewrites` says.

  On CPU through `winograd_conv3x3` where `cpu_rewrites.winograd(x)`; else
  through `conv3x3` where `cpu_rewrites.kernel_grad_by_matmul(C_in, C_out,
  1)`; else, and on other backends, XLA's own convolution and autodiff.
  """

  cpu_rewrites: CpuRewrites = CpuRewrites()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self.variables_for(x, (3, 3))
    if self.cpu_rewrites.winograd(x):
      return _add_bias(on_cpu(winograd_conv3x3, _conv3x3, x, kernel), bias)
    if self.cpu_rewrites.kernel_grad_by_matmul(kernel.shape[2], kernel.shape[3], 1):
      return _add_bias(conv3x3(x, kernel), bias)
    return _add_bias(_conv3x3(x, kernel), bias)


class StridedConv3x3(ConvVariables):
  """`nn.Conv(features, (3, 3), (2, 2), padding=((1, 1), (1, 1)))`, its gradients as `cpu_rewrites` says.

  Through `strided_conv3x3` where `cpu_rewrites` rewrites either gradient
  (`strided_conv_input_grad_by_phase`, `kernel_grad_by_matmul(C_in, C_out,
  2)`), else XLA's own convolution and autodiff.
  """

  cpu_rewrites: CpuRewrites = CpuRewrites()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x, kernel, bias = self.variables_for(x, (3, 3))
    by_phase = self.cpu_rewrites.strided_conv_input_grad_by_phase
    by_matmul = self.cpu_rewrites.kernel_grad_by_matmul(kernel.shape[2], kernel.shape[3], 2)
    if by_phase or by_matmul:
      return _add_bias(strided_conv3x3(x, kernel, by_phase, by_matmul), bias)
    return _add_bias(_strided_conv(x, kernel), bias)


def make_conv(features: int, kernel_size: tuple[int, int], strides: tuple[int, int], padding,
              cpu_rewrites: CpuRewrites = CpuRewrites(), **kwargs) -> nn.Module:
  """`nn.Conv(features, kernel_size, strides, padding, **kwargs)`, rewritten as `cpu_rewrites` says.

  An unpadded 1x1 kernel with equal strides becomes `PointwiseConv` (if
  `cpu_rewrites.pointwise_conv_as_matmul`), a 3x3 padding-1 one
  `StridedConv3x3` (stride 2) or `Conv3x3` (stride 1); anything else stays
  `nn.Conv`. The variables are `nn.Conv`'s in every case.
  """
  kernel_size, strides = tuple(kernel_size), tuple(strides)
  padding = tuple(map(tuple, padding))
  if (kernel_size == (1, 1) and padding == ((0, 0), (0, 0)) and strides[0] == strides[1]
      and cpu_rewrites.pointwise_conv_as_matmul):
    return PointwiseConv(features, strides=strides[0], **kwargs)
  if kernel_size == (3, 3) and padding == ((1, 1), (1, 1)) and strides == (2, 2):
    return StridedConv3x3(features, cpu_rewrites=cpu_rewrites, **kwargs)
  if kernel_size == (3, 3) and padding == ((1, 1), (1, 1)) and strides == (1, 1):
    return Conv3x3(features, cpu_rewrites=cpu_rewrites, **kwargs)
  return nn.Conv(features, kernel_size, strides, padding, **kwargs)
