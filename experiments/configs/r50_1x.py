"""RetinaNet R50-FPN, the paper's / detectron2's 1x COCO schedule.

    python -m experiments.coco_retinanet --config r50_1x --workdir runs/r50_1x --data.data_dir=DIR

90k steps at a global batch of 16 (`data.batch_size`, shared by all processes),
SGD lr 0.01 with momentum 0.9 and weight decay 1e-4, 1000 warmup steps, decays
at 60k and 80k; images resized as detectron2 (short side 640-800, long side
<= 1333), horizontal flips; focal loss alpha 0.25 gamma 2, smooth L1 (beta
0.1) box loss. Reported: 36.4 AP (detectron2 R50 1x, ImageNet-initialized
backbone). This recipe trains the backbone with batch norm from scratch:
loading ImageNet weights is not part of it yet, and a from-scratch 1x schedule
lands far below the reported figure.
"""

import dataclasses

from focal_jax.engine.config import ExperimentConfig, ModelConfig
from focal_jax.data import coco_detectron2_config


def get_config() -> ExperimentConfig:
  return ExperimentConfig(
      model=ModelConfig(depth=50, backbone_norm="bn", frozen_stages=0, p6_from="p5"),
      data=coco_detectron2_config(batch_size=16, max_boxes=100),
  )


def with_depth(config: ExperimentConfig, depth: int) -> ExperimentConfig:
  """The same recipe with another ResNet depth."""
  return dataclasses.replace(config, model=dataclasses.replace(config.model, depth=depth))
