"""The tf.data input pipelines over TFDS `coco/2017`, `synthetic_shapes` and folder datasets (same features).

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
shift, so a resumed run is only exact while no example was skipped. A record
file that cannot be read (damaged, or changed while read) is never skipped:
it raises `DamagedDatasetError`.

While an epoch runs, the next one is opened on a background thread (its
shuffle buffer filled, its first batch made), so that the consumer does not
wait at the epoch's end; this changes when batches are made, never which.
Every epoch is opened on that thread, which on Linux runs
`config.train_nice` nicer than the process, and so do the threads that
tf.data starts from it: where the pipeline and the train step share CPU
cores, the step comes first and the pipeline fills the cores' idle time.

All TensorFlow work stays on the CPU (see `focal_jax.data._tensorflow`).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import os
import re
import sys
from typing import Iterator

import numpy as np

from focal_jax.data._tensorflow import tf
from focal_jax.data.builders import (SKIP_IMAGE_DECODING, DamagedDatasetError, as_dataset,
                                     count_examples, get_builder, parallel_calls, pipeline_options,
                                     process_split, read_config)
from focal_jax.data.config import InputConfig
from focal_jax.data.transforms import decode_example, eval_transform, train_transform

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# Examples read at a time before their transforms run (see `_map_skipping_failures`): a few
# MB of encoded images, and the transforms' threads wait once per window.
_READ_WINDOW = 128


def _process_defaults(process_index, process_count):
  """`(process_index, process_count)`, jax's where not given; checks that the index is in range."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _seeds(*entropy: int, n: int) -> list[int]:
  """`n` independent 32-bit seeds derived from `entropy` (the same entropy, the same seeds)."""
  return [int(s) for s in np.random.SeedSequence(list(entropy)).generate_state(n)]


def _map_skipping_failures(ds: tf.data.Dataset, transform, parallel: int) -> tf.data.Dataset:
  """`ds.map(transform)` in order, without the elements whose transform fails (an undecodable image).

  The skipping is scoped to the transform: the elements are read in windows
  of `_READ_WINDOW` and each window is mapped (`parallel` calls) as a dataset
  of its own, so an error in reading `ds` itself, such as a damaged record
  file, reaches the consumer, instead of being skipped with everything after
  it or retried without end. (`window` drops an error that comes with the end
  of its input, as TFDS's check of the number of records does when a file is
  short; the `prefetch` before it raises that error.)
  """

  def transformed(index, example):
    window = tf.data.Dataset.zip((index, tf.data.Dataset.zip(example)))
    return window.map(transform, num_parallel_calls=parallel, deterministic=True).ignore_errors(
        log_warning=True)

  return ds.prefetch(1).window(_READ_WINDOW).flat_map(transformed)


def _run_nicer(increment: int) -> None:
  """Lowers the calling thread's CPU priority by `increment` (Linux, where the nice value is per thread)."""
  if increment and sys.platform.startswith("linux"):
    os.nice(increment)


def _numpy_batches(ds: tf.data.Dataset, builder, split: str) -> Iterator[Batch]:
  """The batches of `ds` as NumPy; a failure to read the dataset raises `DamagedDatasetError`."""
  try:
    yield from ds.as_numpy_iterator()
  except (tf.errors.DataLossError,  # a corrupted or truncated record
          tf.errors.FailedPreconditionError,  # fewer records than TFDS's metadata says
          tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as error:
    # TensorFlow's own message, without the names of its ops around it.
    cause = re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:.*$", "", error.message.splitlines()[0])
    raise DamagedDatasetError(
        f"{builder.info.full_name} {split}: reading its record files in {builder.data_dir} failed "
        f"({cause}). They are damaged, or changed while being read: move {builder.data_dir} aside, "
        f"prepare the dataset again, then run the same command to resume from the last checkpoint."
    ) from error


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

  Use it in a `with` block, or `close()` it, to stop its background thread.

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
    self._split = process_split(config.train_split, process_index, process_count,
                                 drop_remainder=True)
    self.num_examples = count_examples(self._builder, config.dataset, self._split)
    self.steps_per_epoch = self.num_examples // config.batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"{config.dataset} {self._split}: {self.num_examples} examples per process "
                       f"are fewer than batch_size {config.batch_size}")
    self.step = start_step
    self._stats = _Stats("train")
    self._iterator = None
    self._epoch = None
    self._opener = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="open_epoch", initializer=_run_nicer, initargs=(config.train_nice,))
    self._next_epoch = None  # (epoch, future of its batches), opened in the background
    self._closed = False

  @property
  def stats(self) -> dict[str, int]:
    return dict(self._stats.counts)

  def epoch_dataset(self, epoch: int, skip_batches: int = 0) -> tf.data.Dataset:
    """The batches of one epoch (as tf.data, with the `_` bookkeeping keys)."""
    cfg = self.config
    file_seed, shuffle_seed, aug_seed = _seeds(cfg.seed, self.process_index, epoch, n=3)
    ds = as_dataset(self._builder, cfg.dataset, self._split, shuffle_files=True,
                     decoders=SKIP_IMAGE_DECODING, read_config=read_config(file_seed))
    ds = ds.shuffle(cfg.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    ds = ds.enumerate().skip(skip_batches * cfg.batch_size)

    def preprocess(index, example):
      out = train_transform(decode_example(example, cfg), cfg,
                            tf.stack([tf.constant(aug_seed, tf.int64), index]))
      out["_index"] = index
      return out

    ds = _map_skipping_failures(ds, preprocess, parallel_calls(cfg))
    ds = ds.batch(cfg.batch_size, drop_remainder=True)
    return ds.prefetch(cfg.prefetch).with_options(pipeline_options())

  def _open_epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch]:
    """The batches of `epoch` from batch `skip_batches` on, the first already made (what takes the time)."""
    batches = _numpy_batches(self.epoch_dataset(epoch, skip_batches), self._builder, self._split)
    first = next(batches, None)
    if first is None and skip_batches == 0:  # never an endless search for a batch
      raise ValueError(f"{self.config.dataset} {self._split}: epoch {epoch} has not one batch of "
                       f"{self.config.batch_size} decodable examples (see the warnings above).")
    return iter(()) if first is None else itertools.chain([first], batches)

  def _start_epoch(self) -> None:
    """Switches to the epoch of `self.step` (opened in the background if it is the next one from its start)."""
    epoch, within = divmod(self.step, self.steps_per_epoch)
    if self._next_epoch is not None and self._next_epoch[0] == epoch and within == 0:
      self._iterator = self._next_epoch[1].result()
    else:  # on the opener too, so that tf.data's threads start from it (see the module docstring)
      self._iterator = self._opener.submit(self._open_epoch, epoch, within).result()
    self._epoch = epoch
    self._next_epoch = (epoch + 1, self._opener.submit(self._open_epoch, epoch + 1))
    self._stats.start(within * self.config.batch_size)

  def close(self) -> None:
    """Stops the background work (the next epoch's opening, waited for if it has begun)."""
    self._opener.shutdown(wait=True, cancel_futures=True)
    self._next_epoch = None
    self._closed = True

  def __enter__(self) -> TrainIterator:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self._closed:
      raise ValueError("This TrainIterator is closed; build a new one (start_step resumes anywhere).")
    while True:
      if self._iterator is None:
        self._start_epoch()
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
    self._split = process_split(config.eval_split, process_index, process_count,
                                 drop_remainder=False)
    self.total_examples = count_examples(self._builder, config.dataset, config.eval_split)
    self.num_examples = (count_examples(self._builder, config.dataset, self._split)
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
    ds = as_dataset(self._builder, cfg.dataset, self._split, shuffle_files=False,
                     decoders=SKIP_IMAGE_DECODING, read_config=read_config())

    def preprocess(index, example):
      out = eval_transform(decode_example(example, cfg), cfg)
      out["_index"] = index
      return out

    ds = _map_skipping_failures(ds.enumerate(), preprocess, parallel_calls(cfg))
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
    return ds.prefetch(cfg.prefetch).with_options(pipeline_options())

  def __iter__(self) -> Iterator[Batch]:
    self._stats.start(0)
    for batch in _numpy_batches(self.dataset(), self._builder, self._split):
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
