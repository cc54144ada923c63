"""The 3x3, stride-1 convolution by Winograd's minimal filtering F(4x4, 3x3).

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR
2016). Each 4x4 block of output pixels is computed from the 6x6 block of
(padded) input pixels around it: both the input block and the 3x3 kernel are
carried into a 6x6 "transformed" space by fixed linear maps, there the
convolution is an elementwise product, and a third map brings the product
back to the 4x4 outputs:

    Y = A^T [(G K G^T) * (B^T X B)] A

For a layer with `C_in` input and `C_out` output channels, the elementwise
product, summed over the input channels, is 36 matrix products
`[blocks, C_in] x [C_in, C_out]`, one per position of the 6x6 space: 36
multiplies for 16 output pixels where the direct convolution does 144 (9 per
pixel), a quarter. The transforms are additions and multiplications by small
constants, each a pass over the data. Gradients come by autodiff: the
transposes of the transforms and the matrix products' gradients, which again
do a quarter of the direct convolution's multiplies.

The maps use the interpolation points 0, 1, -1, 2, -2 and infinity. Their
constants (up to 8 in `B` and `A`, fractions with denominators up to 24 in
`G`) make the rounding error larger than a direct convolution's: on
unit-variance inputs, about 1e-5 of the output's largest magnitude in
float32 against 1e-6, but a tenth in bfloat16 against 4e-3, so
`CpuRewrites.winograd` takes this path for float32 only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# B^T [6, 6], G [6, 3] and A^T [4, 6] for the points 0, 1, -1, 2, -2, infinity.
_INPUT_MAP = np.array([[4, 0, -5, 0, 1, 0],
                       [0, -4, -4, 1, 1, 0],
                       [0, 4, -4, -1, 1, 0],
                       [0, -2, -1, 2, 1, 0],
                       [0, 2, -1, -2, 1, 0],
                       [0, 4, 0, -5, 0, 1]])
_KERNEL_MAP = np.array([[1 / 4, 0, 0],
                        [-1 / 6, -1 / 6, -1 / 6],
                        [-1 / 6, 1 / 6, -1 / 6],
                        [1 / 24, 1 / 12, 1 / 6],
                        [1 / 24, -1 / 12, 1 / 6],
                        [0, 0, 1]])
_OUTPUT_MAP = np.array([[1, 1, 1, 1, 1, 0],
                        [0, 1, -1, 2, -2, 0],
                        [0, 1, 1, 4, 4, 0],
                        [0, 1, -1, 8, -8, 1]])
TILE = 4        # output pixels per block side
WINDOW = 6      # input pixels per block side (TILE + 2)


def _apply(matrix: np.ndarray, parts: list[Array]) -> Array:
  """`stack([sum_j matrix[i, j] * parts[j] for i])`: additions, with a multiply only for coefficients not +-1."""
  rows = []
  for coefficients in matrix:
    terms = [part if c == 1 else -part if c == -1 else part * np.asarray(c, part.dtype)
             for c, part in zip(coefficients, parts) if c != 0]
    rows.append(sum(terms[1:], terms[0]))
  return jnp.stack(rows)


def _transformed_input(x: Array, block_rows: int, block_cols: int) -> Array:
  """`B^T X B` for every 6x6 input window, as `[36, N * block_rows * block_cols, C_in]`.

  The input is padded by 1 before (the convolution's padding) and after to
  `block + 1` groups of 4 rows (columns); window `i` is then group `i` and
  the first two rows of group `i + 1`.
  """
  batch, height, width, channels = x.shape
  padded = jnp.pad(x, ((0, 0), (1, TILE * (block_rows + 1) - height - 1),
                       (1, TILE * (block_cols + 1) - width - 1), (0, 0)))
  groups = padded.reshape(batch, block_rows + 1, TILE, block_cols + 1, TILE, channels)
  window_rows = [groups[:, r // TILE:r // TILE + block_rows, r % TILE] for r in range(WINDOW)]
  by_rows = _apply(_INPUT_MAP, window_rows)                   # [6 (rows), N, bh, bw + 1, 4, C]
  window_cols = [by_rows[:, :, :, c // TILE:c // TILE + block_cols, c % TILE] for c in range(WINDOW)]
  return _apply(_INPUT_MAP, window_cols).reshape(WINDOW * WINDOW, -1, channels)   # [(cols, rows), ...]


def _transformed_kernel(kernel: Array) -> Array:
  """`G K G^T` as `[36, C_in, C_out]`, in the (columns, rows) order of `_transformed_input`."""
  by_rows = _apply(_KERNEL_MAP, [kernel[r] for r in range(3)])        # [6 (rows), 3 (cols), C_in, C_out]
  by_cols = _apply(_KERNEL_MAP, [by_rows[:, c] for c in range(3)])    # [6 (cols), 6 (rows), C_in, C_out]
  return by_cols.reshape(WINDOW * WINDOW, *kernel.shape[2:])


def _output(products: Array, batch: int, block_rows: int, block_cols: int) -> Array:
  """`A^T M A` for every block, the 4x4 blocks laid out as `[N, 4 * block_rows, 4 * block_cols, C_out]`."""
  products = products.reshape(WINDOW, WINDOW, batch, block_rows, block_cols, -1)   # [cols, rows, ...]
  by_cols = _apply(_OUTPUT_MAP, [products[c] for c in range(WINDOW)])            # [4 (cols), 6 (rows), ...]
  blocks = _apply(_OUTPUT_MAP, [by_cols[:, r] for r in range(WINDOW)])          # [4 (rows), 4 (cols), ...]
  return jnp.transpose(blocks, (2, 3, 0, 4, 1, 5)).reshape(
      batch, TILE * block_rows, TILE * block_cols, -1)


def winograd_conv3x3(x: Array, kernel: Array) -> Array:
  """The 3x3, stride-1, padding-1 convolution (NHWC, HWIO) by Winograd's F(4x4, 3x3).

  The values of `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))`
  up to float rounding (see the module docstring), with a quarter of its
  multiplies, for any height and width.

  Args:
    x: the input `[N, H, W, C_in]`.
    kernel: the kernel `[3, 3, C_in, C_out]`.

  Returns:
    The output `[N, H, W, C_out]`.
  """
  if kernel.shape[:2] != (3, 3) or kernel.shape[2] != x.shape[-1]:
    raise ValueError(f"winograd_conv3x3 takes a [3, 3, {x.shape[-1]}, C_out] kernel for an input of "
                     f"{x.shape[-1]} channels; got {kernel.shape}.")
  batch, height, width, _ = x.shape
  block_rows, block_cols = -(-height // TILE), -(-width // TILE)
  products = jnp.matmul(_transformed_input(x, block_rows, block_cols), _transformed_kernel(kernel))
  return _output(products, batch, block_rows, block_cols)[:, :height, :width]


def output_blocks(shape: tuple[int, ...]) -> int:
  """How many 4x4 output blocks `winograd_conv3x3` computes for an input of `shape` `[N, H, W, C]`."""
  batch, height, width, _ = shape
  return batch * -(-height // TILE) * -(-width // TILE)
