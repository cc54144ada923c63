"""Tests of focal_jax.models on tiny networks and small odd-sized inputs."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from focal_jax.ops.anchors import AnchorConfig, generate_anchors
from focal_jax.models import (
    FPN,
    FrozenBatchNorm,
    ResNet,
    RetinaNet,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
    retinanet_resnet101_fpn,
    trainable_mask,
    upsample_nearest,
)
from focal_jax.models import conv
from focal_jax.models.conv import Conv3x3, PointwiseConv, StridedConv3x3
from focal_jax.models.resnet import max_pool_3x3_s2

# A network small enough to compile and run in a few seconds on 2 CPU cores.
TINY = dict(num_classes=5, depth=18, stage_sizes=(1, 1, 1, 1), width=8, fpn_channels=16,
            head_convs=2, head_channels=16)
KEY = jax.random.key(0)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_variables(model, shape=(1, 64, 64, 3)):
  return jax.eval_shape(lambda: model.init(KEY, jnp.zeros(shape)))


@pytest.fixture(scope="module")
def tiny():
  """A tiny RetinaNet, its variables, a 100x132 batch, a jitted apply and its outputs."""
  model = RetinaNet(**TINY)
  images = jax.random.normal(jax.random.key(1), (2, 100, 132, 3))
  variables = jax.jit(model.init)(KEY, images)
  apply = jax.jit(model.apply)
  return model, variables, images, apply, apply(variables, images)


# 100 x 132 halves (rounding up) to 50x66, 25x33, 13x17, 7x9, 4x5, 2x3, 1x2.
ODD_SIZES = {2: (25, 33), 3: (13, 17), 4: (7, 9), 5: (4, 5), 6: (2, 3), 7: (1, 2)}


@pytest.mark.parametrize("block, expansion", [("basic", 1), ("bottleneck", 4)])
def test_resnet_feature_shapes_on_odd_sizes(block, expansion):
  model = ResNet(stage_sizes=(1, 1, 1, 1), block=block, width=8)
  variables = _abstract_variables(model, (2, 100, 132, 3))
  features = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 100, 132, 3))), variables)
  assert sorted(features) == [2, 3, 4, 5]
  for level, feature in features.items():
    channels = 8 * 2**(level - 2) * expansion
    assert feature.shape == (2, *ODD_SIZES[level], channels), level


@pytest.mark.parametrize("p6_from, p6_in", [("p5", 16), ("c5", 64)])
def test_fpn_level_shapes_on_odd_sizes(p6_from, p6_in):
  backbone = ResNet(stage_sizes=(1, 1, 1, 1), block="basic", width=8)
  images = jnp.ones((1, 100, 132, 3))
  features = jax.eval_shape(lambda: backbone.apply(backbone.init(KEY, images), images))
  fpn = FPN(channels=16, p6_from=p6_from)
  variables = jax.eval_shape(fpn.init, KEY, features)
  pyramid = jax.eval_shape(fpn.apply, variables, features)
  assert sorted(pyramid) == [3, 4, 5, 6, 7]
  for level, p in pyramid.items():
    assert p.shape == (1, *ODD_SIZES[level], 16), level
  assert variables["params"]["p6"]["kernel"].shape == (3, 3, p6_in, 16)
  assert variables["params"]["p7"]["kernel"].shape == (3, 3, 16, 16)


def test_upsample_nearest_uses_torch_indices():
  # torch: F.interpolate(x, size=out, mode="nearest") reads row floor(i * in / out).
  x = jnp.arange(6.0).reshape(1, 2, 3, 1)
  y = upsample_nearest(x, (3, 5))  # odd target: 2x repeat, then crop
  np.testing.assert_array_equal(y[0, :, :, 0], [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]])
  y = upsample_nearest(x, (5, 3))  # general sizes: rows floor(i * 2 / 5) = 0, 0, 0, 1, 1
  np.testing.assert_array_equal(y[0, :, 0, 0], [0, 0, 0, 3, 3])


@pytest.mark.parametrize("shape", [(7, 9), (8, 8)])
def test_max_pool_matches_reduce_window(shape):
  x = jax.random.normal(KEY, (2, *shape, 3))
  expected = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
  np.testing.assert_array_equal(jax.jit(max_pool_3x3_s2)(x), expected)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(max_pool_3x3_s2(x) ** 2)))(x)
  expected_grad = jax.jit(jax.grad(
      lambda x: jnp.sum(nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))) ** 2)))(x)
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


@pytest.mark.parametrize("features", [40, 20])  # widening (own kernel gradient) or not
def test_conv3x3_matches_nn_conv_and_its_gradients(features):
  x = jax.random.normal(KEY, (2, 9, 7, 16))
  (value, grads), (expected_value, expected_grads) = _value_and_grads(
      Conv3x3(features, use_bias=True), nn.Conv(features, (3, 3), padding=((1, 1), (1, 1))), x)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads,
               expected_grads)


@pytest.fixture(params=["xla", "matmul"])
def kernel_grad(request, monkeypatch):
  """Runs a test with each kernel gradient of `focal_jax.models.conv` (the nine products for any width)."""
  monkeypatch.setattr(conv, "MATMUL_MIN_CHANNELS", 1)
  monkeypatch.setattr(conv, "matmul_kernel_grad_pays", lambda: request.param == "matmul")
  return request.param


@pytest.mark.parametrize("features", [40, 20])
def test_conv3x3_gradients_match_nn_conv_with_either_kernel_grad(features, kernel_grad):
  del kernel_grad
  x = jax.random.normal(KEY, (2, 8, 5, 16))
  (_, grads), (_, expected_grads) = _value_and_grads(
      Conv3x3(features), nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False), x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads,
               expected_grads)


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
  got = conv.kernel_grad_as_matmul(jnp.asarray(x, jnp.float32), jnp.asarray(grad, jnp.float32), stride)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value, expected", [("xla", False), ("matmul", True)])
def test_kernel_grad_choice_follows_the_environment(monkeypatch, value, expected):
  monkeypatch.setenv("FOCAL_JAX_CONV_KERNEL_GRAD", value)
  assert conv.matmul_kernel_grad_pays.__wrapped__() is expected
  monkeypatch.setenv("FOCAL_JAX_CONV_KERNEL_GRAD", "fast")
  with pytest.raises(ValueError, match="FOCAL_JAX_CONV_KERNEL_GRAD"):
    conv.matmul_kernel_grad_pays.__wrapped__()


@pytest.mark.parametrize("shape, use_bias", [((9, 7), True), ((8, 6), False), ((1, 2), True)])
def test_strided_conv3x3_matches_nn_conv_and_its_gradients(shape, use_bias, kernel_grad):
  del kernel_grad
  x = jax.random.normal(KEY, (2, *shape, 6))
  reference = nn.Conv(5, (3, 3), (2, 2), ((1, 1), (1, 1)), use_bias=use_bias)
  (value, grads), (expected_value, expected_grads) = _value_and_grads(
      StridedConv3x3(5, use_bias=use_bias), reference, x)
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), grads,
               expected_grads)


def test_output_length_equals_anchors(tiny):
  cls_logits, box_deltas = tiny[-1]
  num_anchors = generate_anchors((100, 132), AnchorConfig()).shape[0]
  assert num_anchors == 9 * sum(h * w for level, (h, w) in ODD_SIZES.items() if level >= 3)
  assert cls_logits.shape == (2, num_anchors, 5) and cls_logits.dtype == jnp.float32
  assert box_deltas.shape == (2, num_anchors, 4) and box_deltas.dtype == jnp.float32


def test_levels_3_to_5_match_anchors():
  model = RetinaNet(**{**TINY, "max_level": 5})
  variables = _abstract_variables(model, (1, 96, 80, 3))
  cls_logits, _ = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 96, 80, 3))), variables)
  config = AnchorConfig(max_level=5, sizes=(32.0, 64.0, 128.0))
  assert cls_logits.shape[1] == generate_anchors((96, 80), config).shape[0] == 9 * (120 + 30 + 9)


def test_initial_foreground_probability_is_the_prior(tiny):
  _, variables, _, _, (cls_logits, box_deltas) = tiny
  bias = variables["params"]["head"]["classification_head"]["predictor"]["bias"]
  np.testing.assert_allclose(bias, -math.log(99.0), rtol=1e-6)
  assert abs(float(jnp.mean(jax.nn.sigmoid(cls_logits))) - 0.01) < 1e-3
  assert float(jnp.abs(jnp.mean(box_deltas))) < 0.05


def test_head_output_order_is_location_then_anchor_then_class(tiny):
  # A zero predictor kernel leaves the bias: channel a * K + k (torchvision's
  # view(N, A, K, H, W)) must land on anchor row (y * W + x) * A + a, column k.
  _, variables, images, apply, _ = tiny
  params = jax.tree.map(lambda x: x, variables["params"])
  for name, k in (("classification_head", 5), ("regression_head", 4)):
    predictor = params["head"][name]["predictor"]
    predictor["kernel"] = jnp.zeros_like(predictor["kernel"])
    predictor["bias"] = jnp.arange(9 * k, dtype=jnp.float32)
  cls_logits, box_deltas = apply({**variables, "params": params}, images)
  total = cls_logits.shape[1]
  np.testing.assert_array_equal(cls_logits[1], np.tile(np.arange(45.0).reshape(9, 5), (total // 9, 1)))
  np.testing.assert_array_equal(box_deltas[0], np.tile(np.arange(36.0).reshape(9, 4), (total // 9, 1)))


def _perturbed_stats(batch_stats, seed=3):
  leaves, treedef = jax.tree.flatten(batch_stats)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + jax.random.uniform(k, x.shape) for x, k in zip(leaves, keys)])


def test_frozen_batch_norm_keeps_statistics_and_gets_no_gradient():
  images = jax.random.normal(KEY, (2, 32, 32, 3))

  def run(norm):
    model = ResNet(stage_sizes=(1,), block="bottleneck", width=8, norm=norm)
    variables = jax.jit(model.init)(KEY, images)
    variables = {**variables, "batch_stats": _perturbed_stats(variables["batch_stats"])}

    def loss(variables):
      features, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
      return jnp.sum(features[2] ** 2), updates

    grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables)
    return variables, grads, updates

  variables, grads, updates = run("frozen_bn")
  assert set(variables["batch_stats"]["bn1"]) == {"scale", "bias", "mean", "var"}
  assert not any("bn" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(grads["params"]))
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(grads["batch_stats"]))
  assert any(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(grads["params"]))

  # The same network with trainable batch norm updates its statistics and its scale gets a gradient.
  variables, grads, updates = run("bn")
  assert not np.allclose(updates["batch_stats"]["bn1"]["mean"], variables["batch_stats"]["bn1"]["mean"])
  assert float(jnp.max(jnp.abs(grads["params"]["bn1"]["scale"]))) > 0.0


def test_frozen_batch_norm_matches_torchvision_formula():
  x = jax.random.normal(KEY, (2, 4, 4, 3))
  stats = {"scale": jnp.array([1.0, 2.0, 0.5]), "bias": jnp.array([0.0, 1.0, -1.0]),
           "mean": jnp.array([0.1, -0.2, 0.3]), "var": jnp.array([1.0, 4.0, 0.25])}
  y = FrozenBatchNorm().apply({"batch_stats": stats}, x)
  expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"] + stats["bias"]
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_frozen_stages_stop_gradients_and_mask_matches():
  backbone = ResNet(stage_sizes=(1, 1, 1), block="basic", width=8, norm="bn", frozen_stages=2)
  images = jax.random.normal(KEY, (1, 32, 32, 3))
  variables = jax.jit(backbone.init)(KEY, images)

  def loss(params):
    features, _ = backbone.apply({**variables, "params": params}, images, train=True,
                                 mutable=["batch_stats"])
    return jnp.sum(features[4] ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  frozen = {"conv1", "bn1", "layer1_0"}  # stem + res2
  for path, grad in jax.tree_util.tree_leaves_with_path(grads):
    assert (float(jnp.max(jnp.abs(grad))) == 0.0) == (path[0].key in frozen), path

  # The optimizer mask of a RetinaNet: False exactly on the stem and layer1.
  model = RetinaNet(**{**TINY, "frozen_stages": 2})
  params = _abstract_variables(model)["params"]
  mask = model.trainable_mask(params)
  for (path, _), trainable in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(mask)):
    assert trainable == (not (path[0].key == "backbone" and path[1].key in frozen)), path
  assert jax.tree.leaves(trainable_mask(variables["params"], 1)).count(False) == 3  # bare ResNet
  assert all(jax.tree.leaves(trainable_mask(params, 0)))


def _conv(k, c_in, c_out, bias):
  return k * k * c_in * c_out + (c_out if bias else 0)


def _resnet50_counts():
  """(conv weights, batch-norm channels) of ResNet-50 without its fc layer."""
  convs, bn = _conv(7, 3, 64, False), 64
  c_in = 64
  for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
    for b in range(blocks):
      convs += _conv(1, c_in, width, False) + _conv(3, width, width, False)
      convs += _conv(1, width, 4 * width, False)
      bn += width + width + 4 * width
      if b == 0:  # projection shortcut
        convs += _conv(1, c_in, 4 * width, False)
        bn += 4 * width
      c_in = 4 * width
  return convs, bn


def _retinanet_r50_params(num_classes, p6_in, head_norm):
  """Hand count of torchvision's RetinaNet R50-FPN `params` with frozen batch norm."""
  convs, _ = _resnet50_counts()
  fpn = sum(_conv(1, c, 256, True) for c in (512, 1024, 2048)) + 3 * _conv(3, 256, 256, True)
  fpn += _conv(3, p6_in, 256, True) + _conv(3, 256, 256, True)  # P6, P7
  tower = 4 * (_conv(3, 256, 256, not head_norm) + (2 * 256 if head_norm else 0))
  heads = tower + _conv(3, 256, 9 * num_classes, True) + tower + _conv(3, 256, 9 * 4, True)
  return convs + fpn + heads


def test_parameter_count_matches_torchvision():
  _, bn_channels = _resnet50_counts()
  expected_frozen = _retinanet_r50_params(91, p6_in=256, head_norm=False)
  assert expected_frozen == 34_014_999  # torchvision, FrozenBatchNorm2d (COCO_V1 weights)
  assert expected_frozen + 2 * bn_channels == 34_068_119  # torchvision, BatchNorm2d

  frozen = _abstract_variables(retinanet_resnet50_fpn(91))
  assert _count(frozen["params"]) == expected_frozen
  assert _count(frozen["batch_stats"]) == 4 * bn_channels  # scale, bias, mean, var
  trained = _abstract_variables(retinanet_resnet50_fpn(91, backbone_norm="bn"))
  assert _count(trained["params"]) == 34_068_119
  assert _count(trained["batch_stats"]) == 2 * bn_channels

  # v2: P6 from C5 and GroupNorm heads without conv biases; torchvision's count is with BatchNorm2d.
  v2 = _abstract_variables(retinanet_resnet50_fpn_v2(91))
  expected_v2 = _retinanet_r50_params(91, p6_in=2048, head_norm=True)
  assert _count(v2["params"]) == expected_v2
  assert expected_v2 + 2 * bn_channels == 38_198_935


def test_named_constructors_configure_the_variants():
  v1, v2, r101 = retinanet_resnet50_fpn(), retinanet_resnet50_fpn_v2(), retinanet_resnet101_fpn(3)
  assert (v1.num_classes, v1.depth, v1.p6_from, v1.head_norm) == (91, 50, "p5", None)
  assert (v2.depth, v2.p6_from, v2.head_norm) == (50, "c5", "group_norm")
  assert (r101.num_classes, r101.depth, r101.p6_from) == (3, 101, "p5")
  assert retinanet_resnet50_fpn(20, width=16).width == 16


def test_group_norm_heads_run_on_tiny_model():
  model = RetinaNet(**{**TINY, "head_norm": "group_norm", "head_norm_groups": 8, "p6_from": "c5"})
  images = jnp.ones((1, 64, 64, 3))
  variables = jax.eval_shape(lambda: model.init(KEY, images))
  tower = variables["params"]["head"]["classification_head"]
  assert set(tower["conv0"]) == {"kernel"} and set(tower["norm0"]) == {"scale", "bias"}
  cls_logits, _ = jax.eval_shape(lambda v: model.apply(v, images), variables)
  assert cls_logits.shape == (1, 9 * (64 + 16 + 4 + 1 + 1), 5)


def test_bfloat16_compute_keeps_float32_parameters_and_outputs(tiny):
  _, variables, images, _, (cls_full, box_full) = tiny
  half = RetinaNet(**TINY, dtype=jnp.bfloat16)
  half_variables = jax.eval_shape(lambda: half.init(KEY, images))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half_variables))
  cls_half, box_half = jax.jit(half.apply)(variables, images)
  assert cls_half.dtype == box_half.dtype == jnp.float32
  np.testing.assert_allclose(cls_half, cls_full, atol=0.05)
  np.testing.assert_allclose(box_half, box_full, atol=0.05)


@pytest.mark.parametrize("shape, message", [((64, 64, 3), "rank 4|NHWC"), ((1, 64, 64, 4), "3 channels"),
                                            ((1, 3, 64, 64), "3 channels")])
def test_bad_input_raises_value_error(shape, message):
  model = RetinaNet(**TINY)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda: model.init(KEY, jnp.zeros(shape)))
