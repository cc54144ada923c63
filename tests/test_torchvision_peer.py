"""Our training step against torchvision's on the same weights and batch, and our optimizer against torch's.

The peer is the torchvision RetinaNet of `benchmarks/torch_demo_model.py`,
the model that the time-to-accuracy benchmark trains against ours: torchvision's
own matcher, focal and box losses and backward pass. Given the same weights
and images, our loss and every gradient must equal its own; given the same
gradients, our optimizer (AdamW or SGD, weight-decay mask, clipping, warmup
and cosine schedule) must move the parameters as torch's optimizers do, with
the learning rate computed here from the schedule's definition.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.torch_demo_model import build_torchvision_retinanet, focal_jax_variables
from experiments.configs import demo
from focal_jax.ops.anchors import generate_anchors
from focal_jax.engine.config import LossConfig, OptimizerConfig
from focal_jax.ops.losses import retinanet_loss
from focal_jax.ops.matching import batch_match_anchors
from focal_jax.engine.config import model_from_config
from focal_jax.engine.train_step import make_optimizer

SIZE = 64


def _small_demo_config(loss: LossConfig):
  """The demo's architecture at a test's size: 64x64 inputs, width 8, 32 FPN and head channels."""
  config = demo.get_config()
  model = dataclasses.replace(config.model, width=8, fpn_channels=32, head_channels=32, head_convs=1)
  data = dataclasses.replace(config.data, image_size=SIZE, size_divisibility=SIZE, batch_size=2)
  return dataclasses.replace(config, model=model, data=data, loss=loss)


def _batch(num_classes: int):
  """Two images: three objects (one small, two overlapping) and none; padding rows are invalid."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
  boxes = np.zeros((2, 4, 4), np.float32)
  boxes[0, :3] = [[4.0, 6.0, 20.0, 18.0], [18.5, 10.0, 60.0, 50.0], [24.0, 16.0, 58.0, 62.0]]
  classes = np.zeros((2, 4), np.int32)
  classes[0, :3] = [0, num_classes - 1, 1]
  valid = np.zeros((2, 4), bool)
  valid[0, :3] = True
  return images, boxes, classes, valid


def _relative_difference(ours, reference) -> float:
  reference = np.asarray(reference, np.float64)
  return float(np.linalg.norm(np.asarray(ours, np.float64) - reference) / np.linalg.norm(reference))


# The demo's losses, and torchvision's own head loss (per-image normalizer) with its L1 box loss.
@pytest.mark.parametrize("box_loss, normalizer", [("giou", "batch"), ("l1", "image")])
def test_loss_and_gradients_equal_torchvision(box_loss, normalizer):
  config = _small_demo_config(LossConfig(box_loss=box_loss, normalizer=normalizer))
  torch.manual_seed(0)
  peer = build_torchvision_retinanet(config).train()
  model = model_from_config(config)
  template = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
  variables = focal_jax_variables(peer.state_dict(), template)
  images, boxes, classes, valid = _batch(config.data.num_classes)

  targets = [{"boxes": torch.from_numpy(b[v]), "labels": torch.from_numpy(c[v]).long()}
             for b, c, v in zip(boxes, classes, valid)]
  peer_losses = peer(list(torch.from_numpy(images).permute(0, 3, 1, 2)), targets)
  (peer_losses["classification"] + peer_losses["bbox_regression"]).backward()
  peer_grads = focal_jax_variables({name: p.grad for name, p in peer.named_parameters()},
                                   {"params": template["params"]})["params"]

  anchors = jnp.asarray(generate_anchors((SIZE, SIZE), config.anchors))
  loss_config = config.loss
  matched_classes, matched_boxes = batch_match_anchors(
      anchors, boxes, classes, valid, foreground_iou=loss_config.foreground_iou,
      background_iou=loss_config.background_iou, allow_low_quality=loss_config.allow_low_quality)

  def loss_fn(params):
    (cls_logits, box_deltas), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                              images, train=True, mutable=["batch_stats"])
    losses = retinanet_loss(cls_logits, box_deltas, anchors, matched_classes, matched_boxes,
                            alpha=loss_config.alpha, gamma=loss_config.gamma, box_loss=box_loss,
                            smooth_l1_beta=loss_config.smooth_l1_beta, normalizer=normalizer)
    return losses["loss"], losses

  (_, losses), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])

  assert int(losses["num_foreground"]) > 0
  np.testing.assert_allclose(losses["classification_loss"], peer_losses["classification"].item(), rtol=1e-5)
  np.testing.assert_allclose(losses["box_loss"], peer_losses["bbox_regression"].item(), rtol=1e-5)
  peer_grads = traverse_util.flatten_dict(peer_grads)
  differences = {"/".join(path): _relative_difference(grad, peer_grads[path])
                 for path, grad in traverse_util.flatten_dict(grads).items()}
  assert len(differences) == len(peer_grads)
  assert max(differences.values()) < 1e-4, sorted(differences.items(), key=lambda item: -item[1])[:5]


def _reference_learning_rate(config: OptimizerConfig, total_steps: int, step: int) -> float:
  """Linear warmup from `lr * warmup_start_factor`, then cosine decay to 0 at `total_steps`."""
  lr, warmup = config.learning_rate, config.warmup_steps
  if step < warmup:
    return lr * (config.warmup_start_factor + (1 - config.warmup_start_factor) * step / warmup)
  return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total_steps - warmup)))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_optimizer_steps_equal_torch(name):
  total_steps = 6
  config = OptimizerConfig(name=name, learning_rate=0.05, momentum=0.9, weight_decay=0.01, warmup_steps=2,
                           warmup_start_factor=0.1, schedule="cosine", decay_norm_and_bias=False,
                           clip_grad_norm=3.0)
  rng = np.random.default_rng(1)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 4, 5)), "bias": rng.normal(size=5)},
            "norm": {"scale": 1 + 0.1 * rng.normal(size=5), "bias": rng.normal(size=5)},
            "frozen": {"kernel": rng.normal(size=(1, 1, 5, 2))}}
  params = jax.tree.map(lambda x: x.astype(np.float32), params)
  trainable = {"conv": {"kernel": True, "bias": True}, "norm": {"scale": True, "bias": True},
               "frozen": {"kernel": False}}
  # Gradient norms of about 1.4 and 14 over the trainable leaves: every other step is clipped.
  grads = [jax.tree.map(lambda x, s=scale: (s * rng.normal(size=x.shape)).astype(np.float32), params)
           for scale in (0.1, 1.0, 0.1, 1.0, 0.1, 1.0)]

  tx = make_optimizer(config, total_steps, trainable)
  ours = jax.tree.map(jnp.asarray, params)
  state = tx.init(ours)
  for grad in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, grad), state, ours)
    ours = jax.tree.map(lambda p, u: p + u, ours, updates)

  flat = traverse_util.flatten_dict(params)
  tensors = {path: torch.tensor(value, dtype=torch.float64, requires_grad=True) for path, value in flat.items()}
  trained = [path for path in flat if traverse_util.flatten_dict(trainable)[path]]
  decayed = [tensors[path] for path in trained if tensors[path].ndim > 1]
  not_decayed = [tensors[path] for path in trained if tensors[path].ndim == 1]
  groups = [{"params": decayed, "weight_decay": config.weight_decay}, {"params": not_decayed, "weight_decay": 0.0}]
  if name == "adamw":
    reference = torch.optim.AdamW(groups, lr=config.learning_rate)
  else:
    reference = torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum)
  for step, grad in enumerate(grads):
    flat_grad = traverse_util.flatten_dict(grad)
    for path in trained:
      tensors[path].grad = torch.tensor(flat_grad[path], dtype=torch.float64)
    torch.nn.utils.clip_grad_norm_([tensors[path] for path in trained], config.clip_grad_norm)
    for group in reference.param_groups:
      group["lr"] = _reference_learning_rate(config, total_steps, step)
    reference.step()

  for path, value in traverse_util.flatten_dict(ours).items():
    expected = tensors[path].detach().numpy()
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg="/".join(path))
  np.testing.assert_array_equal(traverse_util.flatten_dict(ours)[("frozen", "kernel")], params["frozen"]["kernel"])
