"""Where a compiled step's time goes on XLA:CPU, read from a `jax.profiler` trace.

XLA:CPU runs a program on its compute threads (as many as the process may
use cores) as thread-pool tasks: the executor's tasks run the operations
(fusions, library calls) whose inputs are ready, one operation per thread at
a time, and operations that XLA itself spreads over the threads (its own
convolutions, for one) add tasks of their own. The trace marks where each
task starts and stops on its thread, and records one span per operation; an
operation that XLA spreads over the threads records only its dispatch there,
its work shows as tasks. From these: the time in tasks and in operations per
step (summed over the threads), how busy the threads were (the share of the
traced time during which 0, 1, 2, ... of them ran a task), and the operation
kinds that took the most time.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

COMPUTE_THREAD_PREFIX = "tf_XLAEigen"  # XLA:CPU's compute threads, as the trace names them
TASK_START, TASK_STOP = "ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"
_NOT_OPERATIONS = ("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool", "end: ")  # the executor's own spans


def summarize_cpu_trace(trace_dir: str | Path, steps: int, top: int = 8) -> dict:
  """Task and operation time, thread occupancy and the costliest operation kinds of `steps` traced steps.

  Args:
    trace_dir: the directory given to `jax.profiler.trace(..., create_perfetto_trace=True)`.
    steps: how many steps the trace holds, to give figures per step.
    top: how many operation kinds to list.

  Returns:
    `{"threads", "task_ms_per_step", "operation_ms_per_step", "busy_share" (threads in a task -> share
    of the traced time), "top_kinds_ms_per_step" (operation kind -> ms)}`.

  Raises:
    FileNotFoundError: `trace_dir` holds no Perfetto trace.
    ValueError: the trace holds no task of XLA:CPU's compute threads (as on a GPU).
  """
  traces = sorted(Path(trace_dir).glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not traces:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  compute_threads = {(e["pid"], e["tid"]) for e in events
                     if e.get("ph") == "M" and e.get("name") == "thread_name"
                     and e["args"]["name"].startswith(COMPUTE_THREAD_PREFIX)}
  per_thread = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and (e["pid"], e["tid"]) in compute_threads:
      per_thread[(e["pid"], e["tid"])].append((e["ts"], e["ts"] + e["dur"], e["name"]))
  tasks, operations = [], []
  for spans in per_thread.values():
    spans.sort(key=lambda span: (span[0], -span[1]))
    tasks += _tasks(spans)
    operations += _leaves([span for span in spans if not span[2].startswith(_NOT_OPERATIONS)])
  if not tasks:
    raise ValueError(f"the trace in {trace_dir} holds no task of XLA:CPU's compute threads")

  edges = sorted([(start, 1) for start, _ in tasks] + [(stop, -1) for _, stop in tasks])
  busy_time = collections.Counter()
  running, previous = 0, edges[0][0]
  for time, change in edges:
    busy_time[running] += time - previous
    running, previous = running + change, time
  traced = sum(busy_time.values())
  per_kind = collections.Counter()
  for start, end, name in operations:
    per_kind[re.sub(r"\.\d+$", "", name)] += end - start
  return {
      "threads": len(compute_threads),
      "task_ms_per_step": round(sum(stop - start for start, stop in tasks) / steps / 1000, 2),
      "operation_ms_per_step": round(sum(end - start for start, end, _ in operations) / steps / 1000, 2),
      "busy_share": {busy: round(time / traced, 3) for busy, time in sorted(busy_time.items())},
      "top_kinds_ms_per_step": {kind: round(time / steps / 1000, 2) for kind, time in per_kind.most_common(top)},
  }


def _tasks(spans: list[tuple]) -> list[tuple]:
  """`(start, stop)` of the thread-pool tasks among one thread's spans, sorted by time."""
  tasks, started = [], None
  for time, _, name in spans:
    if name == TASK_START:
      started = time
    elif name == TASK_STOP and started is not None:
      tasks.append((started, time))
      started = None
  return tasks


def _leaves(spans: list[tuple]) -> list[tuple]:
  """The spans `(start, end, name)` of one thread, sorted by time, that hold no other span.

  A conditional's span, for one, holds the spans of its branch's operations.
  """
  return [span for span, after in zip(spans, spans[1:] + [None]) if after is None or after[0] >= span[1]]
