"""`benchmarks/cpu_trace.py` on a hand-written trace whose figures are worked out by hand."""

import gzip
import json

import pytest

from benchmarks.cpu_trace import TASK_START, TASK_STOP, summarize_cpu_trace


def _write_trace(directory, events):
  path = directory / "plugins" / "profile" / "run" / "perfetto_trace.json.gz"
  path.parent.mkdir(parents=True)
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)


def _thread(tid, name):
  return {"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": name}}


def _span(tid, name, start_ms, end_ms):
  return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": start_ms * 1000, "dur": (end_ms - start_ms) * 1000}


def _task(tid, start_ms, stop_ms):
  return [_span(tid, TASK_START, start_ms, start_ms), _span(tid, TASK_STOP, stop_ms, stop_ms)]


def test_tasks_operations_occupancy_and_kinds_of_two_compute_threads(tmp_path):
  _write_trace(tmp_path, [
      _thread(1, "tf_XLAEigen/11"), _thread(2, "tf_XLAEigen/22"), _thread(3, "python"),
      *_task(1, 0, 12), *_task(1, 20, 26), *_task(2, 4, 16),
      _span(1, "ThunkExecutor::Execute", 0, 12),  # the executor's own span: not an operation
      _span(1, "ynn_fusion.1", 0, 10),
      _span(2, "convolution.3", 5, 15),
      _span(1, "cond.7", 20, 26),  # holds the next span: not an operation itself
      _span(1, "ynn_fusion.2", 20, 25),
      _span(3, "PjitFunction(step)", 0, 30),  # not a compute thread
  ])
  summary = summarize_cpu_trace(tmp_path, steps=1)
  # In a task: 0-4 one thread, 4-12 both, 12-16 one, 16-20 none, 20-26 one; 26 ms traced.
  assert summary["busy_share"] == {0: round(4 / 26, 3), 1: round(14 / 26, 3), 2: round(8 / 26, 3)}
  assert summary["threads"] == 2
  assert summary["task_ms_per_step"] == 30.0
  assert summary["operation_ms_per_step"] == 25.0
  assert summary["top_kinds_ms_per_step"] == {"ynn_fusion": 15.0, "convolution": 10.0}
  assert summarize_cpu_trace(tmp_path, steps=5)["operation_ms_per_step"] == 5.0


def test_a_trace_without_compute_threads_is_an_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="perfetto_trace"):
    summarize_cpu_trace(tmp_path, steps=1)
  _write_trace(tmp_path, [_thread(3, "python"), _span(3, "PjitFunction(step)", 0, 30)])
  with pytest.raises(ValueError, match="no task of XLA:CPU's compute threads"):
    summarize_cpu_trace(tmp_path, steps=1)
