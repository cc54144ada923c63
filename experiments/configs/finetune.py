"""Fine-tune the demo model on your own COCO-format dataset (a folder of images + an annotation json).

    python -m experiments.coco_retinanet    # the demo run, into runs/demo
    python -m focal_jax.data.coco_folder --name my_objects --train IMAGES_DIR TRAIN.json \\
        --validation IMAGES_DIR VAL.json --data_dir DIR
    python -m experiments.coco_retinanet --config finetune --workdir runs/my_objects \\
        --data.dataset=my_objects --data.data_dir=DIR

The demo's network and anchors, initialised from the demo run in `runs/demo`
(`--train.init_checkpoint=WORKDIR` for another run of the same model, `=None`
to start from scratch): every weight is loaded except the classification
head's last layer, which starts afresh when the number of classes differs.
Images are scaled so that their long side is 256 px (x0.8-1.25 jitter, random
flips), so objects of 10-100 px at that scale suit the demo's anchors (20-135
px); AdamW at 1e-3 with warmup and cosine decay, batch 16, 2,000 steps.
There is no expected figure: it depends on your data. Set `--data.image_size`
and the schedule (`--train.total_steps`, `--optimizer.learning_rate`) to your
images and their number.
"""

import dataclasses

from experiments.configs import demo
from focal_jax.engine.config import ExperimentConfig
from focal_jax.data import InputConfig


def get_config() -> ExperimentConfig:
  config = demo.get_config()
  return dataclasses.replace(
      config,
      # The demo's weight decay of 0.2 was chosen for training from scratch; fine-tuning keeps 1e-4.
      optimizer=dataclasses.replace(config.optimizer, learning_rate=1e-3, warmup_steps=100, weight_decay=1e-4),
      data=InputConfig(dataset="my_objects", resize="square", image_size=256, scale_range=(0.8, 1.25),
                       batch_size=16, eval_batch_size=16, max_boxes=50),
      train=dataclasses.replace(config.train, total_steps=2000, log_every=50, checkpoint_every=500,
                                init_checkpoint="runs/demo"),
  )
