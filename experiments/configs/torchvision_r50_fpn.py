"""torchvision's COCO RetinaNet R50-FPN (v1) in our pipeline: evaluate or fine-tune its released weights.

    python -m focal_jax.convert --from-torchvision retinanet_resnet50_fpn_coco-eeacb38b.pth \\
        --variant retinanet_resnet50_fpn --out pretrained/retinanet_resnet50_fpn
    python -m experiments.coco_retinanet --config torchvision_r50_fpn --workdir runs/torchvision_r50_fpn \\
        --data.data_dir=DIR --train.init_checkpoint=pretrained/retinanet_resnet50_fpn --train.total_steps=0

`--train.total_steps=0` evaluates the converted weights without training.
The model is torchvision's (frozen batch norm, P6 from P5, 91 outputs indexed
by COCO category id, its anchors corner for corner) and so is inference
(score > 0.05, top 1000 per level, NMS 0.5, 300 detections). torchvision
reports 36.4 AP for these weights; the pre-processing differs a little (see
the README's "torchvision weights"). A positive `total_steps` fine-tunes them
with the `r50_1x` schedule and torchvision's L1 box loss.
"""

import dataclasses

from experiments.configs import r50_1x
from focal_jax.ops.anchors import AnchorConfig
from focal_jax.engine.config import ExperimentConfig
from focal_jax.convert import TORCHVISION_COCO_LABEL_MAP


def get_config() -> ExperimentConfig:
  config = r50_1x.get_config()
  return dataclasses.replace(
      config,
      model=dataclasses.replace(config.model, backbone_norm="frozen_bn", frozen_stages=2, p6_from="p5",
                                head_norm=None),
      anchors=AnchorConfig.torchvision(),
      loss=dataclasses.replace(config.loss, box_loss="l1"),
      data=dataclasses.replace(config.data, label_map=TORCHVISION_COCO_LABEL_MAP),
      postprocess=dataclasses.replace(config.postprocess, max_detections=300),
  )
