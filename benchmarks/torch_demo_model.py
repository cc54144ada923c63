"""A torchvision RetinaNet built to the size of a focal_jax config (the peer of the demo).

`build_torchvision_retinanet(config)` assembles torchvision's detection pieces
around a ResNet trunk written here to match `focal_jax.models.ResNet` layer
for layer:

* trunk: 7x7 stride-2 stem conv (padding 3) + trainable `BatchNorm2d` + ReLU +
  3x3 stride-2 max pool (padding 1), then torchvision's `BasicBlock`s with
  `width * 2**stage` channels, stride 2 on the first block of stages 2-4,
  1x1-conv + BatchNorm shortcuts where the shape changes; kaiming-normal
  (fan_out) conv init, as torchvision's `resnet*`;
* torchvision's `FeaturePyramidNetwork` over C3..C5 without extra blocks
  (our FPN adds P6/P7 only when `max_level > 5`);
* torchvision's `RetinaNetHead` with `GroupNorm(32)` (its v2 head), each tower
  cut to `head_convs` conv + norm + ReLU layers; the GIoU box loss is set as
  torchvision's v2 builder sets it (`regression_head._loss_type`);
* `OffsetAnchorGenerator`: our anchors (real-valued sizes, no rounding,
  centres at `(index + offset) * 2**level`) in torchvision's order;
* `GeneralizedRCNNTransform` with `min_size = max_size` = the input size and
  identity normalization: images arrive normalized and padded by our input
  pipeline, and the transform leaves them as they are (checked by
  `check_identity_transform`).

* the loss normalizer of `config.loss.normalizer`: "image" keeps
  torchvision's own head loss (each image's sums divided by its own
  foreground count, then averaged over images); "batch" (the demo's, as
  detectron2) uses `BatchNormalizedRetinaNetHead`, the same focal and box
  losses divided by the batch's foreground count.

What stays torchvision's own: the matcher (same thresholds and low-quality
rule), the focal and GIoU loss functions and the post-processing (the same
thresholds).

`TorchvisionSide` trains it as the demo trains ours (AdamW without decay on
norms and biases, our learning-rate schedule, gradient-norm clipping) on our
input pipeline's batches and scores it with our pycocotools code; it is the
torchvision side of `bench_time_to_accuracy.py`.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
import torchvision
from flax import traverse_util
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import Matcher, _box_loss
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from focal_jax import data as input_pipeline
from focal_jax.ops.anchors import AnchorConfig, generate_anchors
from focal_jax.engine.config import ExperimentConfig
from focal_jax.convert import torchvision_key
from focal_jax.engine.evaluation import coco_evaluate, detections_to_coco
from focal_jax.engine.train_step import learning_rate_schedule


class ResNetTrunk(nn.Module):
  """Stem + basic-block stages `layer1`.. (torchvision's names); returns `OrderedDict` of C_min_level..C5.

  The keys of the result are "c3", "c4", ...
  """

  def __init__(self, stage_sizes, width: int, min_level: int):
    super().__init__()
    self.min_level = min_level
    self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    channels = width
    for stage, num_blocks in enumerate(stage_sizes):
      planes = width * 2**stage
      blocks = []
      for index in range(num_blocks):
        stride = 2 if stage > 0 and index == 0 else 1
        downsample = None
        if stride != 1 or channels != planes:
          downsample = nn.Sequential(nn.Conv2d(channels, planes, kernel_size=1, stride=stride, bias=False),
                                     nn.BatchNorm2d(planes))
        blocks.append(BasicBlock(channels, planes, stride, downsample))
        channels = planes
      self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.channels = [width * 2**stage for stage in range(min_level - 2, len(stage_sizes))]
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
      elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

  def forward(self, x: torch.Tensor) -> OrderedDict:
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    features = OrderedDict()
    for stage in range(self.num_stages):
      x = getattr(self, f"layer{stage + 1}")(x)
      if stage + 2 >= self.min_level:
        features[f"c{stage + 2}"] = x
    return features


class ResNetFPN(nn.Module):
  """`ResNetTrunk` + torchvision's `FeaturePyramidNetwork` (P_min_level..P5, no extra levels)."""

  def __init__(self, stage_sizes, width: int, fpn_channels: int, min_level: int):
    super().__init__()
    self.body = ResNetTrunk(stage_sizes, width, min_level)
    self.fpn = FeaturePyramidNetwork(self.body.channels, fpn_channels)
    self.out_channels = fpn_channels

  def forward(self, x: torch.Tensor) -> OrderedDict:
    return self.fpn(self.body(x))


class OffsetAnchorGenerator(AnchorGenerator):
  """torchvision's `AnchorGenerator` with the anchors of a focal_jax `AnchorConfig`.

  Base anchors of size `size * scale` (not truncated) and ratio `r` (height /
  width) are `width = size * scale / sqrt(r)`, `height = size * scale *
  sqrt(r)` around the origin, not rounded; they are shifted to
  `((j + offset) * 2**level, (i + offset) * 2**level)`. Computed in float64
  and cast to the features' dtype, once per feature-map geometry.
  """

  def __init__(self, config: AnchorConfig):
    sizes = tuple(tuple(size * scale for scale in config.scales) for size in config.sizes)
    super().__init__(sizes, (tuple(config.aspect_ratios),) * len(sizes))
    self.config = config
    self._cache = {}

  def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")):
    """`[A, 4]` float64 anchors around the origin, ratio-major then scale (`dtype` is applied later)."""
    scales = torch.as_tensor(scales, dtype=torch.float64, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float64, device=device)
    heights = (torch.sqrt(ratios)[:, None] * scales[None, :]).reshape(-1)
    widths = ((1 / torch.sqrt(ratios))[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-widths, -heights, widths, heights], dim=1) / 2

  def level_anchors(self, grid_sizes, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`[A_total, 4]` anchors of feature maps of `grid_sizes` (levels min..max), in our order."""
    key = (tuple(grid_sizes), dtype, device)
    if key not in self._cache:
      per_level = []
      for level, (rows, cols), base in zip(self.config.levels, grid_sizes, self.cell_anchors):
        stride = 2.0**level
        ys = (torch.arange(rows, dtype=torch.float64, device=device) + self.config.offset) * stride
        xs = (torch.arange(cols, dtype=torch.float64, device=device) + self.config.offset) * stride
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([grid_x, grid_y, grid_x, grid_y], dim=-1).reshape(-1, 1, 4)
        per_level.append((shifts + base.to(device)[None]).reshape(-1, 4))
      self._cache[key] = torch.cat(per_level).to(dtype)
    return self._cache[key]

  def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
    grid_sizes = [tuple(feature_map.shape[-2:]) for feature_map in feature_maps]
    anchors = self.level_anchors(grid_sizes, feature_maps[0].dtype, feature_maps[0].device)
    return [anchors] * len(image_list.image_sizes)


class BatchNormalizedRetinaNetHead(RetinaNetHead):
  """torchvision's `RetinaNetHead` with both losses divided by the batch's foreground count.

  The per-image sums are torchvision's (`sigmoid_focal_loss` over the anchors
  that are not ignored, its `_box_loss` over the foreground anchors); only the
  normalizer differs: `sum over images / max(1, foreground anchors of the
  batch)`, as `focal_jax.retinanet_loss(normalizer="batch")`.
  """

  def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
    box_coder = self.regression_head.box_coder
    box_loss_type = self.regression_head._loss_type  # pylint: disable=protected-access
    classification_sum, box_sum, num_foreground = 0.0, 0.0, 0
    for target, cls_logits, box_deltas, image_anchors, matched in zip(
        targets, head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, matched_idxs):
      foreground = matched >= 0
      num_foreground += int(foreground.sum())
      cls_targets = torch.zeros_like(cls_logits)
      cls_targets[foreground, target["labels"][matched[foreground]]] = 1.0
      counted = matched != Matcher.BETWEEN_THRESHOLDS
      classification_sum = classification_sum + sigmoid_focal_loss(
          cls_logits[counted], cls_targets[counted], reduction="sum")
      box_sum = box_sum + _box_loss(box_loss_type, box_coder, image_anchors[foreground],
                                    target["boxes"][matched[foreground]], box_deltas[foreground])
    normalizer = max(1, num_foreground)
    return {"classification": classification_sum / normalizer, "bbox_regression": box_sum / normalizer}


def check_config(config: ExperimentConfig) -> None:
  """Raises ValueError for the options of `config` that this torch model does not reproduce."""
  model, loss = config.model, config.loss
  unsupported = {
      "model.block must be 'basic'": model.block != "basic",
      "model.backbone_norm must be 'bn' with frozen_stages=0": model.backbone_norm != "bn"
                                                              or model.frozen_stages != 0,
      "model.head_norm must be 'group_norm'": model.head_norm != "group_norm",
      "model.head_channels must equal model.fpn_channels": model.head_channels != model.fpn_channels,
      "anchors.max_level must be 5 (no P6/P7) and stage_sizes have 4 stages":
          config.anchors.max_level != 5 or len(model.stage_sizes or ()) != 4,
      "loss.alpha / loss.gamma must be torchvision's 0.25 / 2": (loss.alpha, loss.gamma) != (0.25, 2.0),
      "loss.allow_low_quality must be True": not loss.allow_low_quality,
      "loss.box_loss must be 'giou' or 'l1'": loss.box_loss not in ("giou", "l1"),
  }
  problems = [message for message, bad in unsupported.items() if bad]
  if problems:
    raise ValueError("the torchvision peer cannot reproduce this config: " + "; ".join(problems) + ".")


def build_torchvision_retinanet(config: ExperimentConfig) -> RetinaNet:
  """torchvision's `RetinaNet` of the size of `config` (see the module docstring)."""
  check_config(config)
  model_config = config.model
  backbone = ResNetFPN(model_config.stage_sizes, model_config.width, model_config.fpn_channels,
                       config.anchors.min_level)
  head_class = BatchNormalizedRetinaNetHead if config.loss.normalizer == "batch" else RetinaNetHead
  head = head_class(model_config.fpn_channels, config.anchors.anchors_per_location, config.data.num_classes,
                    norm_layer=functools.partial(nn.GroupNorm, 32))
  for tower in (head.classification_head, head.regression_head):
    tower.conv = tower.conv[:model_config.head_convs]
  head.regression_head._loss_type = config.loss.box_loss  # pylint: disable=protected-access
  height, width = config.data.padded_size
  post = config.postprocess
  return RetinaNet(
      backbone, config.data.num_classes, min_size=min(height, width), max_size=max(height, width),
      image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
      anchor_generator=OffsetAnchorGenerator(config.anchors), head=head,
      score_thresh=post.score_threshold, nms_thresh=post.iou_threshold,
      detections_per_img=post.max_detections, topk_candidates=post.topk_per_level,
      fg_iou_thresh=config.loss.foreground_iou, bg_iou_thresh=config.loss.background_iou)


def focal_jax_variables(tensors: Mapping[str, torch.Tensor], template: dict) -> dict:
  """Torch tensors keyed as in a state dict (the peer's) as our variables, shaped like `template`.

  `tensors` is e.g. `model.state_dict()`, or `{name: p.grad for name, p in
  model.named_parameters()}` with the `params` of `template` alone.
  `template` holds collections (`params`, `batch_stats`) of our model of the
  same config, e.g. from `model.init`; each leaf is read from the key that
  `focal_jax.convert.torchvision_key` names, convolution kernels turned from
  OIHW to HWIO. Raises ValueError when a key is missing, a shape differs or a
  tensor is left over (`num_batches_tracked` aside).
  """
  arrays = {key: value.detach().cpu().numpy() for key, value in tensors.items()
            if not key.endswith("num_batches_tracked")}
  variables, used = {}, set()
  for collection, tree in template.items():
    leaves = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
      key = torchvision_key(path)
      if key not in arrays:
        raise ValueError(f"no torch tensor {key!r} for our {collection}/{'/'.join(path)}.")
      array = arrays[key].transpose(2, 3, 1, 0) if arrays[key].ndim == 4 else arrays[key]
      if array.shape != leaf.shape:
        raise ValueError(f"{key!r} has shape {array.shape} in our layout; {'/'.join(path)} has {leaf.shape}.")
      leaves[path] = np.array(array, np.float32)
      used.add(key)
    variables[collection] = traverse_util.unflatten_dict(leaves)
  if set(arrays) - used:
    raise ValueError(f"torch tensors without a counterpart: {sorted(set(arrays) - used)}.")
  return variables


def check_anchors(model: RetinaNet, config: ExperimentConfig) -> int:
  """Asserts that the model's anchors for a padded input equal `generate_anchors`; returns their count."""
  height, width = config.data.padded_size
  was_training = model.training
  model.eval()
  with torch.no_grad():
    images = model.transform([torch.zeros(3, height, width)])[0]
    features = list(model.backbone(images.tensors).values())
    anchors = model.anchor_generator(images, features)[0].numpy()
  model.train(was_training)
  expected = generate_anchors((height, width), config.anchors)
  if anchors.shape != expected.shape or not np.array_equal(anchors, expected):
    raise AssertionError(f"the torch model's anchors {anchors.shape} differ from focal_jax's "
                         f"{expected.shape} for a {height}x{width} input.")
  return len(anchors)


def check_identity_transform(model: RetinaNet, images: torch.Tensor) -> None:
  """Asserts that `model.transform` passes `[B, 3, H, W]` images through unchanged (train and eval)."""
  was_training = model.training
  for training in (True, False):
    model.train(training)
    with torch.no_grad():
      transformed = model.transform(list(images))[0]
    if transformed.tensors.shape != images.shape or not torch.equal(transformed.tensors, images):
      raise AssertionError(f"GeneralizedRCNNTransform changed the images (training={training}): "
                           f"{tuple(images.shape)} -> {tuple(transformed.tensors.shape)}.")
  model.train(was_training)


def check_forward(model: RetinaNet, config: ExperimentConfig) -> None:
  """Asserts that an eval and a train forward work at the padded input size with the config's classes."""
  height, width = config.data.padded_size
  images = torch.randn(2, 3, height, width)
  was_training = model.training
  model.eval()
  with torch.no_grad():
    outputs = model(list(images))
  if len(outputs) != 2 or set(outputs[0]) != {"boxes", "scores", "labels"}:
    raise AssertionError(f"unexpected eval outputs: {[sorted(output) for output in outputs]}")
  model.train()
  targets = [{"boxes": torch.tensor([[8.0, 12.0, 40.0, 60.0]]),
              "labels": torch.tensor([config.data.num_classes - 1])},
             {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
  losses = model(list(images), targets)
  if not all(bool(torch.isfinite(value)) for value in losses.values()):
    raise AssertionError(f"non-finite losses at initialization: {losses}")
  model.train(was_training)


def make_optimizer(model: nn.Module, config: ExperimentConfig) -> torch.optim.Optimizer:
  """AdamW as `focal_jax.engine.train_step.make_optimizer` builds it (the learning rate is set at every step).

  Without `decay_norm_and_bias`, the 1-D tensors (biases, norm scales and
  shifts: the `bias` and `scale` leaves on our side) get no weight decay.
  """
  optimizer = config.optimizer
  if optimizer.name != "adamw":
    raise ValueError(f"the torchvision side reproduces AdamW only; got {optimizer.name!r}.")
  params = list(model.parameters())
  decays = [p.ndim > 1 or optimizer.decay_norm_and_bias for p in params]
  return torch.optim.AdamW(
      [{"params": [p for p, decay in zip(params, decays) if decay], "weight_decay": optimizer.weight_decay},
       {"params": [p for p, decay in zip(params, decays) if not decay], "weight_decay": 0.0}],
      lr=optimizer.learning_rate)


class TorchvisionSide:
  """The torchvision peer trained on our input pipeline's batches, scored with our COCO code.

  Checks the model before training: anchors equal to `generate_anchors`, an
  identity `GeneralizedRCNNTransform`, eval and train forwards.
  """

  name = "torchvision"

  def __init__(self, config: ExperimentConfig, threads: int, layout: str):
    torch.set_num_threads(threads)
    torch.manual_seed(config.train.seed)
    self._config = config
    self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_torchvision_retinanet(config)
    num_anchors = check_anchors(model, config)
    height, width = config.data.padded_size
    check_identity_transform(model, torch.randn(2, 3, height, width))
    check_forward(model, config)
    self._layout = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    self._model = model.to(self._device, memory_format=self._layout).train()
    self._optimizer = make_optimizer(self._model, config)
    total_steps = config.train.total_steps
    schedule = learning_rate_schedule(config.optimizer, total_steps)
    self._learning_rates = np.asarray(schedule(np.arange(total_steps + 1)), np.float64)
    self._step = 0
    self._data = input_pipeline.build_train_dataset(config.data, process_index=0, process_count=1)
    self._eval_data = input_pipeline.build_eval_dataset(config.data, process_index=0, process_count=1)
    self._ground_truth = input_pipeline.coco_ground_truth(config.data)
    self.num_params = sum(p.numel() for p in self._model.parameters())
    self.description = (f"torchvision {torchvision.__version__}, torch {torch.__version__} on "
                        f"{self._device.type}, {torch.get_num_threads()} threads, {layout}; "
                        f"{num_anchors} anchors equal to focal_jax's")

  @property
  def model(self) -> RetinaNet:
    return self._model

  def _images(self, batch) -> torch.Tensor:
    """NHWC float32 images -> `[B, 3, H, W]` on the device."""
    # A copy: tf.data's arrays are read-only, which torch warns about.
    images = torch.from_numpy(batch["images"].copy()).permute(0, 3, 1, 2)
    return images.to(self._device, memory_format=self._layout)

  def step(self) -> torch.Tensor:
    """One optimizer step on the next batch; returns the loss."""
    batch = next(self._data)
    targets = [{"boxes": torch.from_numpy(boxes[valid]).to(self._device),
                "labels": torch.from_numpy(classes[valid]).to(self._device, torch.int64)}
               for boxes, classes, valid in zip(batch["boxes"], batch["classes"], batch["valid"])]
    for group in self._optimizer.param_groups:
      group["lr"] = float(self._learning_rates[min(self._step, len(self._learning_rates) - 1)])
    losses = self._model(list(self._images(batch)), targets)
    loss = losses["classification"] + losses["bbox_regression"]
    self._optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self._config.optimizer.clip_grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(self._model.parameters(), self._config.optimizer.clip_grad_norm)
    self._optimizer.step()
    self._step += 1
    return loss.detach()

  def evaluate(self) -> dict[str, float]:
    """COCO numbers of the eval split, boxes mapped from network-input to original pixels."""
    max_detections = self._config.postprocess.max_detections
    results = []
    self._model.eval()
    with torch.no_grad():
      for batch in self._eval_data:
        outputs = self._model(list(self._images(batch)))  # boxes in network-input pixels
        size = len(outputs)
        boxes = np.zeros((size, max_detections, 4), np.float32)
        scores = np.zeros((size, max_detections), np.float32)
        classes = np.full((size, max_detections), -1, np.int32)
        valid = np.zeros((size, max_detections), bool)
        for i, output in enumerate(outputs):
          count = len(output["scores"])
          height, width = batch["original_size"][i]
          original = output["boxes"].cpu().numpy() / batch["scale"][i]
          boxes[i, :count] = np.clip(original, 0, [width, height, width, height])
          scores[i, :count] = output["scores"].cpu().numpy()
          classes[i, :count] = output["labels"].cpu().numpy()
          valid[i, :count] = True
        results += detections_to_coco(boxes, scores, classes, valid, batch["image_id"],
                                      self._config.data.labels.category_ids)
    self._model.train()
    return coco_evaluate(self._ground_truth, results)
