"""Multi-process runs with real processes on 127.0.0.1 (JAX's CPU backend, gloo collectives).

Each process is a fresh Python (`tests/multihost_worker.py` or the entry
point) with its own simulated CPU devices; every launch has a hard deadline
after which the processes are killed with SIGKILL (a process that joined
`jax.distributed` ignores SIGTERM), and none outlives its test.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from focal_jax.engine.distributed import check_process_arguments, parse_address
from focal_jax.engine.mesh import make_mesh, per_process_batch_size

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _launch(commands: list[list[str]], *, devices: int, timeout_s: float, logs: Path,
            compilation_cache: Path | None = None) -> list[tuple[int, str]]:
  """Runs `commands` at the same time, each with `devices` CPU devices; returns (exit code, output) each.

  Fails the test (after killing every process still running) when they are
  not all done within `timeout_s`. `compilation_cache`: a JAX compilation
  cache directory that launches of the same programs share.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  if compilation_cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
  logs.mkdir(parents=True, exist_ok=True)
  processes, outputs = [], []
  try:
    for i, command in enumerate(commands):
      outputs.append(logs / f"process_{i}.log")
      with open(outputs[-1], "w") as out:
        processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO))
    deadline = time.monotonic() + timeout_s
    for process in processes:
      try:
        process.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        tails = "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in outputs)
        pytest.fail(f"processes still running after {timeout_s} s (killed):\n{tails}")
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()  # SIGKILL
        process.wait()
  return [(process.returncode, path.read_text()) for process, path in zip(processes, outputs)]


def _result(output: str) -> dict:
  lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
  assert lines, f"no RESULT line in:\n{output[-3000:]}"
  return json.loads(lines[-1][len("RESULT "):])


def _losses(workdir: Path) -> dict[int, float]:
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {line["step"]: line["loss"] for line in lines if "loss" in line}


def _checkpoint_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _two_processes(data_dir, workdir, total_steps, *, extra=((), ())):
  address = f"127.0.0.1:{_free_port()}"
  return [[sys.executable, str(WORKER), "--workdir", str(workdir), "--data_dir", data_dir,
           "--total_steps", str(total_steps), "--coordinator_address", address, "--num_processes", "2",
           "--process_id", str(i), *extra[i]] for i in range(2)]


@pytest.mark.slow
def test_two_processes_train_as_one_and_resume_after_preemption(synthetic_data_dir, tmp_path):
  """2 processes x 2 CPU devices give the losses of 1 process x 4 devices, across a preemption.

  What makes the comparison honest: both runs use the global batch of 8
  (`data.batch_size`), the same seed and the same code (`train_and_evaluate`).
  In the 2-process run each process reads its own half of the split
  (`tfds.even_splits`) in its own shuffled order, 4 examples per step, and the
  global array of a step holds process 0's 4 examples, then process 1's. The
  1-process reference (4 devices) reads the same two per-process streams and
  concatenates them in that order (`--joined_streams 2`), so its global batch
  holds the same examples: equal losses then show that the assembled batch,
  the cross-process gradient all-reduce, the batch statistics and the updates
  all match, not just that both runs train.

  The 2-process run is preempted: process 1 alone gets SIGTERM before step 1;
  both processes must agree on one step, save it together and return None.
  A fresh pair of processes restores that checkpoint and finishes; every
  step's loss must equal the reference's, and both processes get process 0's
  COCO numbers from the gathered detections of both. (The launches share a
  JAX compilation cache, so the second pair does not compile again.)
  """
  total_steps = 4
  reference_dir, multi_dir, cache = tmp_path / "reference", tmp_path / "multi", tmp_path / "jax_cache"
  worker = [sys.executable, str(WORKER), "--data_dir", synthetic_data_dir, "--total_steps", str(total_steps)]
  [(code, output)] = _launch([worker + ["--workdir", str(reference_dir), "--joined_streams", "2"]], devices=4,
                             timeout_s=120, logs=tmp_path / "logs_reference", compilation_cache=cache)
  assert code == 0, output[-3000:]
  reference = _result(output)
  assert (reference["process_count"], reference["device_count"]) == (1, 4)

  preempted = _launch(_two_processes(synthetic_data_dir, multi_dir, total_steps,
                                     extra=((), ("--sigterm_before_step", "1"))),
                      devices=2, timeout_s=120, logs=tmp_path / "logs_preempted", compilation_cache=cache)
  for code, output in preempted:
    assert code == 0, output[-3000:]
    assert _result(output)["result"] is None, "the run was not preempted"
  saved = _checkpoint_steps(multi_dir)
  assert 1 <= saved[-1] < total_steps, saved

  resumed = _launch(_two_processes(synthetic_data_dir, multi_dir, total_steps), devices=2, timeout_s=120,
                    logs=tmp_path / "logs_resumed", compilation_cache=cache)
  results = []
  for code, output in resumed:
    assert code == 0, output[-3000:]
    results.append(_result(output))
  assert [(r["process_index"], r["process_count"], r["device_count"]) for r in results] == [(0, 2, 4), (1, 2, 4)]
  assert _checkpoint_steps(multi_dir)[-1] == total_steps

  expected, got = _losses(reference_dir), _losses(multi_dir)
  assert sorted(got) == list(range(1, total_steps + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-5)
  # pycocotools ran once, on process 0, over the detections of both processes' shards.
  assert results[1]["evaluations"] == [] and results[0]["evaluations"] == reference["evaluations"]
  assert len(results[0]["evaluations"][0]["image_ids"]) == 16  # the whole validation split
  for result in results:
    assert result["result"].keys() == reference["result"].keys()
    np.testing.assert_allclose(list(result["result"].values()), list(reference["result"].values()), atol=1e-4)
  # Process 0 alone logs and writes metrics: one line per step, progress only in its output.
  lines = (multi_dir / "metrics.jsonl").read_text().splitlines()
  assert len([line for line in lines if '"loss"' in line]) == total_steps
  assert (multi_dir / f"eval_{total_steps}.json").exists()
  assert f"step {total_steps}/{total_steps}" in resumed[0][1] and "loss" not in resumed[1][1]


def _entry_point(*flags: str) -> list[str]:
  return [sys.executable, "-m", "experiments.coco_retinanet", "--config", "demo", *flags]


def test_unreachable_coordinator_is_an_error_within_the_timeout(tmp_path):
  started = time.monotonic()
  [(code, output)] = _launch([_entry_point(f"--coordinator_address=127.0.0.1:{_free_port()}",
                                           "--num_processes=2", "--process_id=1", "--distributed_timeout=3",
                                           f"--workdir={tmp_path / 'run'}")],
                             devices=1, timeout_s=90, logs=tmp_path / "logs")
  assert code == 2, output[-3000:]
  assert "could not reach the coordinator 127.0.0.1:" in output and "within 3 s" in output, output[-3000:]
  assert time.monotonic() - started < 60
  assert not (tmp_path / "run").exists()


def test_processes_started_with_different_counts_both_fail(tmp_path):
  address = f"127.0.0.1:{_free_port()}"
  runs = _launch([_entry_point(f"--coordinator_address={address}", f"--num_processes={n}", f"--process_id={i}",
                               "--distributed_timeout=5", f"--workdir={tmp_path / 'run'}")
                  for i, n in ((0, 2), (1, 3))], devices=1, timeout_s=90, logs=tmp_path / "logs")
  for code, output in runs:
    assert code == 2, output[-3000:]
    assert "error:" in output and "number of processes" in output, output[-3000:]


def test_process_arguments_are_checked_before_anything_starts():
  check_process_arguments(None, None, None)
  check_process_arguments("10.0.0.1:1234", 4, 3)
  assert parse_address("[::1]:8476") == ("[::1]", 8476)
  with pytest.raises(ValueError, match="all of"):
    check_process_arguments("10.0.0.1:1234", 4, None)
  with pytest.raises(ValueError, match=r"process id 4 is not in 0..3"):
    check_process_arguments("10.0.0.1:1234", 4, 4)
  with pytest.raises(ValueError, match="host:port"):
    check_process_arguments("10.0.0.1", 4, 0)
  with pytest.raises(ValueError, match="at least 1"):
    check_process_arguments("10.0.0.1:1234", 0, 0)


def test_batch_sizes_are_global_and_must_divide_over_the_devices():
  mesh = make_mesh(jax.devices()[:4])
  assert per_process_batch_size(8, mesh) == 8  # one process reads the whole global batch
  with pytest.raises(ValueError, match=r"data.eval_batch_size 6 \(the global batch\) does not divide over 4 devices"):
    per_process_batch_size(6, mesh, "data.eval_batch_size")
