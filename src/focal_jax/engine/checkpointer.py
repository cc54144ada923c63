"""The train state's checkpoints: saving, keeping the last few, restoring the newest readable one.

`focal_jax.engine.workdir.Workdir.checkpointer` makes the one `Checkpointer`
of a run, with the work dir's folders for checkpoints and for damaged ones.
orbax writes each checkpoint aside and renames it when complete, so a kill
during a save leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import traceback
import types
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from focal_jax._messages import first_line

log = logging.getLogger(__name__)


class UnreadableCheckpointsError(ValueError):
  """There are checkpoints, but none of them can be read."""


def _is_read_error(error: BaseException | None) -> bool:
  """Whether `error` is an orbax or TensorStore error of reading a checkpoint."""
  if error is None:
    return False
  frames = traceback.extract_tb(error.__traceback__)
  # "<status>: Error reading <key> ...", or "<status>: Error opening "zarr" driver: ..." for an array's metadata
  tensorstore_read = re.match(r"[A-Z_]+: Error (reading|opening) ", str(error))
  return any("orbax" in frame.filename for frame in frames) or tensorstore_read is not None


def _is_failed_read_leftover(report) -> bool:
  """Whether an unraisable-exception report comes from what a failed orbax read left behind."""
  error, source = report.exc_value, report.object
  closed_loop = source is None and isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
  orbax_read = isinstance(source, types.CoroutineType) and "orbax" in source.cr_code.co_filename
  return closed_loop or orbax_read


def _is_read_error_left_unawaited(record: logging.LogRecord) -> bool:
  """Whether an `asyncio` log record reports a checkpoint read error that nobody awaited."""
  return ("exception was never retrieved" in record.getMessage() and record.exc_info is not None
          and _is_read_error(record.exc_info[1]))


def silence_failed_read_leftovers() -> None:
  """Stops the tracebacks that the rest of a failed orbax read prints; call it before reading.

  When one array of a checkpoint cannot be read, orbax raises that error but
  leaves the read's other tasks, futures, coroutines and TensorStore
  callbacks behind a closed event loop. Each then prints a traceback ("Event
  loop is closed", "exception was never retrieved", "coroutine ... was never
  awaited", or the read error again): hundreds of them for one damaged
  checkpoint, after the caller has said in one line what happened. This
  drops exactly those reports (installed once, for the rest of the process);
  all others still reach `sys.unraisablehook` as it was, the `asyncio`
  logger and `warnings`.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_failed_read_leftovers", False):
    return

  def hook(report):
    if not _is_failed_read_leftover(report):
      previous(report)

  hook.drops_failed_read_leftovers = True
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(lambda record: not _is_read_error_left_unawaited(record))
  warnings.filterwarnings("ignore", message="coroutine '_read_array_index_and_device_put' was never awaited",
                          category=RuntimeWarning)


class Checkpointer:
  """The train state's checkpoints: saves every so often, keeps the last `keep`, restores the newest readable.

  Every process calls every method (orbax coordinates multi-host saving).
  """

  def __init__(self, directory: Path, damaged_directory: Path, *, keep: int):
    """Args: where the checkpoints are, where unreadable ones go, how many to keep."""
    self.directory = str(directory)
    self._damaged = damaged_directory
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

  def restore_latest(self, like) -> tuple[Any, int | None]:
    """`(state, step)` of the newest readable checkpoint, with the structure and shardings of `like`.

    A checkpoint that cannot be read (a truncated or missing file) is moved
    to damaged_checkpoints/ with a warning, and the next older one is tried.
    `(like, None)` when there is no checkpoint.

    Raises:
      UnreadableCheckpointsError: there are checkpoints but none can be read (they are left
        where they are; the message says how to start afresh).
    """
    silence_failed_read_leftovers()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    unreadable = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as error:  # pylint: disable=broad-except  (orbax and tensorstore raise many kinds)
        unreadable.append((step, first_line(error, kind=True)))
        continue
      self._set_aside(unreadable, step)
      return state, step
    if unreadable:
      listed = "; ".join(f"step {step}: {reason}" for step, reason in unreadable)
      raise UnreadableCheckpointsError(
          f"no checkpoint in {self.directory} can be read ({listed}). To train afresh in this work dir, move "
          f"them aside first: mv {self.directory} {self._damaged}")
    return like, None

  def _set_aside(self, unreadable: list[tuple[int, str]], resumed: int) -> None:
    """Moves the unreadable checkpoints to damaged_checkpoints/ (process 0), then reloads the step list."""
    if not unreadable:
      return
    for step, reason in unreadable:
      target = self._damaged / str(step)
      suffix = 1
      while target.exists():
        target, suffix = self._damaged / f"{step}.{suffix}", suffix + 1
      if jax.process_index() == 0:
        self._damaged.mkdir(exist_ok=True)
        shutil.move(os.path.join(self.directory, str(step)), target)
        log.warning("checkpoint step %d cannot be read (%s); moved it to %s and resumed from step %d.", step,
                    reason, target, resumed)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("focal_jax: damaged checkpoints set aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
