"""RetinaNet R101-FPN, 1x COCO schedule: `r50_1x` with a ResNet-101 backbone.

    python -m experiments.coco_retinanet --config r101_1x --workdir runs/r101_1x --data.data_dir=DIR

Reported: 38.5 AP (detectron2 R101 3x is 40.4; the paper's R101 800px 1.5x
model 39.1), with an ImageNet-initialized backbone; see `r50_1x` for what this
recipe does not do yet.
"""

from experiments.configs import r50_1x
from focal_jax.engine.config import ExperimentConfig


def get_config() -> ExperimentConfig:
  return r50_1x.with_depth(r50_1x.get_config(), 101)
