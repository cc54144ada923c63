"""Joining a multi-process run: TPU pod slices, several GPU nodes, or CPU processes.

Every process of a run calls `initialize` once, before any other JAX call
(anything that touches devices). Then `jax.devices()` lists the devices of all
processes, `jax.process_index()` tells this process's rank, and the training
loop (`focal_jax.engine.loop`) does the rest: each process reads its share of
the data, all of them take part in every step and checkpoint, process 0 logs.

Two ways in:
- `initialize()`: JAX detects the cluster (TPU pod slice, SLURM, Open MPI,
  Kubernetes) and finds the coordinator, the number of processes and this
  process's id itself.
- `initialize(coordinator_address, num_processes, process_id)`: given by hand,
  the same on every process but the id (0 .. num_processes - 1); the
  coordinator is process 0's host and a free port. A loopback coordinator
  (127.0.0.1, localhost) is also bound to loopback only; otherwise process 0
  listens on that port on all interfaces (JAX's default).

Bad input is an error, never a silent hang: an id outside the range fails at
once (ValueError); a coordinator that does not answer and processes started
with different counts fail within `timeout_s` seconds with
`DistributedInitError`. When processes are missing, JAX itself ends the
waiting processes after `timeout_s` (a fatal "DEADLINE_EXCEEDED ...
RegisterTask" log line and SIGABRT, which Python cannot catch); process 0
logs beforehand what it waits for.
"""

from __future__ import annotations

import logging
import socket
import time

import jax

from focal_jax._messages import first_line

_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

log = logging.getLogger(__name__)


class DistributedInitError(RuntimeError):
  """The processes of a multi-process run could not be joined up."""


def parse_address(address: str) -> tuple[str, int]:
  """`"host:port"` -> `(host, port)`; a ValueError that shows the expected form otherwise."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator address {address!r} is not of the form host:port (e.g. 10.0.0.1:1234).")
  return host, int(port)


def check_process_arguments(coordinator_address: str | None, num_processes: int | None,
                            process_id: int | None) -> None:
  """Raises ValueError unless all three are given and consistent, or none is."""
  given = [value is not None for value in (coordinator_address, num_processes, process_id)]
  if not any(given):
    return
  if not all(given):
    raise ValueError("give all of the coordinator address, the number of processes and the process id, "
                     "or none of them (JAX then detects the cluster).")
  parse_address(coordinator_address)
  if num_processes < 1:
    raise ValueError(f"the number of processes must be at least 1; got {num_processes}.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"process id {process_id} is not in 0..{num_processes - 1} "
                     f"(ids of a {num_processes}-process run).")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> None:
  """Joins this process to a multi-process JAX run (see the module docstring).

  Args:
    coordinator_address: `host:port` of process 0's coordinator; None (with
      the other two None) lets JAX detect the cluster.
    num_processes: processes in the run.
    process_id: this process's id, `0 <= process_id < num_processes`.
    timeout_s: how long to wait for the coordinator and the other processes.

  Raises:
    ValueError: inconsistent arguments (checked before anything starts).
    DistributedInitError: no cluster detected, the coordinator did not answer
      within `timeout_s`, or the processes disagree on their number.
  """
  check_process_arguments(coordinator_address, num_processes, process_id)
  if coordinator_address is None:
    kwargs = {}
    where = "the cluster that JAX detected"
  else:
    host, _ = parse_address(coordinator_address)
    kwargs = {"coordinator_address": coordinator_address, "num_processes": num_processes,
              "process_id": process_id, "cluster_detection_method": "deactivate"}
    if host in _LOOPBACK_HOSTS:
      kwargs["coordinator_bind_address"] = coordinator_address
    where = f"coordinator {coordinator_address} as process {process_id} of {num_processes}"
    if process_id == 0:
      log.info("process 0: waiting up to %d s for %d processes to join at %s", timeout_s, num_processes,
               coordinator_address)
    else:
      _wait_for_coordinator(coordinator_address, timeout_s)
  try:
    jax.distributed.initialize(initialization_timeout=timeout_s, **kwargs)
  except ValueError as error:  # raised before connecting: nothing detected, or unusable values
    raise DistributedInitError(
        f"could not start a multi-process run: {error} Outside a TPU pod slice, SLURM, Open MPI or "
        f"Kubernetes, pass the coordinator address, the number of processes and the process id.") from None
  except RuntimeError as error:  # e.g. JAX already in use, or initialized twice
    raise DistributedInitError(f"could not join {where}: {first_line(error)}") from None
  if coordinator_address is not None:  # a detected cluster gives every process the same count
    _check_same_process_count(num_processes, process_id, timeout_s)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until `address` accepts connections (process 0 may start later than the others)."""
  host, port = parse_address(address)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), port), timeout=max(min(5.0, timeout_s), 0.1)):
        return
    except OSError as error:
      if time.monotonic() >= deadline:
        raise DistributedInitError(
            f"could not reach the coordinator {address} within {timeout_s} s ({error}). Is process 0 "
            f"running with this coordinator address, and is its port open to this host?") from None
      time.sleep(0.5)


def _check_same_process_count(own: int, process_id: int, timeout_s: int) -> None:
  """Fails when the processes were started with different numbers of processes.

  Each process publishes its count in the coordinator's key-value store (its
  client from orbax's public accessor) and reads everyone's back (a count
  that names a process that does not exist is caught by the timeout).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (its public accessor of the client)

  client = ocp.multihost.get_jax_distributed_client()
  client.key_value_set(f"focal_jax/num_processes/{process_id}", str(own))
  for other in range(own):
    try:
      theirs = client.blocking_key_value_get(f"focal_jax/num_processes/{other}", timeout_s * 1000)
    except RuntimeError as error:  # jaxlib's DEADLINE_EXCEEDED
      raise DistributedInitError(
          f"process {other} of the {own} this process ({process_id}) expects did not report within "
          f"{timeout_s} s ({first_line(error)}); were all processes started with the same number of "
          f"processes?") from None
    if int(theirs) != own:
      raise DistributedInitError(
          f"process {other} was started for {theirs} processes, this one ({process_id}) for {own}; "
          f"start every process with the same number of processes.")
