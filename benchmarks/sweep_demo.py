"""Candidate demo recipes, each run as a user runs the demo: COCO AP against wall time.

    python benchmarks/sweep_demo.py                              # every candidate, one after the other
    python benchmarks/sweep_demo.py --candidates w24,steps4000_wide --data_dir /tmp/tfds

Each candidate is `python -m experiments.coco_retinanet` with a few overrides
of the demo recipe (most of them restore first the recipe as it was when they
ran: `OLD_DEMO`, `WEIGHT_DECAY_1E_4`, `KERNEL_DECAY_ONLY`), in a fresh work
dir and process, timed from start to the final COCO table. Without
`--data_dir`, each run builds the synthetic dataset in a new data dir first,
as on a clean clone. The compilation cache is off, so every run compiles as
a first run does. The rows go to `--out/sweep_demo.json` as each candidate
ends, with the machine; a markdown table is printed at the end.
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
sys.path.insert(0, str(REPO))  # the `experiments` package (not installed)
from experiments.ablations import (  # noqa: E402  pylint: disable=g-import-not-at-top
    ABLATION_BASE, FLIPS_LEFT_RIGHT_ONLY, WEIGHT_DECAY_1E_4)

# The demo recipe as it was before this sweep (batch 16, 3 x 3 anchors, 3,000 steps), which every
# candidate but `demo` starts from: the ablations' base with the old schedule.
OLD_DEMO = ABLATION_BASE + ["train.total_steps=3000"]
WIDER = ["model.width=24", "model.fpn_channels=96", "model.head_channels=96"]
GAMMA_1 = ["loss.gamma=1.0", "loss.alpha=0.25"]  # the best row of experiments/results/gamma.md
WIDE_KERNEL_GRAD = ["model.cpu_rewrites.kernel_grad_as_matmul='wide'"]
SQUARE_ANCHORS = ["anchors.aspect_ratios=[1.0]"]  # 3 scales x 1 ratio: experiments/results/anchors.md
BATCH_8 = ["data.batch_size=8", "optimizer.warmup_steps=200"]  # the same warmup in images
CANDIDATES = {
    "demo": [],  # the recipe as it is now
    "old_demo": OLD_DEMO,
    "w24": OLD_DEMO + WIDER,
    "w32": OLD_DEMO + ["model.width=32", "model.fpn_channels=128", "model.head_channels=128"],
    "steps4000_wide": OLD_DEMO + ["train.total_steps=4000"] + WIDE_KERNEL_GRAD,
    "gamma1_wide": OLD_DEMO + GAMMA_1 + WIDE_KERNEL_GRAD,
    "w24_gamma1_wide": OLD_DEMO + WIDER + GAMMA_1 + WIDE_KERNEL_GRAD,
    "square_wide_4500": OLD_DEMO + SQUARE_ANCHORS + WIDE_KERNEL_GRAD + ["train.total_steps=4500"],
    "f96_square_wide_3800": OLD_DEMO + ["model.fpn_channels=96", "model.head_channels=96"] + SQUARE_ANCHORS
                            + WIDE_KERNEL_GRAD + ["train.total_steps=3800"],
    "w32_square_wide_2800": OLD_DEMO + ["model.width=32"] + SQUARE_ANCHORS + WIDE_KERNEL_GRAD
                            + ["train.total_steps=2800"],
    "deeper_square_4300": OLD_DEMO + ["model.stage_sizes=[1,1,2,2]", "train.total_steps=4300"] + SQUARE_ANCHORS,
    "batch8_square_8000": OLD_DEMO + BATCH_8 + SQUARE_ANCHORS + ["train.total_steps=8000"],
    "batch8_square_9500": OLD_DEMO + BATCH_8 + SQUARE_ANCHORS + ["train.total_steps=9500"],
    "w32_batch8_square_4800": OLD_DEMO + ["model.width=32"] + BATCH_8 + SQUARE_ANCHORS
                              + ["train.total_steps=4800"],
}
# Short screens of the anchors' size and density over the batch-8 recipe (`batch8_square_*`), 3,000 steps
# each: AP at a third of the schedule, to rank the changes before a full run.
SCREEN = OLD_DEMO + BATCH_8 + SQUARE_ANCHORS + ["train.total_steps=3000"]
FOUR_SCALES = [f"anchors.scales={tuple(2 ** (k / 4) for k in range(4))}"]  # 4 per octave, not 3
SIZES = {stride_multiple: [f"anchors.sizes={tuple(stride_multiple * stride for stride in (8.0, 16.0, 32.0))}"]
         for stride_multiple in (1.5, 2.5, 3.0, 3.5)}  # the anchor's side in strides of its level (the demo's: 2)
CANDIDATES.update({
    "screen_square_batch8": SCREEN,
    "screen_size1.5": SCREEN + SIZES[1.5],
    "screen_size2.5": SCREEN + SIZES[2.5],
    "screen_size3": SCREEN + SIZES[3.0],
    "screen_size3.5": SCREEN + SIZES[3.5],
    "screen_scales4": SCREEN + FOUR_SCALES,
    "screen_size2.5_scales4": SCREEN + SIZES[2.5] + FOUR_SCALES,
    "screen_size2.5_scales4_lr3e-3": SCREEN + SIZES[2.5] + FOUR_SCALES + ["optimizer.learning_rate=0.003"],
})
# The later groups start from the demo as it was before its stronger weight decay (WEIGHT_DECAY_1E_4), or
# before that decay reached the norm scales and biases (KERNEL_DECAY_ONLY).
KERNEL_DECAY_ONLY = ["optimizer.decay_norm_and_bias=False"]
# Augmentation at the full schedule, over the demo as it was before its random right-angle turns.
CANDIDATES.update({
    "flips_left_right": WEIGHT_DECAY_1E_4 + FLIPS_LEFT_RIGHT_ONLY,
    "flips_left_right_jitter": WEIGHT_DECAY_1E_4 + FLIPS_LEFT_RIGHT_ONLY + ["data.scale_range=(0.8, 1.25)"],
})
# Over the demo with its right-angle turns: twice its schedule (what more steps would give), narrower
# heads and FPN or batches of 4 with as many more steps as their shorter train step allows, scale jitter,
# a higher learning rate, stronger weight decay. (Ordered overrides: the group count must divide the
# head's channels at each step.)
NARROW_HEADS = ["model.head_norm_groups=16", "model.head_channels=32"]
CANDIDATES.update({
    "demo_18000": WEIGHT_DECAY_1E_4 + ["train.total_steps=18000"],
    "heads32_11250": WEIGHT_DECAY_1E_4 + NARROW_HEADS + ["train.total_steps=11250"],
    "fpn32_heads32_13600": WEIGHT_DECAY_1E_4 + NARROW_HEADS + ["model.fpn_channels=32",
                                                               "train.total_steps=13600"],
    "jitter": WEIGHT_DECAY_1E_4 + ["data.scale_range=(0.8, 1.25)"],
    "lr3e-3": WEIGHT_DECAY_1E_4 + ["optimizer.learning_rate=0.003"],
    "batch4_13500": WEIGHT_DECAY_1E_4 + ["data.batch_size=4", "optimizer.warmup_steps=400",
                                         "train.total_steps=13500"],
    **{f"wd{decay}": [f"optimizer.weight_decay={decay}"] + KERNEL_DECAY_ONLY
       for decay in (0.05, 0.1, 0.2, 0.3, 0.5)},
})
# Over the demo with weight decay 0.2 (on the kernels only, as it was then): other learning rates, a
# longer schedule, stricter or looser matching (ordered overrides: background_iou <= foreground_iou at
# each step), decay on every weight (what the demo now does), and that at a shorter schedule.
CANDIDATES.update({
    "wd0.2_lr1.5e-3": KERNEL_DECAY_ONLY + ["optimizer.learning_rate=0.0015"],
    "wd0.2_lr3e-3": KERNEL_DECAY_ONLY + ["optimizer.learning_rate=0.003"],
    "wd0.2_10000": KERNEL_DECAY_ONLY + ["train.total_steps=10000"],
    "wd0.2_iou0.6": KERNEL_DECAY_ONLY + ["loss.foreground_iou=0.6", "loss.background_iou=0.5"],
    "wd0.2_iou0.4": KERNEL_DECAY_ONLY + ["loss.foreground_iou=0.4", "loss.background_iou=0.3"],
    "wd0.2_decay_all": ["optimizer.decay_norm_and_bias=True"],
    **{f"wd0.2_decay_all_seed{seed}": ["optimizer.decay_norm_and_bias=True", f"train.seed={seed}"]
       for seed in (1, 2)},  # the initializations of the race's seeds 1 and 2
    "wd0.2_decay_all_8500": ["optimizer.decay_norm_and_bias=True", "train.total_steps=8500"],
})


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
