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


def machine_line() -> str:
  """One line naming the machine and the versions a result depends on."""
  return (f"{platform.processor() or platform.machine()}, {jax.device_count()} x {jax.devices()[0].platform}, "
          f"python {platform.python_version()}, jax {jax.__version__}")
