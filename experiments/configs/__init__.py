"""Experiment configs: each module defines `get_config() -> ExperimentConfig`.

`demo` (the default) trains on the embedded synthetic dataset in minutes on a
CPU; `finetune` fine-tunes the demo model on your own COCO-format dataset;
`r50_1x` and `r101_1x` are the paper's COCO recipes; `torchvision_r50_fpn` and
`torchvision_r50_fpn_v2` evaluate or fine-tune torchvision's converted COCO weights.
"""

import importlib

NAMES = ("demo", "finetune", "r50_1x", "r101_1x", "torchvision_r50_fpn", "torchvision_r50_fpn_v2")


def get_config(name: str):
  """The config of recipe `name` (one of `NAMES`)."""
  if name not in NAMES:
    raise ValueError(f"unknown config {name!r}; choose one of {', '.join(NAMES)}.")
  return importlib.import_module(f"experiments.configs.{name}").get_config()
