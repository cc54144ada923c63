"""focal_jax.convert against torchvision's own modules, with seeded random weights (nothing downloaded)."""

import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

# pylint: disable=g-import-not-at-top,wrong-import-position
from torchvision.models import detection
from torchvision.models._meta import _COCO_CATEGORIES
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.image_list import ImageList

import focal_jax
from focal_jax.ops.anchors import anchors_per_level, generate_anchors
from focal_jax.convert import (
    TORCHVISION_COCO_LABEL_MAP,
    StateDictMismatchError,
    from_torchvision,
    init_from_pretrained,
    load_pretrained,
    load_torch_state_dict,
)
from focal_jax.convert.__main__ import main as convert_main
from focal_jax.models import RetinaNet
from focal_jax.ops.postprocess import PostprocessConfig, postprocess

IMAGE_SIZE = 128  # a multiple of 128: torchvision neither resizes nor pads it
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
# torchvision's RetinaNet defaults (detections_per_img is 300 there).
POSTPROCESS = PostprocessConfig(score_threshold=0.05, topk_per_level=1000, iou_threshold=0.5, max_detections=300)
_postprocess = jax.jit(postprocess, static_argnums=(3, 4, 5))


def _randomize_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Non-trivial batch-norm statistics and affine norm parameters (the defaults are 0 and 1)."""
  generator = torch.Generator().manual_seed(seed)
  uniform = lambda t, lo, hi: t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=generator))
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
        uniform(module.weight, 0.5, 1.5)
        module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=generator))
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=generator))
        uniform(module.running_var, 0.5, 2.0)
  return model.eval()


def _relative_error(ours, reference) -> float:
  """max |ours - reference| over the reference's scale (its largest magnitude)."""
  reference = np.asarray(reference)
  return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def _nhwc(images: torch.Tensor) -> np.ndarray:
  return images.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_resnet_features_equal_torchvision(depth):
  torch.manual_seed(depth)
  reference = _randomize_norms(getattr(torchvision.models, f"resnet{depth}")(weights=None), depth)
  images = torch.randn(1, 3, 64, 96)
  with torch.no_grad():
    expected = IntermediateLayerGetter(reference, {"layer2": 3, "layer3": 4, "layer4": 5})(images)

  model, variables, anchor_config = from_torchvision(reference.state_dict(), f"resnet{depth}")
  features = model.apply(variables, _nhwc(images))  # op by op: faster than compiling ResNet-152

  assert anchor_config is None
  assert set(variables) == {"params", "batch_stats"}  # frozen batch norm: statistics in batch_stats
  for level in (3, 4, 5):
    want = expected[level].permute(0, 2, 3, 1).numpy()
    assert features[level].shape == want.shape
    assert _relative_error(features[level], want) <= 1e-4, level


def _torchvision_retinanet(variant: str, seed: int) -> torch.nn.Module:
  """A seeded random torchvision RetinaNet whose heads give spread-out scores and visible box shifts."""
  torch.manual_seed(seed)
  model = getattr(detection, variant)(weights=None, weights_backbone=None, num_classes=91,
                                      min_size=IMAGE_SIZE, max_size=IMAGE_SIZE)
  _randomize_norms(model, seed)
  with torch.no_grad():  # about 70-100 detections per image above score 0.05
    model.head.classification_head.cls_logits.weight.mul_(3.0)
    model.head.classification_head.cls_logits.bias.fill_(-7.0)
    model.head.regression_head.bbox_reg.weight.mul_(3.0)
  return model


@pytest.fixture(scope="module", params=["retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2"])
def retinanet(request):
  """A torchvision RetinaNet, its conversion, three [0, 1] RGB images and both head outputs on them."""
  reference = _torchvision_retinanet(request.param, seed=7)
  converted = from_torchvision(reference.state_dict(), request.param)
  images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
  normalized = (images - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]
  with torch.no_grad():
    features = list(reference.backbone(normalized).values())
    expected = reference.head(features)
    anchors = reference.anchor_generator(ImageList(normalized, [(IMAGE_SIZE, IMAGE_SIZE)] * 3), features)
  cls_logits, box_deltas = converted.model.apply(converted.variables, _nhwc(normalized))
  return types.SimpleNamespace(variant=request.param, reference=reference, converted=converted, images=images,
                               expected=expected, anchors=anchors[0].numpy(), cls_logits=cls_logits,
                               box_deltas=box_deltas)


def test_retinanet_head_outputs_equal_torchvision_for_every_anchor(retinanet):
  converted, expected = retinanet.converted, retinanet.expected
  assert converted.model.p6_from == ("p5" if retinanet.variant == "retinanet_resnet50_fpn" else "c5")
  anchors = generate_anchors((IMAGE_SIZE, IMAGE_SIZE), converted.anchor_config)
  np.testing.assert_array_equal(anchors, retinanet.anchors)
  assert retinanet.cls_logits.shape == tuple(expected["cls_logits"].shape) == (3, anchors.shape[0], 91)
  assert _relative_error(retinanet.cls_logits, expected["cls_logits"]) <= 1e-4
  assert _relative_error(retinanet.box_deltas, expected["bbox_regression"]) <= 1e-4


def _detections(detections, index):
  valid = np.asarray(detections.valid[index])
  return (np.asarray(detections.boxes[index])[valid], np.asarray(detections.scores[index])[valid],
          np.asarray(detections.classes[index])[valid])


def test_retinanet_detections_equal_torchvision(retinanet):
  with torch.no_grad():  # torchvision normalizes, neither resizes nor pads, and post-processes
    expected = retinanet.reference(list(retinanet.images))
  size = (IMAGE_SIZE, IMAGE_SIZE)
  anchor_config = retinanet.converted.anchor_config
  ours = _postprocess(retinanet.cls_logits, retinanet.box_deltas, generate_anchors(size, anchor_config),
                      tuple(anchors_per_level(size, anchor_config)), size, POSTPROCESS)
  for index, want in enumerate(expected):
    boxes, scores, classes = _detections(ours, index)
    assert 0 < len(scores) < POSTPROCESS.max_detections
    assert len(scores) == len(want["scores"])
    unmatched = list(range(len(scores)))
    for box, score, label in zip(want["boxes"].numpy(), want["scores"].numpy(), want["labels"].numpy()):
      match = [j for j in unmatched if classes[j] == label and abs(scores[j] - score) <= 1e-4
               and np.max(np.abs(boxes[j] - box)) <= 1e-2]
      assert match, (index, box, score, label)
      unmatched.remove(match[0])


def test_legacy_key_names_are_read_as_torchvision_does():
  state = _torchvision_retinanet("retinanet_resnet50_fpn", seed=1).state_dict()
  legacy = {}
  for key, value in state.items():  # the layout of torchvision < 0.13 (the v1 COCO checkpoint's)
    key = re.sub(r"_blocks\.(\d)\.0\.", r"_blocks.\1.", key)
    key = re.sub(r"_head\.conv\.(\d)\.0\.", lambda m: f"_head.conv.{2 * int(m[1])}.", key)
    legacy[key] = value
  assert {"backbone.fpn.inner_blocks.2.weight", "head.regression_head.conv.6.bias"} <= set(legacy)
  expected = from_torchvision(state).variables
  converted = from_torchvision(legacy).variables
  jax.tree.map(np.testing.assert_array_equal, converted, expected)


def test_label_map_is_torchvisions_coco_layout():
  assert TORCHVISION_COCO_LABEL_MAP.names == tuple(_COCO_CATEGORIES)
  assert TORCHVISION_COCO_LABEL_MAP.category_ids == tuple(range(91))
  # TFDS label 0 (person) is class 1, label 79 (toothbrush) class 90.
  assert TORCHVISION_COCO_LABEL_MAP.label_to_class[0] == 1
  assert TORCHVISION_COCO_LABEL_MAP.label_to_class[79] == 90


@pytest.fixture(scope="module")
def resnet18_state():
  torch.manual_seed(18)
  return _randomize_norms(torchvision.models.resnet18(weights=None), 18).state_dict()


def _mismatch(state, variant) -> str:
  with pytest.raises(StateDictMismatchError) as error:
    from_torchvision(state, variant)
  return str(error.value)


def test_another_architecture_is_refused_and_named(resnet18_state):
  message = _mismatch(resnet18_state, "resnet34")
  assert "missing (80): layer1.2.bn1.bias" in message
  assert "fit variant 'resnet18'" in message
  message = _mismatch(resnet18_state, "retinanet_resnet50_fpn")
  assert "unexpected (" in message and "missing (" in message


def test_missing_extra_and_misshapen_keys_are_listed(resnet18_state):
  state = dict(resnet18_state)
  del state["layer2.0.downsample.1.running_var"]
  state["layer5.0.conv1.weight"] = torch.zeros(3)
  state["conv1.weight"] = torch.zeros(64, 3, 5, 5)
  message = _mismatch(state, "resnet18")
  assert "missing (1): layer2.0.downsample.1.running_var" in message
  assert "unexpected (1): layer5.0.conv1.weight" in message
  assert "wrong shape (1): conv1.weight (64, 3, 5, 5) (expected (64, 3, 7, 7))" in message


def test_v1_checkpoint_is_not_taken_for_v2():
  state = _torchvision_retinanet("retinanet_resnet50_fpn", seed=2).state_dict()
  message = _mismatch(state, "retinanet_resnet50_fpn_v2")
  assert "head.classification_head.conv.0.1.weight" in message  # v2's GroupNorm
  assert "fit variant 'retinanet_resnet50_fpn'" in message


class _RunsCode:
  """A pickle payload that appends to `calls` when unpickled without weights_only."""

  calls = []

  def __reduce__(self):
    return (_RunsCode.calls.append, ("ran",))


def test_command_writes_a_checkpoint_that_initializes_a_backbone(tmp_path, resnet18_state):
  path = tmp_path / "resnet18.pth"
  torch.save(resnet18_state, path)
  out = tmp_path / "converted"
  assert convert_main(["--from-torchvision", str(path), "--variant", "resnet18", "--out", str(out)]) == 0
  saved, metadata = load_pretrained(out)
  assert metadata["variant"] == "resnet18" and metadata["scope"] == "backbone"
  jax.tree.map(np.testing.assert_array_equal, saved, from_torchvision(resnet18_state, "resnet18").variables)

  # A new RetinaNet with a trainable-BN ResNet-18, replicated over the test mesh.
  model = RetinaNet(num_classes=3, depth=18, backbone_norm="bn", frozen_stages=0, fpn_channels=16,
                    head_convs=1, head_channels=16)
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  fresh = jax.tree.map(lambda s: jax.device_put(np.full(s.shape, 7.0, s.dtype), replicated), shapes)
  loaded = init_from_pretrained(fresh, out)

  by_name = {path[1:]: leaf for path, leaf in traverse_util.flatten_dict(loaded).items()}
  for path, value in traverse_util.flatten_dict(saved).items():  # frozen BN scale/bias land in params
    np.testing.assert_array_equal(by_name.pop(("backbone", *path[1:])), value)
  assert by_name and all(path[0] != "backbone" and np.all(leaf == 7.0) for path, leaf in by_name.items())
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(loaded))

  with pytest.raises(ValueError, match="does not fit the model"):
    init_from_pretrained(jax.eval_shape(lambda: RetinaNet(depth=50).init(
        jax.random.key(0), jnp.zeros((1, 64, 64, 3)))), out)


def test_command_refuses_bad_input_and_writes_nothing(tmp_path, resnet18_state, capsys):
  def convert(state, name, variant="resnet18"):
    path = tmp_path / f"{name}.pth"
    torch.save(state, path)
    return convert_main(["--from-torchvision", str(path), "--variant", variant, "--out", str(tmp_path / name)])

  assert convert({**resnet18_state, "extra.weight": torch.zeros(1)}, "extra") == 2
  assert "unexpected (1): extra.weight" in capsys.readouterr().err
  assert convert({"weights": _RunsCode()}, "runs_code") == 2
  assert "refused" in capsys.readouterr().err
  assert not _RunsCode.calls
  assert sorted(p.name for p in tmp_path.iterdir()) == ["extra.pth", "runs_code.pth"]
  with pytest.raises(ValueError, match="not a plain state dict"):
    load_torch_state_dict(tmp_path / "runs_code.pth")
  assert not _RunsCode.calls


def test_top_level_entry_point():
  assert focal_jax.from_torchvision is from_torchvision
