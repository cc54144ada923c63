"""Candidate demo recipes, each run as a user runs the demo: COCO AP against wall time.

    python benchmarks/sweep_demo.py                              # every candidate, one after the other
    python benchmarks/sweep_demo.py --candidates w24,steps4000_wide --data_dir /tmp/tfds

Each candidate is `python -m experiments.coco_retinanet` with a few overrides
of the demo recipe, in a fresh work dir and process, timed from start to the
final COCO table. Without `--data_dir`, each run builds the synthetic dataset
in a new data dir first, as on a clean clone. The compilation cache is off, so
every run compiles as a first run does. The rows go to
`--out/sweep_demo.json` as each candidate ends, with the machine; a markdown
table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import cpu_model

REPO = Path(__file__).resolve().parents[1]

WIDER = ["model.width=24", "model.fpn_channels=96", "model.head_channels=96"]
GAMMA_1 = ["loss.gamma=1.0", "loss.alpha=0.25"]  # the best row of experiments/results/gamma.md
WIDE_KERNEL_GRAD = ["model.cpu_rewrites.kernel_grad_as_matmul='wide'"]
CANDIDATES = {
    "demo": [],
    "w24": WIDER,
    "w32": ["model.width=32", "model.fpn_channels=128", "model.head_channels=128"],
    "steps4000_wide": ["train.total_steps=4000"] + WIDE_KERNEL_GRAD,
    "gamma1_wide": GAMMA_1 + WIDE_KERNEL_GRAD,
    "w24_gamma1_wide": WIDER + GAMMA_1 + WIDE_KERNEL_GRAD,
}


def run_candidate(name: str, overrides: list[str], data_dir: str, workdirs: Path) -> dict:
  """Runs one candidate to its COCO table; its metrics, wall time and the steps it trained."""
  workdir = workdirs / name
  env = {**os.environ, "TFDS_DATA_DIR": data_dir}
  started = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "experiments.coco_retinanet", "--workdir", str(workdir),
                         "--compilation_cache", "", *[f"--{o}" for o in overrides]],
                        cwd=REPO, env=env, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - started
  if done.returncode != 0:
    raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
  [evaluation] = sorted(workdir.glob("eval_*.json"))
  metrics = json.loads(evaluation.read_text())
  return {"candidate": name, "overrides": overrides, "seconds": seconds, "steps": metrics.pop("step"), **metrics}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names")
  parser.add_argument("--data_dir", default=None, help="a data dir that holds synthetic_shapes (default: a new one)")
  parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
  args = parser.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows = []
  with tempfile.TemporaryDirectory() as scratch:
    for name in args.candidates.split(","):
      data_dir = args.data_dir or str(Path(scratch) / f"tfds_{name}")  # a fresh dataset: built in the run
      rows.append(run_candidate(name, CANDIDATES[name], data_dir, Path(scratch) / "runs"))
      row = rows[-1]
      print(f"{name}: AP {row['AP']:.3f}, AP50 {row['AP50']:.3f}, AP75 {row['AP75']:.3f} after {row['steps']} "
            f"steps, {row['seconds']:.0f} s", flush=True)
      (out / "sweep_demo.json").write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=2) + "\n")
  print(f"\n{cpu_model()}\n\n| candidate | overrides | AP | AP50 | AP75 | steps | wall time (s) |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for row in rows:
    print(f"| {row['candidate']} | {' '.join(row['overrides']) or '-'} | {row['AP']:.3f} | {row['AP50']:.3f} | "
          f"{row['AP75']:.3f} | {row['steps']} | {row['seconds']:.0f} |")


if __name__ == "__main__":
  main()
