"""Tests of focal_jax.engine.config: every bad value is refused where the config is built.

No test here compiles or writes anything: a refused override must fail in
`apply_overrides`, before a run could start.
"""

import dataclasses
import json

import pytest

from experiments import configs
from focal_jax.engine.config import apply_overrides, from_json, to_json
from focal_jax.ops.anchors import AnchorConfig


@pytest.fixture(scope="module")
def demo():
  return configs.get_config("demo")


@pytest.mark.parametrize("name", configs.NAMES)
def test_every_recipe_is_valid_and_round_trips_through_json(name):
  config = configs.get_config(name)
  assert from_json(to_json(config)) == config


@pytest.mark.parametrize("override, message", [
    # booleans are not integers, and the reverse
    ("train.total_steps=True", r"train.total_steps takes an integer; got True"),
    ("model.cpu_rewrites.fused_batch_norm=1", r"fused_batch_norm takes True or False; got 1"),
    ("data.auto_prepare=0", r"data.auto_prepare takes True or False"),
    # counts and divisors that must be positive
    ("train.keep_checkpoints=0", r"train.keep_checkpoints must be positive; got 0"),
    ("train.log_every=0", r"train.log_every must be positive"),
    ("train.checkpoint_every=-5", r"train.checkpoint_every must be positive"),
    ("train.eval_every=-1", r"train.eval_every must be >= 0"),
    ("data.batch_size=0", r"data.batch_size must be positive"),
    ("data.eval_batch_size=0", r"data.eval_batch_size must be positive"),
    ("data.size_divisibility=0", r"data.size_divisibility must be positive"),
    ("model.width=0", r"width must be positive"),
    ("model.head_norm_groups=5", r"group count that divides the head's 64 channels"),
    # probabilities and fractions outside [0, 1]
    ("data.flip_prob=1.5", r"data.flip_prob is a probability"),
    ("data.transpose_prob=-0.1", r"data.transpose_prob is a probability"),
    ("model.prior_prob=1.0", r"prior_prob must be in \(0, 1\)"),
    ("postprocess.score_threshold=-0.1", r"postprocess.score_threshold must be a number in \[0, 1\]"),
    ("loss.foreground_iou=0.3", r"background_iou <= foreground_iou"),
    ("optimizer.momentum=1.0", r"optimizer.momentum must be in \[0, 1\)"),
    # loss parameters
    ("loss.gamma=-1", r"loss.gamma must be >= 0"),
    ("loss.alpha=1.5", r"loss.alpha weighs the positives, in \[0, 1\]"),
    ("loss.box_loss='l2'", r"loss.box_loss must be one of l1, smooth_l1, giou; got 'l2'"),
    ("loss.normalizer='anchors'", r"loss.normalizer must be one of batch, image"),
    ("loss.gamma=1e999", r"loss.gamma takes a finite number"),
    # names and choices
    ("model.head_norm='batch_norm'", r"head norm must be one of"),
    ("data.resize='stretch'", r"data.resize must be 'square' or 'short_side'"),
    ("optimizer.decay_boundaries=(80, 60)", r"decay_boundaries must be increasing"),
    ("data.eval_split=''", r"data.eval_split must not be empty"),
    # anchors that the model or the memory cannot take
    ("anchors.sizes=(8, 16)", r"anchors.sizes must give one size per level"),
    ("data.image_size=200000", r"anchors per image: matching a batch .* more than this machine's"),
])
def test_bad_values_are_refused_when_the_config_is_built(demo, override, message):
  with pytest.raises(ValueError, match=message):
    apply_overrides(demo, [override])


def test_good_values_pass(demo):
  config = apply_overrides(demo, ["loss.alpha=None", "loss.gamma=0", "model.prior_prob=0.5", "train.eval_every=0",
                                  "data.eval_batch_size=None", "optimizer.learning_rate=1"])
  assert config.loss.alpha is None and config.loss.gamma == 0.0 and config.optimizer.learning_rate == 1.0


def test_a_saved_config_with_a_bad_value_is_refused_by_name(demo):
  saved = json.loads(to_json(demo))
  saved["train"]["total_steps"] = True
  with pytest.raises(ValueError, match="train.total_steps takes an integer"):
    from_json(json.dumps(saved))


def test_the_config_checks_the_model_with_the_anchor_levels(demo):
  anchors = AnchorConfig(min_level=1, max_level=3, sizes=(8.0, 16.0, 32.0))
  with pytest.raises(ValueError, match=r"model \(with anchors levels 1-3\): need 2 <= min_level"):
    dataclasses.replace(demo, anchors=anchors)
