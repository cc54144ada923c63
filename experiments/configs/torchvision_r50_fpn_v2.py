"""torchvision's COCO RetinaNet R50-FPN v2 in our pipeline: evaluate or fine-tune its released weights.

    python -m focal_jax.convert --from-torchvision retinanet_resnet50_fpn_v2_coco-5905b1c5.pth \\
        --variant retinanet_resnet50_fpn_v2 --out pretrained/retinanet_resnet50_fpn_v2
    python -m experiments.coco_retinanet --config torchvision_r50_fpn_v2 --workdir runs/torchvision_r50_fpn_v2 \\
        --data.data_dir=DIR --train.init_checkpoint=pretrained/retinanet_resnet50_fpn_v2 --train.total_steps=0

As `torchvision_r50_fpn`, with v2's P6 from C5, GroupNorm heads and GIoU box
loss. torchvision reports 41.5 AP for these weights.
"""

import dataclasses

from experiments.configs import torchvision_r50_fpn
from focal_jax.engine.config import ExperimentConfig


def get_config() -> ExperimentConfig:
  config = torchvision_r50_fpn.get_config()
  return dataclasses.replace(
      config,
      model=dataclasses.replace(config.model, p6_from="c5", head_norm="group_norm"),
      loss=dataclasses.replace(config.loss, box_loss="giou"),
  )
