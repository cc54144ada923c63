"""Device mesh, shardings and global batches for data-parallel training.

The batch is sharded over the `data` axis of a one-axis mesh of all devices
(of all processes); parameters and optimizer state are replicated. The same
code runs on one CPU, 8 GPUs or a multi-host TPU pod (processes joined with
`focal_jax.engine.distributed.initialize`).

Batch sizes in configs are global (all processes together); each process
reads `per_process_batch_size(global, mesh)` examples per step, and
`global_batch` assembles the processes' parts into one array.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A one-axis (`data`) mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over the `data` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def per_process_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh, name: str = "batch_size") -> int:
  """This process's share of a global batch: `global_batch_size / process_count`.

  Raises:
    ValueError: naming `name`, when the global batch does not divide evenly
      over the processes or over the mesh's devices.
  """
  processes = jax.process_count()
  if global_batch_size % processes:
    raise ValueError(f"{name} {global_batch_size} (the global batch) does not divide over {processes} "
                     f"processes; use a multiple of {processes}.")
  if global_batch_size % mesh.size:
    raise ValueError(f"{name} {global_batch_size} (the global batch) does not divide over {mesh.size} "
                     f"devices; use a multiple of {mesh.size}.")
  return global_batch_size // processes


def global_batch(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Assembles this process's numpy batch into global arrays sharded over `data`.

  Every process passes its own `[B_local, ...]` part; the global arrays are
  `[B_local * process_count, ...]`. `B_local` must divide evenly over the
  process's devices.
  """
  sharding = batch_sharded(mesh)
  local_devices = len(mesh.local_devices)
  for name, value in local_batch.items():
    if value.shape[0] % local_devices:
      raise ValueError(f"batch entry {name!r} has {value.shape[0]} examples, not divisible by this "
                       f"process's {local_devices} devices.")
  return {name: jax.make_array_from_process_local_data(sharding, value)
          for name, value in local_batch.items()}


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a `batch_sharded` array, in the order `global_batch` took them."""
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])
