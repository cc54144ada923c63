"""The stem's 3x3 stride-2 max pool as nine strided slices, with its gradient by phase."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from focal_jax.models.cpu_rewrites.choices import CpuRewrites

Array = jax.Array


def _pool_windows(x: Array) -> list[Array]:
  """The nine inputs of every 3x3 stride-2 window (padding 1 with -inf), row-major."""
  batch, h, w, channels = x.shape
  out_h, out_w = -(-h // 2), -(-w // 2)
  padded = jnp.pad(x, ((0, 0), (1, 2 * out_h - h), (1, 2 * out_w - w), (0, 0)),
                   constant_values=-jnp.inf)
  return [jax.lax.slice(padded, (0, dy, dx, 0), (batch, dy + 2 * out_h - 1, dx + 2 * out_w - 1, channels),
                        (1, 2, 2, 1))
          for dy in range(3) for dx in range(3)]


@jax.custom_vjp
def max_pool_3x3_s2(x: Array) -> Array:
  """3x3 max pool, stride 2, padding 1 with -inf (torchvision's stem pool), on NHWC `x`.

  The same values as `nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`
  (`[N, ceil(H / 2), ceil(W / 2), C]`), as the maximum of nine strided
  slices. The gradient of each output goes to the first of its window's
  maxima in row-major order (as torch's and `reduce_window`'s), computed
  from the saved window positions in a few elementwise passes.
  """
  return functools.reduce(jnp.maximum, _pool_windows(x))


def _max_pool_forward(x):
  windows = _pool_windows(x)
  best, position = windows[0], jnp.zeros(windows[0].shape, jnp.int8)
  for k, window in enumerate(windows[1:], 1):
    better = window > best  # strict: ties keep the earlier position
    best = jnp.where(better, window, best)
    position = jnp.where(better, jnp.int8(k), position)
  return best, (position, x.shape)


def _max_pool_backward(residuals, cotangent):
  """Scatters each output's gradient to its window's maximum, by phase of the padded input.

  Window `(i, j)` reads padded rows `2i + dy` and columns `2j + dx`, so the
  padded input splits into four phases (even/odd rows x even/odd columns):
  each gets the gradients of the window positions that fall on it, shifted by
  one window where `dy` or `dx` is 2; the phases are then interleaved.
  """
  position, (_, h, w, _) = residuals
  to = [jnp.where(position == k, cotangent, 0) for k in range(9)]

  def shifted(value, down, right):  # [out_h, out_w] -> [out_h + 1, out_w + 1]
    return jnp.pad(value, ((0, 0), (down, 1 - down), (right, 1 - right), (0, 0)))

  even_even = shifted(to[0], 0, 0) + shifted(to[2], 0, 1) + shifted(to[6], 1, 0) + shifted(to[8], 1, 1)
  even_odd = shifted(to[1], 0, 0) + shifted(to[7], 1, 0)
  odd_even = shifted(to[3], 0, 0) + shifted(to[5], 0, 1)
  odd_odd = shifted(to[4], 0, 0)
  batch, rows, cols, channels = even_even.shape
  padded = jnp.stack([jnp.stack([even_even, even_odd], 3), jnp.stack([odd_even, odd_odd], 3)], 2)
  padded = padded.reshape(batch, 2 * rows, 2 * cols, channels)
  return (padded[:, 1:h + 1, 1:w + 1],)


max_pool_3x3_s2.defvjp(_max_pool_forward, _max_pool_backward)


def stem_max_pool(x: Array, cpu_rewrites: CpuRewrites) -> Array:
  """The 3x3 stride-2, padding-1 max pool: `max_pool_3x3_s2` or `nn.max_pool`, as `cpu_rewrites` says."""
  if cpu_rewrites.max_pool_grad_by_phase:
    return max_pool_3x3_s2(x)
  return nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
