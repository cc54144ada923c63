"""torchvision state dicts -> focal_jax variables, checked key by key and shape by shape.

| variant | torchvision model | focal_jax model |
| --- | --- | --- |
| `resnet18` ... `resnet152` | `torchvision.models.resnet*` (ImageNet) | `build_resnet(depth, norm="frozen_bn")`; `fc` is dropped |
| `retinanet_resnet50_fpn` | `torchvision.models.detection.retinanet_resnet50_fpn` | `retinanet_resnet50_fpn` (P6 from P5) |
| `retinanet_resnet50_fpn_v2` | `...retinanet_resnet50_fpn_v2` | `retinanet_resnet50_fpn_v2` (P6 from C5, GroupNorm heads) |

How a torchvision tensor becomes one of our variables:

* Names: our modules are named after torchvision's. A RetinaNet's ResNet is
  torchvision's `backbone.body`; `layer{s}_{i}` is `layer{s}.{i}` and
  `downsample_conv`/`downsample_bn` are `downsample.0`/`downsample.1`; the
  FPN's `lateral{l}`/`output{l}` are `backbone.fpn.inner_blocks.{l-3}.0` /
  `layer_blocks.{l-3}.0` and `p6`/`p7` are `backbone.fpn.extra_blocks.p6`/`p7`;
  a head's `conv{i}`/`norm{i}` are `conv.{i}.0`/`conv.{i}.1` and its
  `predictor` is `cls_logits` or `bbox_reg`.
* Convolution kernels go from OIHW to HWIO.
* Batch norm `weight`, `bias`, `running_mean`, `running_var` become the
  `scale`, `bias`, `mean`, `var` of `FrozenBatchNorm` (collection
  `batch_stats`); `num_batches_tracked` is dropped.
* Head predictors: in both implementations channel `a * K + k` is class `k`
  of anchor `a`, and anchors are ordered ratio-major then scale, so the
  channels are copied as they are and logits match anchor for anchor with
  `AnchorConfig.torchvision()`.
* Classes: the COCO checkpoints have torchvision's 91 outputs, where output
  `i` is COCO category id `i` (0 and the ten ids COCO 2017 does not use never
  fire); `TORCHVISION_COCO_LABEL_MAP` maps the TFDS labels to them and them to
  category ids. Another class count is read from the checkpoint.
* Checkpoints saved before torchvision 0.13 (such as the v1 COCO checkpoint)
  name FPN blocks `inner_blocks.{i}.weight` and head convs `conv.{2i}.weight`;
  they are read as the current names, as torchvision's own loaders do.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from focal_jax._extras import require
from focal_jax._messages import problem_line
from focal_jax.ops.anchors import AnchorConfig
from focal_jax.data.config import COCO_2017_CATEGORY_IDS, COCO_2017_CLASS_NAMES, LabelMap
from focal_jax.models import build_resnet, retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2

RESNET_VARIANTS = {f"resnet{depth}": depth for depth in (18, 34, 50, 101, 152)}
RETINANET_VARIANTS = {
    "retinanet_resnet50_fpn": retinanet_resnet50_fpn,
    "retinanet_resnet50_fpn_v2": retinanet_resnet50_fpn_v2,
}
VARIANTS = (*RESNET_VARIANTS, *RETINANET_VARIANTS)

TORCHVISION_COCO_NUM_CLASSES = 91
_CLASS_PREDICTOR = "head.classification_head.cls_logits.bias"

# Our variable path ("/"-joined, collection excluded) -> torchvision's, rule by rule.
_TORCHVISION_NAMES = (
    (r"^backbone/", "backbone/body/"),
    (r"layer(\d)_(\d+)/", r"layer\1/\2/"),
    (r"/downsample_conv/", "/downsample/0/"),
    (r"/downsample_bn/", "/downsample/1/"),
    (r"^fpn/lateral(\d)/", lambda m: f"backbone/fpn/inner_blocks/{int(m[1]) - 3}/0/"),
    (r"^fpn/output(\d)/", lambda m: f"backbone/fpn/layer_blocks/{int(m[1]) - 3}/0/"),
    (r"^fpn/(p\d)/", r"backbone/fpn/extra_blocks/\1/"),
    (r"^(head/\w+_head)/conv(\d)/", r"\1/conv/\2/0/"),
    (r"^(head/\w+_head)/norm(\d)/", r"\1/conv/\2/1/"),
    (r"^head/classification_head/predictor/", "head/classification_head/cls_logits/"),
    (r"^head/regression_head/predictor/", "head/regression_head/bbox_reg/"),
    (r"/(kernel|scale)$", "/weight"),
    (r"/mean$", "/running_mean"),
    (r"/var$", "/running_var"),
)
# Keys of checkpoints saved before torchvision 0.13 -> current keys.
_LEGACY_NAMES = (
    (r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$", r"\1.0.\2"),
    (r"^(head\.\w+_head\.conv)\.([0246])\.(weight|bias)$", lambda m: f"{m[1]}.{int(m[2]) // 2}.0.{m[3]}"),
)


def _coco_label_map() -> LabelMap:
  names = ["N/A"] * TORCHVISION_COCO_NUM_CLASSES
  names[0] = "__background__"
  for name, category_id in zip(COCO_2017_CLASS_NAMES, COCO_2017_CATEGORY_IDS):
    names[category_id] = name
  return LabelMap(names=tuple(names), label_to_class=COCO_2017_CATEGORY_IDS,
                  category_ids=tuple(range(TORCHVISION_COCO_NUM_CLASSES)))


# torchvision's 91-way COCO classes: class i is category id i; TFDS label j is class COCO_2017_CATEGORY_IDS[j].
TORCHVISION_COCO_LABEL_MAP = _coco_label_map()


class StateDictMismatchError(ValueError):
  """The state dict does not fit the variant: keys missing or unexpected, or shapes wrong."""


class TorchvisionModel(NamedTuple):
  """What `from_torchvision` returns.

  Attributes:
    model: the Flax module (`ResNet` for a backbone, `RetinaNet` otherwise).
    variables: `{"params": ..., "batch_stats": ...}` of NumPy float32 arrays,
      ready for `model.apply(variables, images)`.
    anchor_config: `AnchorConfig.torchvision()` for a RetinaNet, None for a backbone.
  """

  model: nn.Module
  variables: dict[str, Any]
  anchor_config: AnchorConfig | None


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}.")


def build_model(variant: str, num_classes: int = TORCHVISION_COCO_NUM_CLASSES) -> nn.Module:
  """Our module with the layout of torchvision's `variant` (frozen batch norm; `num_classes` for a RetinaNet)."""
  _check_variant(variant)
  if variant in RETINANET_VARIANTS:
    return RETINANET_VARIANTS[variant](num_classes)
  return build_resnet(RESNET_VARIANTS[variant], norm="frozen_bn")


def torchvision_key(path: tuple[str, ...]) -> str:
  """torchvision's state-dict key of our variable at `path` (module names then leaf, no collection).

  `("backbone", "layer1_0", "downsample_bn", "mean")` is
  `"backbone.body.layer1.0.downsample.1.running_mean"`.
  """
  name = "/".join(path)
  for pattern, replacement in _TORCHVISION_NAMES:
    name = re.sub(pattern, replacement, name)
  return name.replace("/", ".")


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """torchvision's shape of a variable of our `shape` (HWIO kernels are OIHW there)."""
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape)


def _from_torch(array: np.ndarray) -> np.ndarray:
  """A float32 copy of a torchvision tensor in our layout (OIHW kernels become HWIO)."""
  if array.ndim == 4:
    array = np.transpose(array, (2, 3, 1, 0))
  return np.array(array, np.float32, order="C")


@functools.cache
def _expected_layout(variant: str, num_classes: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torchvision key -> (our `(collection, *path)`, torchvision shape), for every variable of the model."""
  model = build_model(variant, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
  return {torchvision_key(path[1:]): (path, _torch_shape(leaf.shape))
          for path, leaf in traverse_util.flatten_dict(shapes).items()}


def _to_numpy(key: str, value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor
    value = value.detach().cpu()
    value = (value.float() if value.is_floating_point() else value).numpy()
  if not hasattr(value, "shape"):
    raise StateDictMismatchError(
        f"expected a flat state dict of tensors, but {key!r} holds a {type(value).__name__}; nothing was "
        "converted.")
  return np.asarray(value)


def _canonical(state_dict: Mapping[str, Any], variant: str) -> dict[str, np.ndarray]:
  """NumPy arrays under current torchvision names, without the entries that hold no weights."""
  tensors = {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked") or (variant in RESNET_VARIANTS and key.startswith("fc.")):
      continue
    for pattern, replacement in _LEGACY_NAMES:
      key = re.sub(pattern, replacement, key)
    tensors[key] = _to_numpy(key, value)
  return tensors


def _num_classes(tensors: Mapping[str, np.ndarray], variant: str) -> int:
  """The class count of a RetinaNet checkpoint, read from its classification predictor."""
  num_anchors = AnchorConfig.torchvision().anchors_per_location
  bias = tensors.get(_CLASS_PREDICTOR)
  if variant in RETINANET_VARIANTS and bias is not None and bias.ndim == 1 and bias.shape[0] % num_anchors == 0:
    return bias.shape[0] // num_anchors
  return TORCHVISION_COCO_NUM_CLASSES


def _mismatches(tensors: Mapping[str, np.ndarray], variant: str) -> dict[str, list[str]]:
  layout = _expected_layout(variant, _num_classes(tensors, variant))
  return {
      "missing": sorted(set(layout) - set(tensors)),
      "unexpected": sorted(set(tensors) - set(layout)),
      "wrong shape": [f"{key} {tuple(tensors[key].shape)} (expected {layout[key][1]})"
                      for key in sorted(set(layout) & set(tensors))
                      if tuple(tensors[key].shape) != layout[key][1]],
  }


def _mismatch_message(state_dict: Mapping[str, Any], variant: str, problems: dict[str, list[str]]) -> str:
  lines = [f"the state dict does not fit variant {variant!r}; nothing was converted."]
  lines += [problem_line(kind, keys) for kind, keys in problems.items() if keys]
  fitting = [other for other in VARIANTS
             if other != variant and not any(_mismatches(_canonical(state_dict, other), other).values())]
  if fitting:
    lines.append(f"  The tensors fit variant {fitting[0]!r}.")
  return "\n".join(lines)


def from_torchvision(state_dict: Mapping[str, Any], variant: str = "retinanet_resnet50_fpn") -> TorchvisionModel:
  """Our model, its variables and its anchors from a torchvision state dict.

  Args:
    state_dict: `model.state_dict()` of the torchvision model, or what
      `load_torch_state_dict` read from a `.pth` file (torch tensors or
      NumPy arrays).
    variant: one of `VARIANTS`.

  Returns:
    `TorchvisionModel(model, variables, anchor_config)`. For the same
    normalized images (NHWC here, NCHW there) `model.apply(variables, images)`
    gives torchvision's ResNet C2-C5 features, or its RetinaNet head outputs
    for the anchors of `generate_anchors(image_size, anchor_config)`.

  Raises:
    StateDictMismatchError: tensors are missing, unexpected or of the wrong
      shape (each kind counted and its first keys named, with the variant
      the tensors do fit, if any).
    ValueError: `variant` is not one of `VARIANTS`.
  """
  _check_variant(variant)
  tensors = _canonical(state_dict, variant)
  problems = _mismatches(tensors, variant)
  if any(problems.values()):
    raise StateDictMismatchError(_mismatch_message(state_dict, variant, problems))
  num_classes = _num_classes(tensors, variant)
  layout = _expected_layout(variant, num_classes)
  variables = traverse_util.unflatten_dict({path: _from_torch(tensors[key]) for key, (path, _) in layout.items()})
  anchor_config = AnchorConfig.torchvision() if variant in RETINANET_VARIANTS else None
  return TorchvisionModel(build_model(variant, num_classes), variables, anchor_config)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a `.pth` state dict with `torch.load(path, weights_only=True)`, as NumPy arrays.

  A pickle that holds anything but tensors and plain containers (one that
  would run code when loaded) is refused. Needs torch (the `[torch]` extra).

  Raises:
    ModuleNotFoundError: torch is not installed (the message names the extra).
    ValueError: the file is not a plain state dict.
  """
  torch = require("torch")
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    reason = str(error).strip().splitlines()[0]
    raise ValueError(f"{path} is not a plain state dict; torch.load(weights_only=True) refused it: "
                     f"{reason}") from None
  if not isinstance(state_dict, Mapping):
    raise ValueError(f"{path} holds a {type(state_dict).__name__}, not a state dict.")
  return {key: _to_numpy(key, value) for key, value in state_dict.items()}


def save_pretrained(directory: str | os.PathLike, converted: TorchvisionModel, variant: str,
                    source: str | os.PathLike | None = None) -> Path:
  """Writes a converted model as a pretrained directory that training starts from.

  The directory's format is `focal_jax.engine.pretrained`'s: a ResNet fills
  a RetinaNet's backbone, a RetinaNet the whole model. Needs orbax (the
  `[train]` extra).

  Raises:
    FileExistsError: `directory` exists already (nothing is written).
  """
  from focal_jax.engine import pretrained  # pylint: disable=g-import-not-at-top  (orbax)

  _check_variant(variant)
  return pretrained.write_pretrained(
      directory, converted.variables, variant=variant, scope="backbone" if variant in RESNET_VARIANTS else "",
      num_classes=getattr(converted.model, "num_classes", None), source=source)
