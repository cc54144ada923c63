"""One process of the multi-process training test (`tests/test_multihost.py`), run as a script.

    python tests/multihost_worker.py --workdir W --data_dir D --total_steps N
        [--coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I]
        [--sigterm_before_step S] [--joined_streams K]

Trains `test_train.tiny_config` (score threshold 0, so that every image has
detections) with `train_and_evaluate`, after joining a multi-process run when a
coordinator is given. `--sigterm_before_step S`: the process sends itself
SIGTERM just before step S. `--joined_streams K` (one process only): each
global batch is the concatenation of the K per-process input streams of a
K-process run, in process order, which is what the global batch of a K-process
run holds. The last line printed is `RESULT {json}`: what `train_and_evaluate`
returned and what reached pycocotools in this process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal

import numpy as np


def _parse(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--total_steps", type=int, required=True)
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--sigterm_before_step", type=int)
  parser.add_argument("--joined_streams", type=int)
  return parser.parse_args(argv)


def _join_streams(input_pipeline, count: int) -> None:
  """Makes the loop's train pipeline yield the `count` per-process streams, concatenated."""
  build_one = input_pipeline.build_train_dataset

  def build(config, *, start_step=0):
    share = dataclasses.replace(config, batch_size=config.batch_size // count)
    streams = [build_one(share, start_step=start_step, process_index=i, process_count=count)
               for i in range(count)]
    return ({key: np.concatenate([part[key] for part in parts]) for key in parts[0]} for parts in zip(*streams))

  input_pipeline.build_train_dataset = build


def _sigterm_before(train_loop, step: int) -> None:
  """Sends SIGTERM to this process when the loop assembles the batch of `step` (1-based)."""
  assemble = train_loop.global_batch
  calls = {"n": 0}

  def wrapped(batch, mesh):
    calls["n"] += 1
    if calls["n"] == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return assemble(batch, mesh)

  train_loop.global_batch = wrapped


def _record_evaluations(train_loop) -> list[dict]:
  """Records the image ids and the number of detections of each pycocotools run."""
  evaluate = train_loop.coco_evaluate
  runs = []

  def recorded(ground_truth, results):
    runs.append({"image_ids": sorted({r["image_id"] for r in results}), "detections": len(results)})
    return evaluate(ground_truth, results)

  train_loop.coco_evaluate = recorded
  return runs


def main(argv=None) -> None:
  args = _parse(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  for noisy in ("absl", "tensorflow", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  from focal_jax.engine import distributed  # before anything touches a device

  if args.coordinator_address:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id, timeout_s=60)
  import jax

  import focal_jax.engine.loop as train_loop
  from test_train import tiny_config

  if args.joined_streams:
    _join_streams(train_loop.input_pipeline, args.joined_streams)
  if args.sigterm_before_step:
    _sigterm_before(train_loop, args.sigterm_before_step)
  evaluations = _record_evaluations(train_loop)
  config = tiny_config(args.data_dir, total_steps=args.total_steps)
  config = dataclasses.replace(config, postprocess=dataclasses.replace(config.postprocess, score_threshold=0.0))
  result = train_loop.train_and_evaluate(config, args.workdir)
  print("RESULT " + json.dumps({"process_index": jax.process_index(), "process_count": jax.process_count(),
                                "device_count": jax.device_count(), "result": result,
                                "evaluations": evaluations}), flush=True)


if __name__ == "__main__":
  main()
