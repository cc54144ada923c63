"""A training work dir: the one place that knows its layout, and reads and writes it.

Layout (`experiments.coco_retinanet --workdir DIR` writes it, `focal_jax.predict`
and `--train.init_checkpoint=DIR` read it):

  config.json            the config of the run, with the dataset's label map
  checkpoints/N/default/ orbax checkpoint of the train state after N steps
  damaged_checkpoints/N/ a checkpoint that could not be read, set aside (never deleted)
  metrics.jsonl          one JSON line `{"step": N, ...}` per log step and per evaluation
  events.out.tfevents.*  the same scalars for TensorBoard
  eval_N.json            the COCO numbers of the evaluation after N steps
  visuals/eval_N.png     predictions of step N beside the ground truth, for a few validation images
  training_curves.png    losses and COCO AP/AP50 against the step (written at the end of a run)

What a run may rely on:
- One run at a time: `lock` holds an exclusive lock on the directory (the
  kernel drops it when the process ends, however it ends).
- Nothing is written before the work dir's config.json and checkpoints are
  known to agree with the run's config and model (`prepare`).
- A checkpoint is complete or absent (orbax writes it aside and renames it);
  one that cannot be read is set aside in damaged_checkpoints/ and the run
  resumes from the newest readable one.
- After a resume, metrics.jsonl holds each step once.

Only process 0 writes config.json, the metrics and the evaluation files; every
process takes part in saving and restoring checkpoints (orbax coordinates
them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from focal_jax._messages import first_line
from focal_jax.engine.checkpointer import Checkpointer, silence_failed_read_leftovers
from focal_jax.engine.config import ExperimentConfig, differing_fields, from_json, to_json

CONFIG_FILE = "config.json"
_CHECKPOINTS_DIR = "checkpoints"
_DAMAGED_DIR = "damaged_checkpoints"
# The train state's item in checkpoints/N/: the name orbax's `CheckpointManager` gives
# the single item it saves (older work dirs have it too).
_STATE_ITEM = "default"
_METRICS_FILE = "metrics.jsonl"
_VISUALS_DIR = "visuals"
_CURVES_FILE = "training_curves.png"
_TRAIN_COMMAND = "python -m experiments.coco_retinanet"
_LISTED = 4  # differing variables named in an error

log = logging.getLogger(__name__)


class WorkdirError(ValueError):
  """The directory is not a usable training work dir: missing, unwritable, busy, no readable checkpoint."""


class IncompatibleWorkdirError(ValueError):
  """The work dir holds a run whose config or checkpoints do not fit the requested one."""


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """`{"params/backbone/conv1/kernel": shape, ...}` of a tree of arrays, shape structs or orbax metadata."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {"/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path):
          tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def shape_differences(saved: Any, expected: Any, what: str) -> list[str]:
  """Lines naming the variables that differ between a checkpoint's tree and the model's (empty if none)."""
  saved, expected = _shapes(saved), _shapes(expected)
  problems = [f"{name}: {saved[name]} in the checkpoint, {shape} in the {what}"
              for name, shape in expected.items() if name in saved and saved[name] != shape]
  problems += [f"{name}: missing from the checkpoint" for name in expected if name not in saved]
  problems += [f"{name}: not in the {what}" for name in saved if name not in expected]
  if len(problems) > _LISTED:
    problems = problems[:_LISTED] + [f"... ({len(problems) - _LISTED} more)"]
  return problems


def _state_handler() -> contextlib.closing:
  """orbax's reader of the train state item (`checkpoints/N/default`).

  Read through the item's own handler: a `Checkpointer` there would look for
  the step's metadata file inside the item and log that it is missing.
  """
  return contextlib.closing(ocp.PyTreeCheckpointHandler())


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

  def check_writable(self) -> None:
    """Checks, without writing anything, that the work dir exists or can be made, and can be written in.

    Raises:
      WorkdirError: the path (or a folder above it) is a file, or the nearest
        existing folder cannot be written in (the path and the cause are named).
    """
    existing = self.path.absolute()
    while not existing.exists():
      existing = existing.parent
    if not existing.is_dir():
      raise WorkdirError(f"cannot use the work dir {self.path}: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
      raise WorkdirError(f"cannot write in {existing} (for the work dir {self.path}): permission denied or a "
                         "read-only file system.")

  def create(self) -> None:
    """Makes the work dir (and its parents) if it is missing.

    Raises:
      WorkdirError: as `check_writable`, or the directory cannot be created.
    """
    self.check_writable()
    try:
      self.path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
      raise WorkdirError(f"cannot create the work dir {self.path}: {error.strerror}.") from None

  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Creates the work dir if needed and holds an exclusive lock on it while the block runs.

    Process 0 takes the lock (the other processes of a multi-host run belong
    to the same run). It is the kernel's lock on the directory itself (flock),
    so it writes nothing and ends with the process, however that ends.

    Raises:
      WorkdirError: another run holds the lock, or `create` fails.
    """
    self.create()
    if jax.process_index() != 0:
      yield
      return
    descriptor = os.open(self.path, os.O_RDONLY)
    try:
      try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        raise WorkdirError(f"another run is using the work dir {self.path}; wait for it to end or choose "
                           "another --workdir.") from None
      except OSError as error:  # a file system without locks
        log.warning("cannot lock the work dir %s (%s); make sure that no other run uses it.", self.path,
                    error.strerror)
      yield
    finally:
      os.close(descriptor)

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

  def prepare(self, config: ExperimentConfig, state) -> None:
    """Checks that config.json and the checkpoints fit `config` and `state`; then writes config.json if new.

    Called before anything is compiled; nothing is written unless both fit,
    and an existing run's files are never overwritten. The saved config holds
    the dataset's label map itself, so that the work dir alone serves
    prediction (`focal_jax.predict`) anywhere.

    Raises:
      IncompatibleWorkdirError: the saved config has another model, anchors or
        dataset, or the checkpoints hold other variables than `state` (the
        differences are named).
      WorkdirError: the saved config.json cannot be read.
    """
    saved_path = self.config_path
    if saved_path.exists():
      saved = self.read_config()
      differing = differing_fields(config, saved)
      if saved.data.dataset != config.data.dataset:
        differing.append("data.dataset")
      if differing:
        raise IncompatibleWorkdirError(
            f"{self.path} holds a run with a different {', '.join(differing)}; use a new --workdir or the "
            f"config saved in {saved_path}. Nothing was changed.")
    self._check_checkpoints_match(state)
    if saved_path.exists() or jax.process_index() != 0:
      return
    resolved = dataclasses.replace(config, data=dataclasses.replace(config.data, label_map=config.data.labels))
    _write_whole(saved_path, to_json(resolved))  # other processes may be reading

  def _check_checkpoints_match(self, state) -> None:
    """Raises IncompatibleWorkdirError if the latest checkpoint holds other variables than `state`."""
    steps = self._finished_steps()
    if not steps:
      return
    step = steps[-1]
    try:
      saved = self._saved_tree(step)
    except Exception:  # pylint: disable=broad-except  (unreadable: `Checkpointer.restore_latest` sets it aside)
      return
    problems = shape_differences(saved, state, "model")
    if problems:
      raise IncompatibleWorkdirError(
          f"the checkpoints in {self.path} hold another model or optimizer (step {step}): {'; '.join(problems)}. "
          f"Use a new --workdir, or the config these checkpoints were written with. Nothing was changed.")

  # ------------------------------------------------------------------------- checkpoints

  def _finished_steps(self) -> list[int]:
    """The steps of the finished checkpoints, in increasing order (none without a checkpoints/ folder).

    orbax writes a checkpoint under a temporary name and renames it to its
    step when complete, so the folders named by a number are the finished
    ones. (Listing them ourselves, rather than through an orbax manager, takes
    part in no multi-process barrier.)
    """
    checkpoints = self.path.absolute() / _CHECKPOINTS_DIR
    if not checkpoints.is_dir():
      return []
    return sorted(int(entry.name) for entry in checkpoints.iterdir() if entry.name.isdigit() and entry.is_dir())

  def _saved_tree(self, step: int):
    """The tree of array metadata (shapes, dtypes) of checkpoint `step`'s train state."""
    with _state_handler() as handler:
      return handler.metadata(self._state_path(step))

  def _state_path(self, step: int) -> Path:
    return self.path.absolute() / _CHECKPOINTS_DIR / str(step) / _STATE_ITEM

  def checkpointer(self, *, keep: int) -> Checkpointer:
    """The train state's checkpoints (checkpoints/N/), keeping the last `keep`."""
    return Checkpointer(self.path.absolute() / _CHECKPOINTS_DIR, self.path.absolute() / _DAMAGED_DIR, keep=keep)

  def restore_variables(self, step: int | None = None, like: Any = None) -> tuple[dict[str, Any], int]:
    """`(variables, step)` of a checkpoint (the latest unless `step`), as NumPy arrays on the host.

    Only `params` and `batch_stats` are read (not the optimizer state), so
    any process, with any devices, can read a run's model. With `like` (the
    model's variables or their shapes), a checkpoint of other variables is
    refused before anything is read.

    Raises:
      WorkdirError: there is no (finished) checkpoint, none at `step`, or it
        cannot be read or does not fit `like`; the message says what to do.
    """
    checkpoints = self.path.absolute() / _CHECKPOINTS_DIR
    if not checkpoints.is_dir():
      raise WorkdirError(f"{self.path} has no {_CHECKPOINTS_DIR}/ folder; train first ({_TRAIN_COMMAND} "
                         f"--workdir {self.path}).")
    steps = self._finished_steps()
    if not steps:
      raise WorkdirError(f"{checkpoints} holds no finished checkpoint; train longer (checkpoints are saved "
                         "every train.checkpoint_every steps and at the end).")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise WorkdirError(f"no checkpoint at step {step} in {checkpoints}; there are steps "
                         f"{', '.join(map(str, steps))}.")
    path = self._state_path(step)
    silence_failed_read_leftovers()
    try:
      with _state_handler() as handler:
        saved = handler.metadata(path)
        saved = {name: dict(saved[name]) for name in ("params", "batch_stats") if saved.get(name)}
        if like is not None and (problems := shape_differences(saved, like, f"model of {CONFIG_FILE}")):
          raise WorkdirError(f"checkpoint step {step} in {checkpoints} does not fit the model of "
                             f"{self.config_path}: {'; '.join(problems)}.")
        target = jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), saved)
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        variables = handler.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    except WorkdirError:
      raise
    except Exception as error:  # pylint: disable=broad-except  (orbax and tensorstore raise many kinds)
      older = [s for s in steps if s < step]
      hint = f" --step {older[-1]} reads the one before it." if older else ""
      raise WorkdirError(f"checkpoint step {step} in {checkpoints} cannot be read "
                         f"({first_line(error, kind=True)}).{hint}") from None
    return variables, step

  # ------------------------------------------------------------------------- metrics and evaluations

  def metric_writer(self, *, resume_step: int, reevaluate: bool):
    """A clu `MetricWriter` of scalars: metrics.jsonl and TensorBoard on process 0, nothing elsewhere.

    metrics.jsonl first loses what a resumed run writes again: the lines of
    steps after `resume_step` (and, with `reevaluate`, the evaluation of
    `resume_step` itself), and a line cut short by a kill. clu and TensorFlow
    load here, on first use; the input pipeline has already kept TensorFlow
    off the accelerators.
    """
    from focal_jax.engine import metric_writers  # pylint: disable=g-import-not-at-top

    if jax.process_index() != 0:
      return metric_writers.MultiWriter([])
    if self.metrics_path.exists():
      _write_whole(self.metrics_path, "".join(
          line for line in self.metrics_path.read_text().splitlines(keepends=True)
          if _kept_on_resume(line, resume_step, reevaluate)))
    return metric_writers.MultiWriter([metric_writers.JsonlWriter(self.metrics_path),
                                       metric_writers.SummaryWriter(str(self.path))])

  def write_eval(self, step: int, metrics: dict[str, float]) -> None:
    """Writes eval_N.json: `{"step": N, **metrics}` (process 0 only)."""
    if jax.process_index() == 0:
      _write_whole(self.eval_path(step), json.dumps({"step": step, **metrics}, indent=2))


def _kept_on_resume(line: str, resume_step: int, reevaluate: bool) -> bool:
  """Whether a metrics.jsonl line stays when a run resumes at `resume_step`."""
  try:
    entry = json.loads(line)
    step = int(entry["step"])
  except (ValueError, KeyError, TypeError):  # cut short by a kill
    return False
  is_evaluation = any(name.startswith("eval/") for name in entry)
  return step < resume_step or (step == resume_step and not (reevaluate and is_evaluation))


def _write_whole(path: Path, text: str) -> None:
  """Writes `text` to a sibling file, then renames it over `path`: readers see the old or the new file."""
  partial = path.with_name(f".{path.name}.partial")
  partial.write_text(text)
  partial.replace(path)
