"""Finding and reading the TFDS datasets of the input pipelines.

`get_builder` resolves `InputConfig.dataset` (synthetic_shapes, a folder dataset
written by `coco_folder`, or a TFDS catalog name such as `coco/2017`) to a TFDS
builder, and `DatasetNotFoundError` says, for a dataset that is not prepared,
where it was looked for and how to prepare it (nothing is ever downloaded).
The other helpers are how the iterators and `ground_truth` read records: one
process's share of a split, example counts, and the tf.data options that keep
every pipeline deterministic.
"""

from __future__ import annotations

import os

import numpy as np

from focal_jax._messages import first_line
from focal_jax.data import synthetic_shapes
from focal_jax.data._tensorflow import tf, tfds
from focal_jax.data.config import (LABEL_MAP_FILE, InputConfig, dataset_base_name, default_data_dir,
                                   folder_dataset_dir)


class DatasetNotFoundError(ValueError):
  """The requested TFDS dataset is not prepared in the data dir (nothing is downloaded)."""


class DamagedDatasetError(ValueError):
  """A prepared dataset's record files cannot be read (damaged, or changed while being read)."""


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
  name = config.dataset
  if _is_synthetic(name):
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
  """Checks that the dataset can be read and has the config's train and eval splits.

  synthetic_shapes is built here when `auto_prepare` allows.

  Raises:
    DatasetNotFoundError: the dataset is not prepared (the message names the
      data dir and how to prepare it).
    ValueError: a split of the config is not one of the dataset's (named).
  """
  builder = get_builder(config)
  if not builder.is_prepared():
    raise DatasetNotFoundError(_not_found_message(config.dataset, builder))
  for field in ("train_split", "eval_split"):
    split = getattr(config, field)
    try:
      builder.info.splits[split]  # pylint: disable=pointless-statement  (TFDS parses slices, e.g. "train[:90%]")
    except (KeyError, ValueError, AssertionError) as error:
      raise ValueError(f"data.{field} {split!r} is not a split of {config.dataset} (it has "
                       f"{', '.join(sorted(builder.info.splits))}): {first_line(error)}") from None


def as_dataset(builder, name: str, split, **kwargs) -> tf.data.Dataset:
  """`builder.as_dataset(split=split, **kwargs)`; `DatasetNotFoundError` when it is not prepared."""
  try:
    return builder.as_dataset(split=split, **kwargs)
  except Exception:  # pylint: disable=broad-except
    if builder.is_prepared():
      raise
    raise DatasetNotFoundError(_not_found_message(name, builder)) from None


def process_split(split: str, process_index: int, process_count: int, drop_remainder: bool):
  """This process's `1 / process_count` of `split` (TFDS split syntax; the whole split for one process)."""
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count, drop_remainder=drop_remainder)[process_index]


def count_examples(builder, name: str, split) -> int:
  """Examples in `split` (from the dataset info; counted when the info lacks it, as in mocks)."""
  try:
    return int(builder.info.splits[split].num_examples)
  except Exception:  # pylint: disable=broad-except
    ds = as_dataset(builder, name, split, decoders={"image": tfds.decode.SkipDecoding()})
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1).numpy())


def pipeline_options() -> tf.data.Options:
  """Deterministic order, and no tf.data autotuning.

  An autotuned pipeline runs a model-optimization thread that its iterator
  waits for when destroyed; beside a busy train step that wait stalls
  training at every epoch end (each epoch is an iterator of its own). Without
  autotuning, buffers keep their configured sizes (see `parallel_calls`).
  """
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = False
  return options


def parallel_calls(config: InputConfig) -> int:
  """`config.num_parallel_calls`, with -1 meaning one call per CPU core."""
  return config.num_parallel_calls if config.num_parallel_calls > 0 else os.cpu_count() or 1


def read_config(shuffle_seed: int | None = None) -> tfds.ReadConfig:
  """How the pipelines read TFDS records: seeded file order, no caching or prefetch of TFDS's own."""
  return tfds.ReadConfig(shuffle_seed=shuffle_seed, shuffle_reshuffle_each_iteration=False,
                         try_autocache=False, skip_prefetch=True, options=pipeline_options())


# Images are read as encoded bytes and decoded in the pipelines' own map (`transforms`).
SKIP_IMAGE_DECODING = {"image": tfds.decode.SkipDecoding()}
