"""Checkpoints of the train state with orbax-checkpoint's `CheckpointManager`."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every so often, keeps the last `keep`, restores the latest.

  Every process calls every method (orbax coordinates multi-host saving).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state) -> None:
    """Saves `state` as checkpoint `step` (asynchronously; see `wait`)."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, like):
    """Restores checkpoint `step` with the structure, shapes and shardings of `like`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
