"""The RetinaNet training step and everything it needs: optimizer, state, the jitted step.

`train_step` is a top-level pure function; `compile_train_step` jits it at the
call site with the data-parallel shardings (batch over the mesh's `data` axis,
state replicated) and donates the old state. The loss normalizer (the number
of foreground anchors) is counted over the whole global batch.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from focal_jax.engine.config import ExperimentConfig, LossConfig, OptimizerConfig
from focal_jax.ops.losses import retinanet_loss
from focal_jax.ops.matching import batch_match_anchors
from focal_jax.models import RetinaNet
from focal_jax.engine.mesh import batch_sharded, replicated


@flax.struct.dataclass
class TrainState:
  """What a training run carries from step to step (and checkpoints)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup, then step decay or cosine decay (see `OptimizerConfig`)."""
  warmup = optax.linear_schedule(config.learning_rate * config.warmup_start_factor, config.learning_rate,
                                 max(config.warmup_steps, 1))
  if config.schedule == "cosine":
    after = optax.cosine_decay_schedule(config.learning_rate, max(total_steps - config.warmup_steps, 1))
  else:
    after = optax.piecewise_constant_schedule(
        config.learning_rate,
        {boundary - config.warmup_steps: config.decay_factor for boundary in config.decay_boundaries})
  return optax.join_schedules([warmup, after], [config.warmup_steps])


_NORM_OR_BIAS = re.compile(r"(^|/)(bias|scale)$")


def _decay_mask(params):
  """False on biases and norm scales (their leaf names are `bias` and `scale`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not _NORM_OR_BIAS.search("/".join(str(getattr(k, "key", k)) for k in path)), params)


def make_optimizer(config: OptimizerConfig, total_steps: int, trainable_mask) -> optax.GradientTransformation:
  """SGD with momentum (or AdamW), weight decay, the schedule, optional clipping.

  Parameters where `trainable_mask` is False (frozen backbone stages) get no
  update at all, weight decay included.
  """
  schedule = learning_rate_schedule(config, total_steps)
  decay_mask = True if config.decay_norm_and_bias else _decay_mask
  if config.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask)
  else:
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
                     optax.sgd(schedule, momentum=config.momentum))
  if config.clip_grad_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.clip_grad_norm), tx)
  labels = jax.tree.map(lambda trainable: "train" if trainable else "freeze", trainable_mask)
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


# Initialization runs once, and its program (mostly the random number generator, unrolled for
# every parameter) compiles at XLA's optimization level 1 in a fraction of the default's time.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def create_train_state(model: RetinaNet, config: ExperimentConfig, rng: jax.Array, mesh) -> tuple[
    TrainState, optax.GradientTransformation]:
  """Initializes parameters and optimizer state, replicated over `mesh`."""
  height, width = config.data.padded_size
  dummy = jnp.zeros((1, height, width, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), rng, dummy)
  tx = make_optimizer(config.optimizer, config.train.total_steps, model.trainable_mask(variables["params"]))

  def init(rng):
    variables = model.init(rng, dummy, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  init = jax.jit(init, out_shardings=replicated(mesh)).lower(rng).compile(INIT_COMPILER_OPTIONS)
  return init(rng), tx


def train_step(state: TrainState, batch: dict, *, model: RetinaNet, tx: optax.GradientTransformation,
               anchors: np.ndarray, loss_config: LossConfig) -> tuple[TrainState, dict]:
  """One optimizer step on a (global) batch.

  `batch` holds `images [B, H, W, 3]`, `boxes [B, M, 4]`, `classes [B, M]` and
  `valid [B, M]`. A step whose loss is not finite leaves the state unchanged
  (and reports the loss, so that the loop can stop).
  """
  anchors = jnp.asarray(anchors)
  matched_classes, matched_boxes = batch_match_anchors(
      anchors, batch["boxes"], batch["classes"], batch["valid"], foreground_iou=loss_config.foreground_iou,
      background_iou=loss_config.background_iou, allow_low_quality=loss_config.allow_low_quality)

  def loss_fn(params):
    (cls_logits, box_deltas), updates = model.apply(
        {"params": params, "batch_stats": state.batch_stats}, batch["images"], train=True,
        mutable=["batch_stats"])
    losses = retinanet_loss(
        cls_logits, box_deltas, anchors, matched_classes, matched_boxes, alpha=loss_config.alpha,
        gamma=loss_config.gamma, box_loss=loss_config.box_loss, smooth_l1_beta=loss_config.smooth_l1_beta,
        normalizer=loss_config.normalizer, classification=loss_config.classification,
        ohem_batch_size=loss_config.ohem_batch_size, ohem_positive_fraction=loss_config.ohem_positive_fraction,
        ohem_iou_threshold=loss_config.ohem_iou_threshold)
    return losses["loss"], (losses, updates.get("batch_stats", {}))

  (loss, (losses, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)

  def apply_gradients(state):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      batch_stats=batch_stats, opt_state=opt_state)

  # A branch rather than a select between old and new state: only the branch taken
  # runs, whereas a select makes one more pass over every parameter and optimizer
  # state to choose between the two.
  new_state = jax.lax.cond(jnp.isfinite(loss), apply_gradients, lambda state: state, state)
  return new_state, {**losses, "grad_norm": optax.tree.norm(grads)}


def compile_train_step(model, tx, anchors, loss_config: LossConfig, mesh):
  """`train_step` jitted for `mesh`: batch sharded on `data`, state replicated and donated."""
  step = functools.partial(train_step, model=model, tx=tx, anchors=anchors, loss_config=loss_config)
  return jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)),
                 out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)
