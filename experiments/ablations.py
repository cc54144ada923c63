"""The focal loss paper's ablations (Table 1a-d and the prior initialization), on the demo recipe.

    python -m experiments.ablations alpha            # Table 1a: alpha-balanced CE
    python -m experiments.ablations gamma            # Table 1b: FL over (gamma, alpha)
    python -m experiments.ablations anchors          # Table 1c: scales x aspect ratios
    python -m experiments.ablations ohem             # Table 1d: OHEM (B, ratio) against FL
    python -m experiments.ablations prior            # CE and FL with and without the prior init
    python -m experiments.ablations gamma --seeds 0 1 2 --steps 1500
    python -m experiments.ablations gamma --rows 0 4 5 --steps 1600 --results experiments/results/longer

Every row trains the `demo` recipe at batch 16 with 9 anchors per location
(`ABLATION_BASE`) with the row's overrides, the table's
shared schedule (`--steps`) and each seed (`train.seed` and `data.seed`), as a
normal run in its own work dir (`--workdirs/<table>/<row>/seed_<k>`), so that
checkpoints, resume, metrics and COCO evaluation are the library's. A run
that finished is read back from its work dir, so a killed table resumes where
it stopped. The table (AP, AP50, AP75: mean and spread over seeds, steps,
wall time) goes to `--results/<table>.md`, the numbers to `<table>.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

from experiments import configs

ROOT = Path(__file__).resolve().parent

# The paper's 2 and 3 scales per octave, and its 3 aspect ratios.
_SCALES = {1: (1.0,), 2: (1.0, 2 ** 0.5), 3: (1.0, 2 ** (1 / 3), 2 ** (2 / 3))}
_RATIOS = {1: (1.0,), 3: (0.5, 1.0, 2.0)}


def _anchors(scales: int, ratios: int) -> list[str]:
  return [f"anchors.scales={_SCALES[scales]}", f"anchors.aspect_ratios={_RATIOS[ratios]}"]


def _ohem(batch: int, fraction: float | None) -> list[str]:
  return ["loss.classification='ohem'", f"loss.ohem_batch_size={batch}", f"loss.ohem_positive_fraction={fraction}"]


FOCAL = ["loss.classification='focal'", "loss.gamma=2.0", "loss.alpha=0.25"]
PLAIN_CE = ["loss.gamma=0.0", "loss.alpha=None"]
# The paper's optimizer (SGD, momentum 0.9, lr 0.01 at batch 16), without the demo's gradient clipping: the
# setting in which it reports that CE without the prior diverges. Adam's per-weight step size and clipping
# both bound the first steps' updates, whatever the loss.
PAPER_SGD = ["optimizer.name='sgd'", "optimizer.learning_rate=0.01", "optimizer.momentum=0.9",
             "optimizer.clip_grad_norm=0.0"]

# Every row starts from the demo recipe at the paper's batch of 16 images with its 3 x 3 anchors per
# location (Tables 1a, 1b and 1d use 3 scales x 3 aspect ratios), twice each level's stride in size, and
# left-right flips only, and weight decay 1e-4 on the kernels only. The demo itself trains at batch 8
# (more updates in its ten minutes on a CPU) with 4 square anchors per location of 2.5 strides, random
# right-angle turns of its images and stronger weight decay on every weight (more AP there).
FLIPS_LEFT_RIGHT_ONLY = ["data.vertical_flip_prob=0.0", "data.transpose_prob=0.0"]
WEIGHT_DECAY_1E_4 = ["optimizer.weight_decay=0.0001", "optimizer.decay_norm_and_bias=False"]
ABLATION_BASE = ["data.batch_size=16", "optimizer.warmup_steps=100", "anchors.sizes=(16.0, 32.0, 64.0)",
                 *_anchors(3, 3), *FLIPS_LEFT_RIGHT_ONLY, *WEIGHT_DECAY_1E_4]

# table -> [(row label, overrides of ABLATION_BASE)]
TABLES = {
    "alpha": [(f"CE, alpha={a}", ["loss.gamma=0.0", f"loss.alpha={a}"])
              for a in (0.10, 0.25, 0.50, 0.75, 0.90, 0.99, 0.999)],
    "gamma": [(f"FL, gamma={g}, alpha={a}", [f"loss.gamma={g}", f"loss.alpha={a}"])
              for g, a in ((0.0, 0.75), (0.1, 0.75), (0.2, 0.75), (0.5, 0.50), (1.0, 0.25), (2.0, 0.25),
                           (5.0, 0.25))],
    "anchors": [(f"{s} scale{'s' if s > 1 else ''} x {r} ratio{'s' if r > 1 else ''}", _anchors(s, r))
                for s, r in ((1, 1), (2, 1), (3, 1), (1, 3), (2, 3), (3, 3))],
    "ohem": [(f"OHEM, B={b}, {'no ratio' if f is None else '1:3'}", _ohem(b, f))
             for f in (None, 0.25) for b in (128, 256, 512)] + [("FL, gamma=2, alpha=0.25", FOCAL)],
    "prior": [("CE (no alpha), prior init pi=0.01", PLAIN_CE + ["model.prior_prob=0.01"]),
              ("CE (no alpha), zero bias", PLAIN_CE + ["model.prior_prob=0.5"]),
              ("FL, prior init pi=0.01", FOCAL + ["model.prior_prob=0.01"]),
              ("FL, zero bias", FOCAL + ["model.prior_prob=0.5"]),
              ("CE (no alpha), prior init pi=0.01, SGD without clipping",
               PLAIN_CE + ["model.prior_prob=0.01"] + PAPER_SGD),
              ("CE (no alpha), zero bias, SGD without clipping", PLAIN_CE + ["model.prior_prob=0.5"] + PAPER_SGD)],
}
METRICS = ("AP", "AP50", "AP75")


def row_dir(workdirs: Path, table: str, row: int, seed: int) -> Path:
  return workdirs / table / f"row_{row}" / f"seed_{seed}"


def row_config(table: str, row: int, seed: int, steps: int):
  """`ABLATION_BASE` with the row's overrides, the shared schedule and the seed."""
  from focal_jax.engine.config import apply_overrides  # pylint: disable=g-import-not-at-top

  _, overrides = TABLES[table][row]
  schedule = [f"train.total_steps={steps}", f"train.checkpoint_every={max(steps // 4, 1)}",
              f"train.log_every={max(steps // 10, 1)}", f"train.seed={seed}", f"data.seed={seed}"]
  return apply_overrides(configs.get_config("demo"), ABLATION_BASE + overrides + schedule)


def _check_workdir(workdir: Path, config) -> None:
  """Refuses a run's work dir that holds a run of another config (another table, row, schedule or seed)."""
  from focal_jax.engine.config import differing_fields  # pylint: disable=g-import-not-at-top
  from focal_jax.engine.workdir import Workdir  # pylint: disable=g-import-not-at-top

  if not Workdir(workdir).is_training_workdir():
    return
  sections = ("model", "anchors", "loss", "optimizer", "data", "postprocess", "train")
  differing = [name for name in differing_fields(config, Workdir(workdir).read_config(), sections)
               if name != "data.label_map"]
  if differing:
    raise ValueError(f"{workdir} holds a run of another config ({', '.join(differing)}); give another "
                     f"--workdirs folder. Nothing was changed.")


def _check_results_dir(results: Path, table: str) -> None:
  """Refuses a results file of the same name that another table wrote."""
  path = results / f"{table}.json"
  if path.exists() and json.loads(path.read_text()).get("table") != table:
    raise ValueError(f"{path} holds the results of another table; give another --results folder.")


def run_table(table: str, seeds: list[int], steps: int, workdirs: Path, results: Path,
              rows: list[int] | None = None) -> dict:
  """Trains (or reads back) every row (or the given `rows`) and seed of `table`; writes and returns the results."""
  if table not in TABLES:
    raise ValueError(f"unknown table {table!r}; choose one of {', '.join(TABLES)}.")
  if not seeds or steps < 1:
    raise ValueError("give at least one seed and a positive number of steps.")
  rows = list(range(len(TABLES[table]))) if rows is None else rows
  if not rows or any(not 0 <= row < len(TABLES[table]) for row in rows):
    raise ValueError(f"table {table} has rows 0-{len(TABLES[table]) - 1}; got {rows}.")
  configs_by_run = {(row, seed): row_config(table, row, seed, steps)  # every config checked before any work
                    for row in rows for seed in seeds}
  for (row, seed), config in configs_by_run.items():
    _check_workdir(row_dir(workdirs, table, row, seed), config)
  results.mkdir(parents=True, exist_ok=True)
  _check_results_dir(results, table)
  runs = {(row, seed): _train_or_read_back(config, row_dir(workdirs, table, row, seed), steps,
                                           f"{table}, row {row + 1}/{len(TABLES[table])} ({TABLES[table][row][0]}), "
                                           f"seed {seed}")
          for (row, seed), config in configs_by_run.items()}
  summary = summarize(table, rows, seeds, steps, runs)
  (results / f"{table}.json").write_text(json.dumps(summary, indent=2) + "\n")
  (results / f"{table}.md").write_text(markdown(summary))
  return summary


def _train_or_read_back(config, workdir: Path, steps: int, description: str) -> dict:
  """One run's COCO numbers and wall time, read back if it ended before, else trained now.

  A run whose loss became NaN or infinite has diverged: its metrics count as
  0 and `diverged_at` gives the step.
  """
  from focal_jax.engine.loop import NonFiniteLossError, train_and_evaluate  # pylint: disable=g-import-not-at-top

  eval_file, diverged_file = workdir / f"eval_{steps}.json", workdir / "ablation_diverged.json"
  timing_file = workdir / "ablation_wall_time.json"
  if not eval_file.exists() and not diverged_file.exists():
    log = logging.getLogger("focal_jax")
    log.info("%s: training in %s", description, workdir)
    started = time.perf_counter()
    try:
      train_and_evaluate(config, workdir)
    except NonFiniteLossError as error:
      log.warning("%s diverged: %s", description, error)
      diverged_file.write_text(json.dumps({"step": error.step}))
    spent = json.loads(timing_file.read_text())["seconds"] if timing_file.exists() else 0.0
    timing_file.write_text(json.dumps({"seconds": spent + time.perf_counter() - started}))
  wall_seconds = json.loads(timing_file.read_text())["seconds"]
  if diverged_file.exists():
    return {**dict.fromkeys(METRICS, 0.0), "diverged_at": json.loads(diverged_file.read_text())["step"],
            "wall_seconds": wall_seconds}
  return {**json.loads(eval_file.read_text()), "wall_seconds": wall_seconds}


def summarize(table: str, rows: list[int], seeds: list[int], steps: int, runs: dict) -> dict:
  summary_rows = []
  for row in rows:
    label, overrides = TABLES[table][row]
    per_seed = [runs[(row, seed)] for seed in seeds]
    stats = {}
    for metric in METRICS:
      values = [run[metric] for run in per_seed]
      stats[metric] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                       "std": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}
    diverged = {seed: run["diverged_at"] for seed, run in zip(seeds, per_seed) if "diverged_at" in run}
    summary_rows.append({"row": label, "overrides": overrides, **stats, "diverged_at": diverged,
                         "wall_seconds": statistics.fmean(run["wall_seconds"] for run in per_seed)})
  selected = "" if rows == list(range(len(TABLES[table]))) else f" --rows {' '.join(map(str, rows))}"
  return {"table": table, "recipe": "demo", "steps": steps, "seeds": seeds,
          "command": f"python -m experiments.ablations {table}{selected} --seeds {' '.join(map(str, seeds))} "
                     f"--steps {steps}",
          "rows": summary_rows}


def markdown(summary: dict) -> str:
  lines = [f"# Ablation `{summary['table']}` on the demo recipe",
           "",
           f"`{summary['command']}`: {summary['steps']} steps per run, seeds {summary['seeds']}; AP as mean "
           f"+- standard deviation over the seeds (min-max in the JSON); a run whose loss became NaN or "
           f"infinite diverged and counts as 0.",
           "",
           "| row | AP | AP50 | AP75 | diverged (seed: step) | steps | wall time per run (s) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for row in summary["rows"]:
    cells = [f"{row[m]['mean']:.3f} +- {row[m]['std']:.3f}" for m in METRICS]
    diverged = ", ".join(f"{seed}: {step}" for seed, step in row["diverged_at"].items()) or "-"
    lines.append(f"| {row['row']} | {' | '.join(cells)} | {diverged} | {summary['steps']} | "
                 f"{row['wall_seconds']:.0f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.ablations", description=__doc__.split("\n\n")[0])
  parser.add_argument("table", help=f"one of {', '.join(TABLES)}")
  parser.add_argument("--rows", type=int, nargs="+", help="only these rows of the table, counted from 0 (default: all)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of every row (default: 0 1)")
  parser.add_argument("--steps", type=int, default=800, help="steps of every run (default: 800)")
  parser.add_argument("--workdirs", default="runs/ablations", help="where the runs' work dirs go")
  parser.add_argument("--results", default=str(ROOT / "results"), help="where the tables go")
  parser.add_argument("--compilation_cache", metavar="DIR",
                      help="as for experiments.coco_retinanet: the rows' seeds share compiled programs")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
  args = parser.parse_args(argv)
  from focal_jax._cli import run_command, set_up_training_process  # pylint: disable=g-import-not-at-top

  set_up_training_process(args.compilation_cache)

  def run() -> int:
    summary = run_table(args.table, args.seeds, args.steps, Path(args.workdirs), Path(args.results),
                        args.rows)
    print(markdown(summary))
    return 0

  return run_command(run, debug=args.debug,
                     interrupted="interrupted: finished runs are kept; run the same command to go on.")


if __name__ == "__main__":
  sys.exit(main())
