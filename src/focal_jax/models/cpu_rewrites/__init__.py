"""Computations that give the values of XLA's own operations in a way XLA:CPU runs faster.

Each rewrite computes the values (and the gradients) of a plain Flax or XLA
operation another way, for a pattern of RetinaNet's network that XLA:CPU's
own implementation handles slowly, and each is switched by one field of
`CpuRewrites`, which every model module takes as `cpu_rewrites`. No choice
changes the variables (names, shapes, initial values) or, beyond float
rounding, the results, so checkpoints and converted weights serve any of them.

* **1x1 convolution as a matrix product** (`PointwiseConv`,
  `pointwise_conv_as_matmul`). An unpadded 1x1 convolution is one
  `[pixels, C_in] x [C_in, C_out]` product. As `jnp.dot`, it and (by
  autodiff) its two gradients run on XLA:CPU's matrix-multiplication
  kernels; as `conv_general_dilated` they run on its convolution kernels,
  several times slower for these shapes.
* **Input gradient of a 3x3 stride-2 convolution by phase**
  (`StridedConv3x3`, `strided_conv_input_grad_by_phase`). XLA computes it as
  a stride-1 convolution over the output gradient dilated with zeros, so
  three multiplies in four are by zero, and XLA:CPU's fast convolution
  kernels do not take dilated inputs. Each (row, column) parity of the input
  receives only some taps of the kernel, so the gradient is four stride-1
  convolutions of the undilated gradient (with the kernel's 2x2, 2x1, 1x2
  and 1x1 taps), interleaved.
* **Kernel gradient of a 3x3 convolution as nine matrix products**
  (`Conv3x3`, `StridedConv3x3`, `kernel_grad_as_matmul`). XLA computes a
  kernel gradient as a convolution whose batch is the input channels and
  whose features are the images of the batch; XLA:CPU runs that convolution
  far below the rate of the forward pass when the output is much wider than
  the input (the classifier's predictor), and, on some CPUs but not others,
  for every 3x3 convolution with many channels. Tap `(dy, dx)`'s gradient is
  the input shifted by the tap, as `[C_in, pixels]`, times the output
  gradient as `[pixels, C_out]`: nine matrix products.
* **Winograd's F(4x4, 3x3) for wide 3x3 convolutions** (`Conv3x3`,
  `winograd_conv3x3`, module `winograd`). A float32 3x3 stride-1
  convolution with at least `WINOGRAD_MIN_CHANNELS` input channels and
  `WINOGRAD_MIN_BLOCKS` 4x4 blocks of output (the RetinaNet heads and FPN
  outputs at P3-P4, ResNet-50's res3 and res4) is 36 matrix products between
  transformed 6x6 input windows and the transformed kernel, a quarter of the
  direct convolution's multiplies, forward and (by autodiff) backward. Its
  rounding error is larger, about 1e-5 of the output's scale against 1e-6;
  narrower or smaller convolutions are faster as XLA's own.
* **Fused training batch norm** (`batch_norm_train`, `fused_batch_norm`).
  The normalization, the block's residual sum and its ReLU are one custom
  VJP whose backward pass is the closed-form gradient: one reduction and one
  elementwise pass over the input, the output and the output's gradient.
  Autodiff of the composed operations (`batch_norm_composed`) makes XLA:CPU
  write and re-read each intermediate result.
* **The stem's max pool** (`max_pool_3x3_s2`, `max_pool_grad_by_phase`).
  The 3x3 stride-2 max pool is the maximum of nine strided slices; under
  autodiff it records the winning slice of every window and scatters the
  gradient by phase of the input in a few elementwise passes. XLA's gradient of
  `reduce_window`'s max (`nn.max_pool`) is a `select_and_scatter`, which
  XLA:CPU runs several times slower.

Where each applies. Winograd's convolution, the stride-2 input gradient by
phase and the kernel gradient as nine products are taken on the CPU only:
they choose with `jax.lax.platform_dependent` and give XLA's own convolution
or gradient on every other backend, and the convolutions' forward passes
other than Winograd's are XLA's everywhere.
The other three apply on every backend, forward and backward: the 1x1
convolution's matrix product, the nine-slice max pool with its phase-by-phase
gradient, and the fused batch norm. Setting their fields to False gives XLA's
own operations (on an accelerator, say).

The defaults take every rewrite, Winograd's convolution where it applies (it
takes precedence), the kernel gradient as nine products only for the other
stride-1 3x3 convolutions whose output is at least twice as wide as their
input; `kernel_grad_as_matmul="wide"` extends it to every 3x3
convolution with `WIDE_MIN_CHANNELS` or more input channels, for CPUs where
XLA:CPU's own kernel gradient of those is slow.
"""

# The rewrites, one file per kind: choices (the config), convolution, winograd, max_pool, batch_norm.
from focal_jax.models.cpu_rewrites.batch_norm import batch_norm_composed, batch_norm_train, residual_relu
from focal_jax.models.cpu_rewrites.choices import (
    KERNEL_GRAD_MODES,
    WIDE_MIN_CHANNELS,
    WINOGRAD_MIN_BLOCKS,
    WINOGRAD_MIN_CHANNELS,
    CpuRewrites,
)
from focal_jax.models.cpu_rewrites.convolution import (
    Conv3x3,
    PointwiseConv,
    StridedConv3x3,
    conv3x3,
    kernel_grad_as_matmul,
    make_conv,
    strided_conv3x3,
)
from focal_jax.models.cpu_rewrites.max_pool import max_pool_3x3_s2, stem_max_pool
from focal_jax.models.cpu_rewrites.winograd import winograd_conv3x3

__all__ = [
    "KERNEL_GRAD_MODES", "WIDE_MIN_CHANNELS", "WINOGRAD_MIN_BLOCKS", "WINOGRAD_MIN_CHANNELS", "Conv3x3",
    "CpuRewrites", "PointwiseConv", "StridedConv3x3",
    "batch_norm_composed", "batch_norm_train", "conv3x3", "kernel_grad_as_matmul", "make_conv",
    "max_pool_3x3_s2", "residual_relu", "stem_max_pool", "strided_conv3x3", "winograd_conv3x3",
]
