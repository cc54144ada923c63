"""Input pipelines (TFDS coco/2017, the embedded synthetic_shapes dataset, your own COCO-format folders).

Importing this package is cheap: the TensorFlow-backed names load on first use
(the plain data of `config`, the label maps and the ImageNet constants never
load TensorFlow).

    from focal_jax.data import InputConfig, build_train_dataset, build_eval_dataset
"""

from __future__ import annotations

import importlib

from focal_jax.data.config import (
    COCO_2017_CATEGORY_IDS,
    COCO_2017_CLASS_NAMES,
    COCO_2017_LABEL_MAP,
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    SYNTHETIC_SHAPES_CLASS_NAMES,
    SYNTHETIC_SHAPES_LABEL_MAP,
    InputConfig,
    LabelMap,
    coco_detectron2_config,
    coco_lsj_config,
    folder_label_map,
    label_map_for,
    synthetic_shapes_config,
)

_LAZY = {
    "DamagedDatasetError": "focal_jax.data.builders",
    "DatasetNotFoundError": "focal_jax.data.builders",
    "require_prepared": "focal_jax.data.builders",
    "hide_accelerators_from_tf": "focal_jax.data._tensorflow",
    "make_eval_preprocessor": "focal_jax.data.transforms",
    "EvalDataset": "focal_jax.data.iterators",
    "TrainIterator": "focal_jax.data.iterators",
    "build_eval_dataset": "focal_jax.data.iterators",
    "build_train_dataset": "focal_jax.data.iterators",
    "coco_ground_truth": "focal_jax.data.ground_truth",
    "CocoFolderError": "focal_jax.data.coco_folder",
    "prepare_coco_folder": "focal_jax.data.coco_folder",
    "SyntheticShapes": "focal_jax.data.synthetic_shapes",
    "SyntheticShapesConfig": "focal_jax.data.synthetic_shapes",
    "prepare_synthetic_shapes": "focal_jax.data.synthetic_shapes",
}


def __getattr__(name: str):
  if name in _LAZY:
    module = importlib.import_module(_LAZY[name])
    return getattr(module, "prepare" if name.startswith("prepare_") else name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "COCO_2017_CATEGORY_IDS", "COCO_2017_CLASS_NAMES", "COCO_2017_LABEL_MAP",
    "IMAGENET_MEAN_RGB", "IMAGENET_STD_RGB",
    "SYNTHETIC_SHAPES_CLASS_NAMES", "SYNTHETIC_SHAPES_LABEL_MAP", "InputConfig", "LabelMap",
    "coco_detectron2_config", "coco_lsj_config", "folder_label_map", "label_map_for",
    "synthetic_shapes_config",
    *_LAZY,
]
