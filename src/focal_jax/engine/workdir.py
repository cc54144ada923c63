"""A training work dir: the one place that knows its layout, and reads and writes it.

Layout (`experiments.coco_retinanet --workdir DIR` writes it, `focal_jax.predict`
and `--train.init_checkpoint=DIR` read it):

  config.json            the config of the run, with the dataset's label map
  checkpoints/N/default/ orbax checkpoint of the train state after N steps
  metrics.jsonl          one JSON line `{"step": N, ...}` per log step and per evaluation
  events.out.tfevents.*  the same scalars for TensorBoard
  eval_N.json            the COCO numbers of the evaluation after N steps
  visuals/eval_N.png     predictions of step N beside the ground truth, for a few validation images
  training_curves.png    losses and COCO AP/AP50 against the step (written at the end of a run)

Only process 0 writes config.json, the metrics and the evaluation files; every
process takes part in saving and restoring checkpoints (orbax coordinates
them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from focal_jax.engine.config import ExperimentConfig, differing_fields, from_json, to_json

CONFIG_FILE = "config.json"
_CHECKPOINTS_DIR = "checkpoints"
# The train state's item in checkpoints/N/: the name orbax's `CheckpointManager` gives
# the single item it saves (older work dirs have it too).
_STATE_ITEM = "default"
_METRICS_FILE = "metrics.jsonl"
_VISUALS_DIR = "visuals"
_CURVES_FILE = "training_curves.png"
_TRAIN_COMMAND = "python -m experiments.coco_retinanet"


class WorkdirError(ValueError):
  """The directory is not a training work dir with a usable config or checkpoint."""


class IncompatibleWorkdirError(ValueError):
  """The work dir holds a run whose config does not fit the requested one."""


class Checkpointer:
  """The train state's checkpoints: saves every so often, keeps the last `keep`, restores the latest.

  Every process calls every method (orbax coordinates multi-host saving).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    # XLA:CPU sends every collective between processes over gloo with the same tag,
    # so two collectives in flight at once can take each other's messages and hang.
    # orbax's asynchronous save runs its barriers (collectives) on a thread of its
    # own, beside the next steps: with several processes on CPU, each save is
    # waited for. Accelerators save in the background.
    self._wait_after_save = jax.process_count() > 1 and jax.default_backend() == "cpu"

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Saves `state` as checkpoint `step` (in the background where that is safe; see `wait`)."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if self._wait_after_save:
      self.wait()

  def restore(self, step: int, like):
    """Restores checkpoint `step` with the structure, shapes and shardings of `like`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class Workdir:
  """The files of one training run under `path` (see the module docstring for the layout)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  @property
  def config_path(self) -> Path:
    return self.path / CONFIG_FILE

  @property
  def metrics_path(self) -> Path:
    return self.path / _METRICS_FILE

  @property
  def curves_path(self) -> Path:
    return self.path / _CURVES_FILE

  def eval_path(self, step: int) -> Path:
    return self.path / f"eval_{step}.json"

  def visuals_path(self, step: int) -> Path:
    return self.path / _VISUALS_DIR / f"eval_{step}.png"

  def is_training_workdir(self) -> bool:
    """Whether `path` holds a run's config.json (what tells a work dir from other directories)."""
    return self.config_path.is_file()

  # ------------------------------------------------------------------------- config

  def read_config(self) -> ExperimentConfig:
    """The `ExperimentConfig` saved in config.json.

    Raises:
      WorkdirError: the work dir or its config.json is missing or unreadable.
    """
    if not self.path.is_dir():
      raise WorkdirError(f"no training work dir at {self.path} (a --workdir of {_TRAIN_COMMAND}).")
    if not self.config_path.is_file():
      raise WorkdirError(f"{self.path} has no {CONFIG_FILE}: it is not a training work dir (a --workdir of "
                         f"{_TRAIN_COMMAND}).")
    try:
      return from_json(self.config_path.read_text(), str(self.config_path))
    except ValueError as error:
      raise WorkdirError(f"cannot read the config in {self.config_path}: {error}") from None

  def prepare(self, config: ExperimentConfig) -> None:
    """Refuses a work dir whose saved config defines a different model; writes config.json if new.

    Called before anything is compiled; never overwrites an existing run's
    files. The saved config holds the dataset's label map itself, so that the
    work dir alone serves prediction (`focal_jax.predict`) anywhere.

    Raises:
      IncompatibleWorkdirError: the saved config has another model, anchors or
        dataset (the differing fields are named).
      ValueError: the saved config.json cannot be read.
    """
    saved_path = self.config_path
    if saved_path.exists():
      saved = from_json(saved_path.read_text(), str(saved_path))
      differing = differing_fields(config, saved)
      if saved.data.dataset != config.data.dataset:
        differing.append("data.dataset")
      if differing:
        raise IncompatibleWorkdirError(
            f"{self.path} holds a run with a different {', '.join(differing)}; use a new --workdir or the "
            f"config saved in {saved_path}. Nothing was changed.")
      return
    self.path.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # written whole, then renamed: other processes may be reading
      partial = saved_path.with_suffix(".json.partial")
      resolved = dataclasses.replace(config,
                                     data=dataclasses.replace(config.data, label_map=config.data.labels))
      partial.write_text(to_json(resolved))
      partial.replace(saved_path)

  # ------------------------------------------------------------------------- checkpoints

  def checkpointer(self, *, keep: int) -> Checkpointer:
    """The train state's checkpoints (checkpoints/N/), keeping the last `keep`."""
    return Checkpointer(self.path / _CHECKPOINTS_DIR, keep=keep)

  def restore_variables(self, step: int | None = None) -> tuple[dict[str, Any], int]:
    """`(variables, step)` of a checkpoint (the latest unless `step`), as NumPy arrays on the host.

    Only `params` and `batch_stats` are read (not the optimizer state), so
    any process, with any devices, can read a run's model.

    Raises:
      WorkdirError: there is no (finished) checkpoint, or none at `step`;
        the message says what to do.
    """
    checkpoints = self.path.absolute() / _CHECKPOINTS_DIR
    if not checkpoints.is_dir():
      raise WorkdirError(f"{self.path} has no {_CHECKPOINTS_DIR}/ folder; train first ({_TRAIN_COMMAND} "
                         f"--workdir {self.path}).")
    manager = ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(manager.all_steps())
    manager.close()
    if not steps:
      raise WorkdirError(f"{checkpoints} holds no finished checkpoint; train longer (checkpoints are saved "
                         "every train.checkpoint_every steps and at the end).")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise WorkdirError(f"no checkpoint at step {step} in {checkpoints}; there are steps "
                         f"{', '.join(map(str, steps))}.")
    path = checkpoints / str(step) / _STATE_ITEM
    with ocp.PyTreeCheckpointer() as checkpointer:
      saved = checkpointer.metadata(path).item_metadata
      target = {name: jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), dict(saved[name]))
                for name in ("params", "batch_stats") if saved.get(name)}
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
      variables = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
    return variables, step

  # ------------------------------------------------------------------------- metrics and evaluations

  def metric_writer(self):
    """A clu `MetricWriter` of scalars: metrics.jsonl and TensorBoard on process 0, nothing elsewhere.

    clu and TensorFlow load here, on first use; the input pipeline has
    already kept TensorFlow off the accelerators.
    """
    from focal_jax.engine import metric_writers  # pylint: disable=g-import-not-at-top

    if jax.process_index() != 0:
      return metric_writers.MultiWriter([])
    return metric_writers.MultiWriter([metric_writers.JsonlWriter(self.metrics_path),
                                       metric_writers.SummaryWriter(str(self.path))])

  def write_eval(self, step: int, metrics: dict[str, float]) -> None:
    """Writes eval_N.json: `{"step": N, **metrics}` (process 0 only)."""
    if jax.process_index() == 0:
      self.eval_path(step).write_text(json.dumps({"step": step, **metrics}, indent=2))
