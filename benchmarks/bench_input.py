"""Input pipeline throughput (images/s of training batches), on CPU.

    python benchmarks/bench_input.py --data_dir /tmp/tfds [--batches 50] [--batch_size 16]

Builds (once, offline) `synthetic_shapes/default` (128x128 PNG) and
`synthetic_shapes/coco_like` (640x480 JPEG with up to 20 objects, a stand-in
for COCO images) into `--data_dir`, then times the training iterator after a
warm-up, for:
- coco_like -> 640x640 batches with large-scale jitter (0.1-2.0), flip;
- synthetic -> 640x640 batches (upscaled 5x, jitter 0.8-1.25), flip;
- synthetic -> 128x128 batches (native size, flip only: the demo setting).
"""

from __future__ import annotations

import argparse
import os
import time


def measure(config, batches: int, warmup: int = 5) -> tuple[float, float]:
  from focal_jax.data import build_train_dataset  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  it = build_train_dataset(config, process_index=0, process_count=1)
  for _ in range(warmup):
    next(it)
  first = time.perf_counter() - start
  times = []
  for _ in range(batches):
    t = time.perf_counter()
    batch = next(it)
    times.append(time.perf_counter() - t)
  assert batch["images"].shape[0] == config.batch_size
  return config.batch_size * batches / sum(times), first


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", default=os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))
  parser.add_argument("--batches", type=int, default=50)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args()

  from focal_jax.data import InputConfig  # pylint: disable=g-import-not-at-top
  from focal_jax.data import synthetic_shapes  # pylint: disable=g-import-not-at-top

  for name in ("default", "coco_like"):
    synthetic_shapes.prepare(args.data_dir, name)

  common = dict(data_dir=args.data_dir, batch_size=args.batch_size, resize="square",
                shuffle_buffer=1024)
  cases = {
      "coco_like 640x480 JPEG -> 640x640, LSJ 0.1-2.0": InputConfig(
          dataset="synthetic_shapes/coco_like", image_size=640, scale_range=(0.1, 2.0), **common),
      "synthetic 128 PNG -> 640x640, jitter 0.8-1.25": InputConfig(
          dataset="synthetic_shapes", image_size=640, scale_range=(0.8, 1.25), **common),
      "synthetic 128 PNG -> 128x128, flip only": InputConfig(
          dataset="synthetic_shapes", image_size=128, scale_range=(1.0, 1.0), **common),
  }
  print(f"{os.cpu_count()} CPUs, batch {args.batch_size}, {args.batches} timed batches after 5 warm-up")
  for label, config in cases.items():
    rate, first = measure(config, args.batches)
    print(f"{label:50s} {rate:8.1f} images/s   (start + 5 batches: {first:.1f} s)", flush=True)


if __name__ == "__main__":
  main()
