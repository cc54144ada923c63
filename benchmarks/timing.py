"""Shared timing helpers of the benchmarks: medians of repeated runs after warm-up."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 10) -> float:
  """Median wall time of `fn()` (its result blocked on) over `repeats` runs after `warmup` runs."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved_median_seconds(fns: dict[str, Callable[[], object]], *, warmup: int = 2,
                               repeats: int = 10) -> dict[str, float]:
  """Median wall time of each of `fns`, timed in turn on every repetition.

  Alternating the contenders makes both see the same machine load, so their
  ratio holds on a shared machine.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def cpu_model() -> str:
  """The CPU's name, family and model from `/proc/cpuinfo` (Linux), else `platform.processor()`.

  Virtual machines often report only a vendor and a clock ("Intel(R) Xeon(R)
  Processor @ 2.60GHz"); the family and model numbers tell such CPUs apart.
  """
  try:
    with open("/proc/cpuinfo") as cpuinfo:
      fields = dict(line.split(":", 1) for line in cpuinfo.read().split("\n\n")[0].splitlines() if ":" in line)
  except OSError:
    fields = {}
  fields = {key.strip(): value.strip() for key, value in fields.items()}
  name = fields.get("model name") or platform.processor() or platform.machine()
  if "cpu family" in fields and "model" in fields:
    name += f" (family {fields['cpu family']}, model {fields['model']})"
  return name


def machine_line() -> str:
  """One line naming the machine and the versions a result depends on."""
  return (f"{cpu_model()}, {jax.device_count()} x {jax.devices()[0].platform}, "
          f"python {platform.python_version()}, jax {jax.__version__}")
