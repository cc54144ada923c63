"""Demo: a small RetinaNet on the embedded synthetic_shapes dataset, on a CPU.

    python -m experiments.coco_retinanet

128x128 images with 0-4 objects of 4 shape classes (10-90 px, partly
occluded, noisy backgrounds), each training image flipped and turned at
random into one of its 8 right-angle orientations (the shapes and their
boxes look alike in all of them); levels P3-P5 with square anchors of
20-135 px (4 scales per octave at each level); a ResNet of basic blocks
(width 16), a 64-channel FPN and GroupNorm heads; AdamW with warmup,
cosine decay and a weight decay of 0.2 on every weight, 9,000 steps at
batch 8.

Chosen for the best COCO AP within ten minutes on a 2-core CPU, dataset
build and evaluation included (`benchmarks/sweep_demo.py`, figures in
`benchmarks/RESULTS.md`): at equal wall time, batches of 8 beat batches of
16, a wider or deeper network or wider or narrower heads did not pay for
their time, square anchors score as the paper's three aspect ratios here
(`experiments/results/anchors.md`) at a ninth less time per step, and
anchors 2.5 times their level's stride with 4 scales per octave (instead of
twice the stride with 3) gain more than any other change of the model tried,
at no cost in time per step, and the right-angle turns gain more again:
without them the model scores 0.05 AP higher on its training images than on
held-out ones. The weight decay gains the most of all: 0.021 AP over 1e-4
(0.1 to 0.5 score within 0.004 of each other), and 0.005 more, over three
seeds, when the norm scales and biases are decayed too.
"""

from focal_jax.ops.anchors import AnchorConfig
from focal_jax.engine.config import ExperimentConfig, LossConfig, ModelConfig, OptimizerConfig, TrainConfig
from focal_jax.data import synthetic_shapes_config
from focal_jax.ops.postprocess import PostprocessConfig


def get_config() -> ExperimentConfig:
  return ExperimentConfig(
      model=ModelConfig(stage_sizes=(1, 1, 1, 1), block="basic", width=16, backbone_norm="bn",
                        frozen_stages=0, fpn_channels=64, p6_from="c5", head_convs=2, head_channels=64,
                        head_norm="group_norm"),
      anchors=AnchorConfig(min_level=3, max_level=5, sizes=(20.0, 40.0, 80.0),
                           scales=tuple(2 ** (k / 4) for k in range(4)), aspect_ratios=(1.0,), offset=0.5),
      loss=LossConfig(box_loss="giou"),
      optimizer=OptimizerConfig(name="adamw", learning_rate=2e-3, weight_decay=0.2, warmup_steps=200,
                                warmup_start_factor=0.01, schedule="cosine", decay_norm_and_bias=True,
                                clip_grad_norm=10.0),
      data=synthetic_shapes_config(batch_size=8, eval_batch_size=64, max_boxes=20, vertical_flip_prob=0.5,
                                   transpose_prob=0.5),
      postprocess=PostprocessConfig(score_threshold=0.05, topk_per_level=1000, iou_threshold=0.5,
                                    max_detections=100),
      train=TrainConfig(total_steps=9000, log_every=500, checkpoint_every=3000, eval_every=0),
  )
