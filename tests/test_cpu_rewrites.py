"""Tests of focal_jax.models.cpu_rewrites: each rewrite against XLA's operation or a float64 formula.

Every rewrite must give the values and gradients of the operation it
replaces; these tests run on the CPU, where every rewrite is taken.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax.models import RetinaNet
from focal_jax.models.cpu_rewrites import (
    WIDE_MIN_CHANNELS,
    WINOGRAD_MIN_BLOCKS,
    WINOGRAD_MIN_CHANNELS,
    Conv3x3,
    CpuRewrites,
    PointwiseConv,
    StridedConv3x3,
    kernel_grad_as_matmul,
    max_pool_3x3_s2,
    strided_conv3x3,
    winograd_conv3x3,
)

KEY = jax.random.key(0)
NO_REWRITES = CpuRewrites(pointwise_conv_as_matmul=False, strided_conv_input_grad_by_phase=False,
                          kernel_grad_as_matmul="never", fused_batch_norm=False, max_pool_grad_by_phase=False,
                          winograd_conv3x3=False)


def _reference_max_pool(x):
  return nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))


@pytest.mark.parametrize("shape", [(7, 9), (8, 8)])
def test_max_pool_matches_reduce_window(shape):
  x = jax.random.normal(KEY, (2, *shape, 3))
  np.testing.assert_array_equal(jax.jit(max_pool_3x3_s2)(x), _reference_max_pool(x))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_3x3_s2(x) ** 2)))(x)
  expected_grad = jax.jit(jax.grad(lambda x: jnp.sum(_reference_max_pool(x) ** 2)))(x)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)


def _max_pool_gradient_reference(x, cotangent):
  """float64 loops: each output's gradient to the first maximum of its window, row-major."""
  batch, h, w, channels = x.shape
  padded = np.full((batch, h + 3, w + 3, channels), -np.inf)
  padded[:, 1:h + 1, 1:w + 1] = x
  grad = np.zeros_like(padded)
  for b, i, j, c in np.ndindex(cotangent.shape):
    window = padded[b, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c]
    dy, dx = np.unravel_index(np.argmax(window), (3, 3))  # argmax: the first maximum
    grad[b, 2 * i + dy, 2 * j + dx, c] += cotangent[b, i, j, c]
  return grad[:, 1:h + 1, 1:w + 1]


@pytest.mark.parametrize("shape", [(7, 9), (8, 6)])
def test_max_pool_gradient_goes_to_the_first_maximum_on_ties(shape):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, (2, *shape, 2)).astype(np.float32)  # many tied maxima
  cotangent = rng.normal(size=(2, -(-shape[0] // 2), -(-shape[1] // 2), 2))
  _, vjp = jax.vjp(max_pool_3x3_s2, jnp.asarray(x))
  (grad,) = vjp(jnp.asarray(cotangent, jnp.float32))
  np.testing.assert_allclose(grad, _max_pool_gradient_reference(x, cotangent), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strides, shape", [(1, (5, 7)), (2, (5, 7)), (2, (8, 6))])
def test_pointwise_conv_matches_nn_conv(strides, shape):
  x = jax.random.normal(KEY, (2, *shape, 6))
  conv = nn.Conv(4, (1, 1), (strides, strides), ((0, 0), (0, 0)))
  variables = conv.init(jax.random.key(1), x)
  y = PointwiseConv(4, strides=strides, use_bias=True).apply(variables, x)
  assert y.shape == (2, -(-shape[0] // strides), -(-shape[1] // strides), 4)
  np.testing.assert_allclose(y, conv.apply(variables, x), rtol=1e-5, atol=1e-5)


def _value_and_grads(module, reference, x):
  """(value, grads) of `sum(module(x) * weights)` for `module` and for the `nn.Conv` `reference`."""
  variables = reference.init(jax.random.key(1), x)
  variables = jax.tree.map(lambda v: v + jax.random.normal(KEY, v.shape), variables)  # nonzero bias
  out_shape = jax.eval_shape(reference.apply, variables, x).shape
  weights = jax.random.normal(jax.random.key(2), out_shape)
  results = []
  for m in (module, reference):
    loss = lambda variables, x, m=m: jnp.sum(m.apply(variables, x) * weights)
    results.append((loss(variables, x), jax.grad(loss, argnums=(0, 1))(variables, x)))
  return results


def _assert_close(got, expected):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), got, expected)


@pytest.mark.parametrize("mode", ["never", "widening", "wide"])
@pytest.mark.parametrize("in_channels, features", [(16, 40), (16, 20), (WIDE_MIN_CHANNELS, 24)])
def test_conv3x3_matches_nn_conv_and_its_gradients(mode, in_channels, features):
  x = jax.random.normal(KEY, (2, 9, 7, in_channels))
  module = Conv3x3(features, use_bias=True, cpu_rewrites=CpuRewrites(kernel_grad_as_matmul=mode))
  (value, grads), (expected_value, expected_grads) = _value_and_grads(
      module, nn.Conv(features, (3, 3), padding=((1, 1), (1, 1))), x)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  _assert_close(grads, expected_grads)


@pytest.mark.parametrize("by_phase, by_matmul", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape", [(9, 7), (8, 6), (1, 2)])
def test_strided_conv3x3_gradients_match_xla_with_each_rewrite(by_phase, by_matmul, shape):
  x = jax.random.normal(KEY, (2, *shape, 6))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 6, 5))
  weights = jax.random.normal(jax.random.key(2), (2, -(-shape[0] // 2), -(-shape[1] // 2), 5))

  def reference(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def loss(conv):
    return lambda x, kernel: jnp.sum(conv(x, kernel) * weights)

  rewritten = loss(lambda x, kernel: strided_conv3x3(x, kernel, by_phase, by_matmul))
  np.testing.assert_allclose(rewritten(x, kernel), loss(reference)(x, kernel), rtol=1e-5)
  _assert_close(jax.grad(rewritten, (0, 1))(x, kernel), jax.grad(loss(reference), (0, 1))(x, kernel))


@pytest.mark.parametrize("shape, use_bias", [((9, 7), True), ((8, 6), False)])
def test_strided_conv3x3_module_matches_nn_conv(shape, use_bias):
  x = jax.random.normal(KEY, (2, *shape, 6))
  reference = nn.Conv(5, (3, 3), (2, 2), ((1, 1), (1, 1)), use_bias=use_bias)
  (value, grads), (expected_value, expected_grads) = _value_and_grads(
      StridedConv3x3(5, use_bias=use_bias), reference, x)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  _assert_close(grads, expected_grads)


@pytest.mark.parametrize("stride, shape", [(1, (9, 7)), (2, (9, 7)), (2, (8, 6)), (2, (1, 2))])
def test_kernel_grad_as_matmul_matches_the_float64_correlation(stride, shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *shape, 3))
  out_h, out_w = -(-shape[0] // stride), -(-shape[1] // stride)
  grad = rng.normal(size=(2, out_h, out_w, 4))
  padded = np.pad(x, ((0, 0), (1, 1 + stride), (1, 1 + stride), (0, 0)))
  expected = np.zeros((3, 3, 3, 4))
  for dy in range(3):
    for dx in range(3):
      taps = padded[:, dy:dy + stride * out_h:stride, dx:dx + stride * out_w:stride]
      expected[dy, dx] = np.einsum("nhwc,nhwo->co", taps, grad)
  got = kernel_grad_as_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(grad, jnp.float32), stride)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _correlate3x3(x, kernel):
  """float64 loops over the taps: the 3x3, stride-1, padding-1 cross-correlation (NHWC, HWIO)."""
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  return sum(np.einsum("nhwc,co->nhwo", padded[:, dy:dy + h, dx:dx + w], kernel[dy, dx])
             for dy in range(3) for dx in range(3))


@pytest.mark.parametrize("shape", [(9, 7), (8, 8), (1, 2), (13, 16)])
def test_winograd_conv3x3_and_its_gradients_match_the_float64_correlation(shape):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *shape, 5))
  kernel = rng.normal(size=(3, 3, 5, 4)) / np.sqrt(45)
  weights = rng.normal(size=(2, *shape, 4))
  expected = _correlate3x3(x, kernel)
  # The input's gradient correlates the output's with the kernel turned 180 degrees, channels swapped.
  expected_x_grad = _correlate3x3(weights, kernel[::-1, ::-1].transpose(0, 1, 3, 2))
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected_kernel_grad = np.stack([
      np.stack([np.einsum("nhwc,nhwo->co", padded[:, dy:dy + shape[0], dx:dx + shape[1]], weights)
                for dx in range(3)]) for dy in range(3)])
  x32, kernel32 = jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
  got = jax.jit(winograd_conv3x3)(x32, kernel32)
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max())
  x_grad, kernel_grad = jax.jit(jax.grad(lambda x, k: jnp.sum(winograd_conv3x3(x, k) * weights), (0, 1)))(
      x32, kernel32)
  np.testing.assert_allclose(x_grad, expected_x_grad, atol=2e-5 * np.abs(expected_x_grad).max())
  np.testing.assert_allclose(kernel_grad, expected_kernel_grad, atol=2e-5 * np.abs(expected_kernel_grad).max())


def test_winograd_conv3x3_rejects_a_kernel_that_does_not_fit():
  with pytest.raises(ValueError, match=r"\[3, 3, 4, C_out\] kernel"):
    winograd_conv3x3(jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 5, 2)))


@pytest.mark.parametrize("use_bias", [True, False])
def test_conv3x3_module_by_winograd_matches_nn_conv(use_bias):
  # Batch 2 of 32x32: 2 * 8 * 8 = 128 blocks of 4x4.
  x = jax.random.normal(KEY, (2, 32, 32, WINOGRAD_MIN_CHANNELS))
  module = Conv3x3(8, use_bias=use_bias)
  assert module.cpu_rewrites.winograd(x)
  (value, grads), (expected_value, expected_grads) = _value_and_grads(
      module, nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=use_bias), x)
  np.testing.assert_allclose(value, expected_value, rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5 * np.abs(b).max()),
               grads, expected_grads)


@pytest.mark.parametrize("enabled, shape, dtype, expected", [
    (True, (2, 32, 32, WINOGRAD_MIN_CHANNELS), jnp.float32, True),
    (True, (1, 29, 64, 256), jnp.float32, True),  # 8 x 16 blocks, the last row of blocks partial
    (True, (2, 32, 32, WINOGRAD_MIN_CHANNELS - 1), jnp.float32, False),
    (True, (2, 32, 28, 256), jnp.float32, False),  # 112 blocks
    (True, (2, 32, 32, 256), jnp.bfloat16, False),
    (False, (2, 32, 32, 256), jnp.float32, False),
    (True, (*jax.export.symbolic_shape("batch"), 64, 32, 256), jnp.float32, True),  # 128 blocks per image
    (True, (*jax.export.symbolic_shape("batch"), 32, 32, 256), jnp.float32, False),  # 64: as for 1 image
])
def test_winograd_follows_channels_blocks_and_dtype(enabled, shape, dtype, expected):
  assert WINOGRAD_MIN_BLOCKS == 128
  rewrites = CpuRewrites(winograd_conv3x3=enabled)
  assert rewrites.winograd(jax.ShapeDtypeStruct(shape, dtype)) is expected


@pytest.mark.parametrize("mode, in_channels, out_channels, stride, expected", [
    ("never", 16, 64, 1, False),
    ("widening", 16, 32, 1, True),  # twice as wide
    ("widening", 16, 31, 1, False),
    ("widening", 16, 64, 2, False),  # strided: never "widening"
    ("widening", 256, 256, 1, False),
    ("wide", 256, 256, 1, True),
    ("wide", WIDE_MIN_CHANNELS, 64, 2, True),
    ("wide", WIDE_MIN_CHANNELS - 1, 64, 2, False),
    ("wide", 16, 32, 1, True),
])
def test_kernel_grad_by_matmul_follows_the_mode(mode, in_channels, out_channels, stride, expected):
  rewrites = CpuRewrites(kernel_grad_as_matmul=mode)
  assert rewrites.kernel_grad_by_matmul(in_channels, out_channels, stride) is expected


@pytest.mark.parametrize("field, value, message", [
    ("kernel_grad_as_matmul", "fast", "'never', 'widening', 'wide'"),
    ("fused_batch_norm", "yes", "True or False"),
])
def test_bad_choice_raises_value_error(field, value, message):
  with pytest.raises(ValueError, match=message):
    CpuRewrites(**{field: value})


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_retinanet_with_and_without_rewrites_agree(block):
  """Outputs, gradients and batch statistics of a tiny RetinaNet: every rewrite on vs. none."""
  config = dict(num_classes=3, stage_sizes=(1, 1, 1, 1), block=block, width=8, backbone_norm="bn",
                frozen_stages=0, fpn_channels=16, head_convs=1, head_channels=16)
  images = jax.random.normal(KEY, (2, 64, 96, 3))
  every = RetinaNet(**config, cpu_rewrites=CpuRewrites(kernel_grad_as_matmul="wide"))
  none = RetinaNet(**config, cpu_rewrites=NO_REWRITES)
  variables = every.init(jax.random.key(1), images)
  assert jax.tree.structure(variables) == jax.tree.structure(none.init(jax.random.key(1), images))

  def loss(model, params):
    (cls_logits, box_deltas), updates = model.apply({**variables, "params": params}, images, train=True,
                                                    mutable=["batch_stats"])
    return jnp.sum(cls_logits * jnp.cos(cls_logits)) + jnp.sum(box_deltas ** 2), updates

  results = [jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p), has_aux=True))(variables["params"])
             for m in (every, none)]
  (value, updates), grads = results[0]
  (expected_value, expected_updates), expected_grads = results[1]
  np.testing.assert_allclose(value, expected_value, rtol=1e-4)
  _assert_close(updates, expected_updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(b).max()),
               grads, expected_grads)


def test_cpu_rewrites_is_a_hashable_module_field():
  rewrites = CpuRewrites(kernel_grad_as_matmul="wide")
  assert hash(rewrites) == hash(dataclasses.replace(CpuRewrites(), kernel_grad_as_matmul="wide"))
  assert RetinaNet(num_classes=2, cpu_rewrites=rewrites).cpu_rewrites is rewrites
