"""Pretrained weights from torchvision: `from_torchvision` and `python -m focal_jax.convert`.

    python -m focal_jax.convert --from-torchvision resnet50-11ad3fa6.pth --variant resnet50 --out DIR

writes an orbax checkpoint that `experiments.coco_retinanet` starts from
(`--train.init_checkpoint=DIR`). In Python:

    from focal_jax.convert import from_torchvision, load_torch_state_dict
    model, variables, anchor_config = from_torchvision(
        load_torch_state_dict("retinanet_resnet50_fpn_coco-eeacb38b.pth"), "retinanet_resnet50_fpn")

Importing this package is cheap; orbax and torch load on first use.
"""

from __future__ import annotations

import importlib

from focal_jax.convert.torchvision import (
    RESNET_VARIANTS,
    RETINANET_VARIANTS,
    TORCHVISION_COCO_LABEL_MAP,
    VARIANTS,
    StateDictMismatchError,
    TorchvisionModel,
    build_model,
    from_torchvision,
    load_torch_state_dict,
    save_pretrained,
    torchvision_key,
)

# Reading pretrained directories belongs to the engine (orbax); kept here for convenience.
_LAZY = {
    "init_from_pretrained": "focal_jax.engine.pretrained",
    "load_pretrained": "focal_jax.engine.pretrained",
}


def __getattr__(name: str):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "RESNET_VARIANTS", "RETINANET_VARIANTS", "TORCHVISION_COCO_LABEL_MAP", "VARIANTS",
    "StateDictMismatchError", "TorchvisionModel", "build_model", "from_torchvision",
    "load_torch_state_dict", "save_pretrained", "torchvision_key", *_LAZY,
]
