"""Tests of focal_jax.models on tiny networks and small odd-sized inputs."""

import math

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
