"""tf.data input pipelines over TFDS `coco/2017`, `synthetic_shapes` and folder datasets (same features).

Batches are dicts of NumPy arrays (per process; `B` = per-process batch size,
`M` = `max_boxes`, `(H, W)` = `config.padded_size`):

| key | train | eval | meaning |
| --- | --- | --- | --- |
| `images` | yes | yes | float32 [B, H, W, 3], ImageNet mean/std normalized, zero padded right/bottom |
| `boxes` | yes | yes | float32 [B, M, 4] xyxy in pixels of the network input, zero padded |
| `classes` | yes | yes | int32 [B, M] contiguous 0..K-1, -1 in padding |
| `valid` | yes | yes | bool [B, M], False for padding (crowd boxes are never in it) |
| `image_id` | | yes | int64 [B] TFDS `image/id` (the COCO image id) |
| `original_size` | | yes | int32 [B, 2] (height, width) of the stored image |
| `scale` | | yes | float32 [B] network pixels per original pixel: `boxes = original_boxes * scale` |
| `is_padding` | | yes | bool [B], True for the examples that fill the last batch |

Ground truth per example: crowd boxes and labels without a class are dropped,
boxes are clipped to the image (the count is logged) and zero-area boxes are
dropped; images without objects stay (negatives). With more than `max_boxes`
objects the largest ones are kept, sorted by area, and the count dropped is
logged (`iterator.stats`).

Determinism: the train stream of a process is a pure function of (config,
process_index, process_count). Epoch `e` reads its files and shuffles with
seeds derived from (seed, process_index, e); augmentation uses stateless random
ops keyed on (seed, process_index, e, position in epoch). `start_step=N` skips
straight to batch N (at most one epoch of records is read and skipped, never
decoded). Each epoch yields `steps_per_epoch = examples // batch_size` batches
(the remainder of each shuffled epoch is dropped). An undecodable image is
skipped and counted in the logs; after one, batch boundaries of that epoch
shift, so a resumed run is only exact while no example was skipped.

All TensorFlow work stays on the CPU (`hide_accelerators_from_tf`).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from focal_jax.data.config import (LABEL_MAP_FILE, InputConfig, dataset_base_name, default_data_dir,
                                   folder_dataset_dir)

log = logging.getLogger(__name__)

IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

Batch = dict[str, np.ndarray]


class DatasetNotFoundError(ValueError):
  """The requested TFDS dataset is not prepared in the data dir (nothing is downloaded)."""


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off GPUs/TPUs so that it never takes accelerator memory."""
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # already initialized, or no such device type
      pass


# --------------------------------------------------------------------------- datasets


def _is_synthetic(name: str) -> bool:
  return dataset_base_name(name) == "synthetic_shapes"


def _not_found_message(name: str, builder) -> str:
  data_dir = builder.data_dir_root if builder is not None else "(default data dir)"
  if name.startswith("coco"):
    how = (f"prepare it once where the internet is reachable with\n"
           f"    tfds build {name} --data_dir {data_dir}\n"
           f"(about 25 GB from cocodataset.org), then copy the '{name.split('/')[0]}' folder "
           f"into {data_dir}, or pass the data dir that holds it (--data_dir / "
           f"InputConfig.data_dir / $TFDS_DATA_DIR).")
  else:
    how = (f"prepare it with `tfds build {name} --data_dir {data_dir}` "
           f"or pass the data dir that holds it.")
  return f"Dataset {name!r} is not prepared in data dir {data_dir!r}: {how}"


def _unknown_dataset_message(name: str, data_dir: str | None) -> str:
  data_dir = data_dir or default_data_dir()
  return (f"Dataset {name!r} is neither a TFDS catalog dataset nor prepared in data dir {data_dir!r}. "
          f"For your own COCO-format dataset (a folder of images and an annotation json), prepare it "
          f"once with\n    python -m focal_jax.data.coco_folder --name {dataset_base_name(name)} "
          f"--train IMAGES_DIR ANNOTATIONS.json [--validation IMAGES_DIR ANNOTATIONS.json] "
          f"--data_dir {data_dir}\nor pass the data dir that holds it (--data.data_dir / "
          f"InputConfig.data_dir / $TFDS_DATA_DIR).")


def get_builder(config: InputConfig):
  """The TFDS builder of `config.dataset`.

  synthetic_shapes is built on first use; a folder dataset (written by
  `python -m focal_jax.data.coco_folder`) is read from its directory; other
  names go to `tfds.builder`.

  Raises:
    DatasetNotFoundError: the name is unknown to TFDS and no folder dataset of
      that name is in the data dir (the message says how to prepare one).
  """
  hide_accelerators_from_tf()
  name = config.dataset
  if _is_synthetic(name):
    from focal_jax.data import synthetic_shapes  # pylint: disable=g-import-not-at-top

    parts = name.split("/")
    builder = synthetic_shapes.SyntheticShapes(
        data_dir=config.data_dir, config=parts[1] if len(parts) > 1 else "default")
    if config.auto_prepare and not builder.is_prepared():
      builder = synthetic_shapes.prepare(config.data_dir, builder.builder_config.name)
    return builder
  folder = folder_dataset_dir(name, config.data_dir)
  if tf.io.gfile.exists(os.path.join(folder, LABEL_MAP_FILE)):
    return tfds.builder_from_directory(folder)
  try:
    return tfds.builder(name, data_dir=config.data_dir)
  except tfds.core.DatasetNotFoundError:
    raise DatasetNotFoundError(_unknown_dataset_message(name, config.data_dir)) from None
  except Exception as e:  # unknown config or version: one line, no traceback wall
    raise DatasetNotFoundError(f"Cannot load TFDS dataset {name!r} "
                               f"(data dir {config.data_dir!r}): {e}") from None


def require_prepared(config: InputConfig) -> None:
  """Raises `DatasetNotFoundError` (naming the data dir and how to prepare it) unless the
  dataset can be read; synthetic_shapes is built here when `auto_prepare` allows."""
  builder = get_builder(config)
  if not builder.is_prepared():
    raise DatasetNotFoundError(_not_found_message(config.dataset, builder))


def _as_dataset(builder, name: str, split, **kwargs) -> tf.data.Dataset:
  try:
    return builder.as_dataset(split=split, **kwargs)
  except Exception:  # pylint: disable=broad-except
    if builder.is_prepared():
      raise
    raise DatasetNotFoundError(_not_found_message(name, builder)) from None


def _process_split(split: str, process_index: int, process_count: int, drop_remainder: bool):
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]


def _num_examples(builder, name: str, split) -> int:
  """Examples in `split` (from the dataset info; counted when the info lacks it, as in mocks)."""
  try:
    return int(builder.info.splits[split].num_examples)
  except Exception:  # pylint: disable=broad-except
    ds = _as_dataset(builder, name, split, decoders={"image": tfds.decode.SkipDecoding()})
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def _process_defaults(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _seeds(*entropy: int, n: int) -> list[int]:
  return [int(s) for s in np.random.SeedSequence(list(entropy)).generate_state(n)]


def _pipeline_options() -> tf.data.Options:
  """Deterministic order, and no tf.data autotuning.

  An autotuned pipeline runs a model-optimization thread that its iterator
  waits for when destroyed; beside a busy train step that wait reached 25-35 s
  at epoch ends (each epoch is an iterator of its own). Without autotuning,
  buffers keep their configured sizes (see `_parallel_calls`).
  """
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = False
  return options


def _parallel_calls(config: InputConfig) -> int:
  """`config.num_parallel_calls`, with -1 meaning one call per CPU core."""
  return config.num_parallel_calls if config.num_parallel_calls > 0 else os.cpu_count() or 1


def _read_config(shuffle_seed: int | None = None) -> tfds.ReadConfig:
  return tfds.ReadConfig(shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False,
                         try_autocache=False, skip_prefetch=True, options=_pipeline_options())


_SKIP_IMAGE_DECODING = {"image": tfds.decode.SkipDecoding()}

# --------------------------------------------------------------------------- per example


def decode_example(example: dict[str, Any], config: InputConfig) -> dict[str, tf.Tensor]:
  """A TFDS example -> image uint8 [h, w, 3] and target boxes xyxy in its pixels.

  Returns a dict with `image`, `boxes` float32 [n, 4], `classes` int32 [n],
  `image_id` int64, and counters `_clipped` (boxes that reached outside the
  image), `_invalid` (zero-area or inverted boxes dropped); crowd boxes and
  labels that map to no class are dropped.
  """
  image = example["image"]
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  image = tf.ensure_shape(image, [None, None, 3])
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)

  objects = example["objects"]
  bbox = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])  # ymin, xmin, ymax, xmax
  clipped = tf.clip_by_value(bbox, 0.0, 1.0)
  was_clipped = tf.reduce_any(tf.abs(clipped - bbox) > 1e-6, axis=1)
  ymin, xmin, ymax, xmax = tf.unstack(clipped, axis=1)
  boxes = tf.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1)

  label_to_class = tf.constant(config.labels.label_to_class, tf.int32)
  labels = tf.cast(objects["label"], tf.int32)
  in_range = (labels >= 0) & (labels < len(config.labels.label_to_class))
  classes = tf.where(in_range, tf.gather(label_to_class, tf.clip_by_value(
      labels, 0, len(config.labels.label_to_class) - 1)), -1)
  is_target = ~tf.cast(objects["is_crowd"], tf.bool) & (classes >= 0)
  positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  keep = is_target & positive
  return {
      "image": image,
      "boxes": tf.boolean_mask(boxes, keep),
      "classes": tf.boolean_mask(classes, keep),
      "image_id": tf.cast(example["image/id"], tf.int64),
      "_clipped": tf.reduce_sum(tf.cast(was_clipped & is_target, tf.int32)),
      "_invalid": tf.reduce_sum(tf.cast(is_target & ~positive, tf.int32)),
  }


def _resize_scale(h, w, config: InputConfig, seed=None):
  """Scale factor (network pixels per image pixel) of the resize step."""
  if config.resize == "square":
    target = tf.constant(float(config.image_size))
    if seed is not None:
      lo, hi = config.scale_range
      target = target * tf.random.stateless_uniform([], seed, minval=lo, maxval=hi)
    return tf.minimum(target / h, target / w)
  if seed is not None:
    choices = tf.constant(config.short_side_choices, tf.float32)
    short = tf.gather(choices, tf.random.stateless_uniform(
        [], seed, minval=0, maxval=len(config.short_side_choices), dtype=tf.int32))
  else:
    short = tf.constant(float(config.eval_short_side))
  return tf.minimum(short / tf.minimum(h, w), config.max_size / tf.maximum(h, w))


def _resize(image, boxes, scale):
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  new_size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), 1)
  image = tf.image.resize(tf.cast(image, tf.float32), new_size, method="bilinear")
  return image, boxes * scale


def _normalize_and_pad(image, config: InputConfig):
  image = (image - tf.constant(IMAGENET_MEAN_RGB)) / tf.constant(IMAGENET_STD_RGB)
  ph, pw = config.padded_size
  image = image[:ph, :pw]  # no-op unless a short_side choice exceeds the pad size
  image = tf.image.pad_to_bounding_box(image, 0, 0, ph, pw)
  return tf.ensure_shape(image, [ph, pw, 3])


def _clip_and_filter(boxes, classes, height, width):
  boxes = tf.stack([tf.clip_by_value(boxes[:, 0], 0.0, width), tf.clip_by_value(boxes[:, 1], 0.0, height),
                    tf.clip_by_value(boxes[:, 2], 0.0, width), tf.clip_by_value(boxes[:, 3], 0.0, height)],
                   axis=1)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return tf.boolean_mask(boxes, keep), tf.boolean_mask(classes, keep)


def pad_ground_truth(boxes, classes, max_boxes: int):
  """Pads (or cuts to the `max_boxes` largest) -> boxes [M, 4], classes [M], valid [M], dropped."""
  n = tf.shape(boxes)[0]
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

  def largest():
    idx = tf.math.top_k(area, k=max_boxes, sorted=True).indices
    return tf.gather(boxes, idx), tf.gather(classes, idx)

  boxes, classes = tf.cond(n > max_boxes, largest, lambda: (boxes, classes))
  kept = tf.minimum(n, max_boxes)
  boxes = tf.pad(boxes, [[0, max_boxes - kept], [0, 0]])
  classes = tf.pad(classes, [[0, max_boxes - kept]], constant_values=-1)
  valid = tf.range(max_boxes) < kept
  return (tf.ensure_shape(boxes, [max_boxes, 4]), tf.ensure_shape(classes, [max_boxes]),
          valid, tf.maximum(n - max_boxes, 0))


def _network_example(image, boxes, classes, decoded, config: InputConfig) -> dict[str, tf.Tensor]:
  """Clips the boxes to the (resized) image, pads the ground truth, normalizes and pads the image."""
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  boxes, classes = _clip_and_filter(boxes, classes, size[0], size[1])
  gt_boxes, gt_classes, valid, dropped = pad_ground_truth(boxes, classes, config.max_boxes)
  return {
      "images": _normalize_and_pad(image, config),
      "boxes": gt_boxes,
      "classes": gt_classes,
      "valid": valid,
      "_dropped": dropped,
      "_clipped": decoded["_clipped"],
      "_invalid": decoded["_invalid"],
  }


def train_transform(decoded: dict[str, tf.Tensor], config: InputConfig, seed) -> dict[str, tf.Tensor]:
  """Flip, resize with jitter, crop (square mode), normalize, pad: one training example.

  `seed` is a stateless seed (int64 [2]); the same seed gives the same output.
  """
  image, boxes, classes = decoded["image"], decoded["boxes"], decoded["classes"]
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=4)
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)

  flip = tf.random.stateless_uniform([], seeds[0]) < config.flip_prob
  image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  boxes = tf.cond(flip, lambda: tf.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]],
                                         axis=1), lambda: boxes)

  image, boxes = _resize(image, boxes, _resize_scale(h, w, config, seeds[1]))
  new_shape = tf.shape(image)
  if config.resize == "square":  # random crop of at most image_size x image_size
    size = config.image_size
    spare = tf.cast(tf.maximum(new_shape[:2] - size, 0), tf.float32)
    oy = tf.cast(tf.floor(tf.random.stateless_uniform([], seeds[2]) * (spare[0] + 1)), tf.int32)
    ox = tf.cast(tf.floor(tf.random.stateless_uniform([], seeds[3]) * (spare[1] + 1)), tf.int32)
    oy, ox = tf.minimum(oy, tf.cast(spare[0], tf.int32)), tf.minimum(ox, tf.cast(spare[1], tf.int32))
    image = image[oy:oy + size, ox:ox + size]
    offset = tf.cast(tf.stack([ox, oy, ox, oy]), tf.float32)
    boxes = boxes - offset
  return _network_example(image, boxes, classes, decoded, config)


def eval_transform(decoded: dict[str, tf.Tensor], config: InputConfig) -> dict[str, tf.Tensor]:
  """Deterministic resize, normalize, pad: one evaluation example."""
  image, boxes, classes = decoded["image"], decoded["boxes"], decoded["classes"]
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = _resize_scale(h, w, config)
  image, boxes = _resize(image, boxes, scale)
  return {
      **_network_example(image, boxes, classes, decoded, config),
      "image_id": decoded["image_id"],
      "original_size": tf.cast(shape[:2], tf.int32),
      "scale": tf.cast(scale, tf.float32),
      "is_padding": tf.constant(False),
  }


# --------------------------------------------------------------------------- iterators


class _Stats:
  """Counters of what the pipeline dropped or fixed, logged when they grow."""

  _WHAT = {
      "examples_skipped": "undecodable examples skipped",
      "boxes_clipped": "boxes reaching outside their image clipped",
      "boxes_invalid": "zero-area or inverted boxes dropped",
      "boxes_over_max": "boxes dropped beyond max_boxes (smallest first)",
  }

  def __init__(self, name: str):
    self.name = name
    self.counts = {k: 0 for k in self._WHAT}
    self._next_log = {k: 1 for k in self._WHAT}
    self._expected_index = None

  def update(self, batch: Batch) -> Batch:
    index = batch.pop("_index")
    real = index >= 0
    self._add("boxes_over_max", int(batch.pop("_dropped")[real].sum()))
    self._add("boxes_clipped", int(batch.pop("_clipped")[real].sum()))
    self._add("boxes_invalid", int(batch.pop("_invalid")[real].sum()))
    index = index[real]
    if index.size:
      gaps = int(index[0] - self._expected_index + np.sum(np.diff(index) - 1))
      self._add("examples_skipped", gaps)
      self._expected_index = int(index[-1]) + 1
    return batch

  def start(self, first_index: int):
    self._expected_index = first_index

  def _add(self, key: str, n: int):
    if n <= 0:
      return
    self.counts[key] += n
    if self.counts[key] >= self._next_log[key]:
      log.warning("%s input: %d %s so far", self.name, self.counts[key], self._WHAT[key])
      self._next_log[key] = 2 * self.counts[key]


class TrainIterator(Iterator[Batch]):
  """Endless, deterministic, resumable iterator of per-process training batches.

  Attributes:
    step: index of the next batch (starts at `start_step`).
    steps_per_epoch: batches per epoch (`num_examples // batch_size`).
    num_examples: examples of this process's share of the split.
    stats: counts of skipped examples and dropped/clipped boxes.
  """

  def __init__(self, config: InputConfig, *, start_step: int, process_index: int,
               process_count: int):
    self.config = config
    self.process_index = process_index
    self.process_count = process_count
    self._builder = get_builder(config)
    self._split = _process_split(config.train_split, process_index, process_count,
                                 drop_remainder=True)
    self.num_examples = _num_examples(self._builder, config.dataset, self._split)
    self.steps_per_epoch = self.num_examples // config.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"{config.dataset} {self._split}: {self.num_examples} examples per process "
                       f"are fewer than batch_size {config.batch_size}")
    self.step = start_step
    self._stats = _Stats("train")
    self._iterator = None
    self._epoch = None

  @property
  def stats(self) -> dict[str, int]:
    return dict(self._stats.counts)

  def epoch_dataset(self, epoch: int, skip_batches: int = 0) -> tf.data.Dataset:
    """The batches of one epoch (as tf.data, with the `_` bookkeeping keys)."""
    cfg = self.config
    file_seed, shuffle_seed, aug_seed = _seeds(cfg.seed, self.process_index, epoch, n=3)
    ds = _as_dataset(self._builder, cfg.dataset, self._split, shuffle_files=True,
                     decoders=_SKIP_IMAGE_DECODING, read_config=_read_config(file_seed))
    ds = ds.shuffle(cfg.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(skip_batches * cfg.batch_size)

    def preprocess(index, example):
      out = train_transform(decode_example(example, cfg), cfg,
                            tf.stack([tf.constant(aug_seed, tf.int64), index]))
      out["_index"] = index
      return out

    ds = ds.map(preprocess, num_parallel_calls=_parallel_calls(cfg), deterministic=True)
    ds = ds.ignore_errors(log_warning=True)
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    return ds.prefetch(cfg.prefetch).with_options(_pipeline_options())

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    while True:
      if self._iterator is None:
        self._epoch, within = divmod(self.step, self.steps_per_epoch)
        self._iterator = self.epoch_dataset(self._epoch, within).as_numpy_iterator()
        self._stats.start(within * self.config.batch_size)
      try:
        batch = next(self._iterator)
      except StopIteration:
        # Next epoch (also when skipped examples left this one short of batches).
        self.step = (self._epoch + 1) * self.steps_per_epoch
        self._iterator = None
        continue
      self.step += 1
      if self.step % self.steps_per_epoch == 0:
        self._iterator = None  # the epoch is complete
        self._epoch += 1
      return self._stats.update(batch)


class EvalDataset:
  """Re-iterable per-process evaluation batches; every example exactly once, in order.

  Each process yields `len(self)` batches (the same on all processes); the
  last batches are filled with padding examples (`is_padding=True`, no valid
  boxes, image_id -1).
  """

  def __init__(self, config: InputConfig, *, process_index: int, process_count: int):
    self.config = config
    self._builder = get_builder(config)
    self._split = _process_split(config.eval_split, process_index, process_count,
                                 drop_remainder=False)
    self.total_examples = _num_examples(self._builder, config.dataset, config.eval_split)
    self.num_examples = (_num_examples(self._builder, config.dataset, self._split)
                         if process_count > 1 else self.total_examples)
    per_process = math.ceil(self.total_examples / process_count)
    self.batch_size = config.per_process_eval_batch_size
    self.num_batches = max(1, math.ceil(per_process / self.batch_size))
    self._stats = _Stats("eval")

  def __len__(self) -> int:
    return self.num_batches

  @property
  def stats(self) -> dict[str, int]:
    return dict(self._stats.counts)

  def dataset(self) -> tf.data.Dataset:
    cfg = self.config
    ds = _as_dataset(self._builder, cfg.dataset, self._split, shuffle_files=False,
                     decoders=_SKIP_IMAGE_DECODING, read_config=_read_config())

    def preprocess(index, example):
      out = eval_transform(decode_example(example, cfg), cfg)
      out["_index"] = index
      return out

    ds = ds.enumerate().map(preprocess, num_parallel_calls=_parallel_calls(cfg),
                            deterministic=True)
    ds = ds.ignore_errors(log_warning=True)
    ph, pw = cfg.padded_size
    m = cfg.max_boxes
    padding = {
        "images": tf.zeros([ph, pw, 3], tf.float32),
        "boxes": tf.zeros([m, 4], tf.float32),
        "classes": tf.fill([m], -1),
        "valid": tf.zeros([m], tf.bool),
        "image_id": tf.constant(-1, tf.int64),
        "original_size": tf.zeros([2], tf.int32),
        "scale": tf.constant(1.0),
        "is_padding": tf.constant(True),
        "_dropped": tf.constant(0),
        "_clipped": tf.constant(0),
        "_invalid": tf.constant(0),
        "_index": tf.constant(-1, tf.int64),
    }
    ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
    ds = ds.take(self.num_batches * self.batch_size).batch(self.batch_size, drop_remainder=True)
    return ds.prefetch(cfg.prefetch).with_options(_pipeline_options())

  def __iter__(self) -> Iterator[Batch]:
    self._stats.start(0)
    for batch in self.dataset().as_numpy_iterator():
      yield self._stats.update(batch)


def build_train_dataset(config: InputConfig, *, start_step: int = 0,
                        process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
  """Endless iterator of this process's training batches (see the module docstring).

  Args:
    config: the input configuration; `config.batch_size` is per process.
    start_step: index of the first batch to yield; a run resumed at step N gets
      the batches that an uninterrupted run got from step N on.
    process_index, process_count: this process's share (default: jax's); each
      process reads only its own `1 / process_count` of the split.
  """
  process_index, process_count = _process_defaults(process_index, process_count)
  return TrainIterator(config, start_step=start_step, process_index=process_index,
                       process_count=process_count)


def build_eval_dataset(config: InputConfig, *, process_index: int | None = None,
                       process_count: int | None = None) -> EvalDataset:
  """Re-iterable evaluation batches of this process's share of `config.eval_split`."""
  process_index, process_count = _process_defaults(process_index, process_count)
  return EvalDataset(config, process_index=process_index, process_count=process_count)


# --------------------------------------------------------------------------- COCO json


def coco_ground_truth(config: InputConfig, split: str | None = None) -> dict[str, list]:
  """The ground truth of a split as a COCO json dict (pycocotools-ready).

  `{"images": [{id, height, width, file_name}], "annotations": [{id, image_id,
  category_id, bbox (x, y, w, h in original pixels), area, iscrowd}],
  "categories": [{id, name}]}` with category ids from `config.labels`. Works for
  coco/2017, synthetic_shapes and folder datasets (read from the TFDS records).
  Labels that map to no class and boxes of zero area (after clipping to the
  image) are left out.
  """
  split = split or config.eval_split
  builder = get_builder(config)
  ds = _as_dataset(builder, config.dataset, split, shuffle_files=False,
                   decoders=_SKIP_IMAGE_DECODING, read_config=_read_config())

  def image_size(example):
    image = example["image"]
    if image.dtype == tf.string:
      shape = tf.cond(tf.io.is_jpeg(image), lambda: tf.image.extract_jpeg_shape(image)[:2],
                      lambda: tf.shape(tf.io.decode_image(image, channels=3,
                                                          expand_animations=False))[:2])
    else:
      shape = tf.shape(image)[:2]
    return {"size": tf.cast(shape, tf.int32), "image/id": example["image/id"],
            "image/filename": example["image/filename"], "objects": example["objects"]}

  ds = ds.map(image_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  labels = config.labels
  images, annotations, seen_ids = [], [], set()
  for ex in ds.as_numpy_iterator():
    h, w = (int(v) for v in ex["size"])
    image_id = int(ex["image/id"])
    name = ex["image/filename"]
    images.append({"id": image_id, "height": h, "width": w,
                   "file_name": name.decode() if isinstance(name, bytes) else str(name)})
    obj = ex["objects"]
    n = min(len(obj["bbox"]), len(obj["label"]), len(obj["is_crowd"]), len(obj["area"]),
            len(obj["id"]))
    for k in range(n):
      label = int(obj["label"][k])
      if not 0 <= label < len(labels.label_to_class) or labels.label_to_class[label] < 0:
        continue
      ymin, xmin, ymax, xmax = np.clip(obj["bbox"][k].astype(np.float64), 0.0, 1.0)
      x, y, bw, bh = xmin * w, ymin * h, (xmax - xmin) * w, (ymax - ymin) * h
      if bw <= 0 or bh <= 0:
        continue
      ann_id = int(obj["id"][k])
      if ann_id <= 0 or ann_id in seen_ids:  # pycocotools needs unique positive ids
        ann_id = max(seen_ids, default=0) + 1
      seen_ids.add(ann_id)
      annotations.append({
          "id": ann_id, "image_id": image_id,
          "category_id": int(labels.category_ids[labels.label_to_class[label]]),
          "bbox": [float(x), float(y), float(bw), float(bh)],
          "area": float(obj["area"][k]) if obj["area"][k] > 0 else float(bw * bh),
          "iscrowd": int(bool(obj["is_crowd"][k])),
      })
  return {"images": images, "annotations": annotations, "categories": labels.coco_categories()}
