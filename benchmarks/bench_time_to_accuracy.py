"""Time to accuracy: the demo trained for a wall-clock budget, focal_jax vs torchvision.

Both sides train the `demo` configuration (`experiments/configs/demo.py`) on
the same synthetic_shapes training batches (our tf.data pipeline, the same
order on both sides) and are scored on the same 500 validation images with the
same pycocotools code (`focal_jax.engine.evaluation.coco_evaluate`):

* ours: the library's `create_train_state` and `compile_train_step` in the
  loop below, evaluated with `focal_jax.engine.loop.evaluate`;
* torchvision: `torchvision.models.detection.RetinaNet` of the same size,
  built in `torch_demo_model.py` (same trunk, FPN, heads, anchors, matching,
  GIoU and focal losses with the demo's batch-wide normalizer, thresholds; the
  same parameter count), trained with `torch.optim.AdamW` (no decay on norms
  and biases), the same learning rate at every step (our schedule function),
  gradient-norm clipping and batch, on `--threads` threads.
  `--loss_normalizer image` gives both sides torchvision's stock per-image
  normalizer instead.

Each side runs in its own process, one after the other. Its clock starts just
before the first training step and so counts the first step's compilation
(JAX) or warm-up (torch) and all time spent waiting for input batches; it
stops at each budget (default 5 and 10 minutes) for an evaluation, which is
not counted. Both follow the demo's schedule (its `train.total_steps`): a side that is slower
is earlier in its schedule at a budget, and a side that completes the
schedule before a budget stops there (its row then shows the steps and time
of completion). Prints steps, images/s (steps x batch / counted seconds) and
COCO AP / AP50 at each budget, writes them as JSON (`--out`, with the loss
curve and the load average) and as markdown rows beside it (`.md`).

Run from the repository root in an environment with focal_jax, torch==2.14.1
and torchvision==0.29.1:

  python benchmarks/bench_time_to_accuracy.py                       # both sides, 300 and 600 s
  python benchmarks/bench_time_to_accuracy.py --budgets 30,60       # a short check
  python benchmarks/bench_time_to_accuracy.py --only torchvision --threads 4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from focal_jax import data as input_pipeline
from focal_jax.ops.anchors import generate_anchors
from focal_jax.engine.mesh import global_batch, make_mesh, replicated
from focal_jax.engine.config import model_from_config
from focal_jax.engine.train_step import compile_train_step, create_train_state
from focal_jax.engine.loop import evaluate, per_process_data_config
from timing import cpu_model

REPO_ROOT = Path(__file__).resolve().parent.parent
SIDES = ("ours", "torchvision")


class Stopwatch:
  """Wall-clock seconds accumulated while running; `pause` and `resume` leave gaps out."""

  def __init__(self):
    self._total = 0.0
    self._started = time.perf_counter()

  def elapsed(self) -> float:
    running = time.perf_counter() - self._started if self._started is not None else 0.0
    return self._total + running

  def pause(self) -> float:
    self._total = self.elapsed()
    self._started = None
    return self._total

  def resume(self) -> None:
    self._started = time.perf_counter()


def demo_config(data_dir: str | None, loss_normalizer: str | None, seed: int | None = None):
  """The `demo` experiment config, with `data_dir`, `loss_normalizer` and the initialization `seed` if given."""
  sys.path.insert(0, str(REPO_ROOT))  # the `experiments` package (not installed) holds the recipes
  from experiments.configs import demo  # pylint: disable=g-import-not-at-top

  config = demo.get_config()
  if data_dir:
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, data_dir=data_dir))
  if loss_normalizer:
    config = dataclasses.replace(config, loss=dataclasses.replace(config.loss, normalizer=loss_normalizer))
  if seed is not None:
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
  return config


def train_with_budgets(side, budgets: list[float], total_steps: int, batch_size: int,
                       log_every: int) -> dict:
  """Runs `side.step()` until each budget (or the end of the schedule) and `side.evaluate()` there.

  `side.step()` starts one training step and returns its loss as anything
  that `float()` turns into a number once the step is done (a JAX array may
  still be computing). Each loss is read after the next step has started: at
  most one step is in flight when the clock is read, and the one in flight at
  a budget is finished (and counted) before the clock stops.
  """
  clock = Stopwatch()
  losses, rows = [], []
  steps, pending, first_step_seconds, finished_at, evaluation = 0, None, None, None, None

  def settle():
    nonlocal pending
    if pending is None:
      return
    losses.append(float(pending))
    pending = None
    if len(losses) % log_every == 0:
      print(f"  [{side.name}] step {len(losses)}  {clock.elapsed():6.1f} s  "
            f"loss {sum(losses[-log_every:]) / log_every:.4f}  "
            f"{len(losses) * batch_size / clock.elapsed():.1f} img/s", flush=True)

  for budget in budgets:
    while steps < total_steps and clock.elapsed() < budget:
      loss = side.step()
      settle()
      pending, steps = loss, steps + 1
      if steps == 1:  # compilation (JAX) or warm-up (torch) included
        settle()
        first_step_seconds = clock.elapsed()
    settle()
    seconds = clock.pause()
    if steps == total_steps and finished_at is None:
      finished_at = seconds
    if evaluation is None or evaluation["steps"] != steps:
      started = time.perf_counter()
      metrics = side.evaluate()
      evaluation = {"steps": steps, "AP": metrics["AP"], "AP50": metrics["AP50"],
                    "eval_seconds": time.perf_counter() - started}
    train_seconds = seconds if finished_at is None else finished_at
    rows.append({"budget_s": budget, "train_seconds": round(train_seconds, 2), "steps": steps,
                 "images_per_second": round(steps * batch_size / train_seconds, 2),
                 "AP": round(evaluation["AP"], 4), "AP50": round(evaluation["AP50"], 4),
                 "eval_seconds": round(evaluation["eval_seconds"], 1), "schedule_done": steps == total_steps,
                 "load_average_1min": round(os.getloadavg()[0], 2)})
    print(f"[{side.name}] budget {budget:.0f} s: {steps} steps in {train_seconds:.1f} s "
          f"({rows[-1]['images_per_second']:.1f} img/s), AP {evaluation['AP']:.3f}, "
          f"AP50 {evaluation['AP50']:.3f} (evaluation {evaluation['eval_seconds']:.0f} s, not counted)",
          flush=True)
    clock.resume()
  curve = []  # [last step, mean loss] of every `log_every` steps
  for start in range(0, len(losses), log_every):
    chunk = losses[start:start + log_every]
    curve.append([start + len(chunk), round(sum(chunk) / len(chunk), 4)])
  return {"first_step_seconds": round(first_step_seconds, 2), "budgets": rows, "loss_curve": curve}


class OursSide:
  """The demo trained with focal_jax's jit-compiled train step (data parallel over the local devices)."""

  name = "ours"

  def __init__(self, config):
    self._config = config
    self._mesh = make_mesh()
    self._model = model_from_config(config)
    self._state, self._tx = create_train_state(self._model, config, jax.random.key(config.train.seed), self._mesh)
    anchors = generate_anchors(config.data.padded_size, config.anchors)
    self._step_fn = compile_train_step(self._model, self._tx, anchors, config.loss, self._mesh)
    self._data = input_pipeline.build_train_dataset(per_process_data_config(config, self._mesh))
    self._ground_truth = input_pipeline.coco_ground_truth(config.data)
    self.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self._state.params))
    devices = jax.devices()
    self.description = (f"focal_jax, jax {jax.__version__} on {len(devices)} x {devices[0].platform} "
                        f"({devices[0].device_kind})")

  def step(self) -> jax.Array:
    """Starts one optimizer step on the next batch; returns its loss (still computing)."""
    self._state, metrics = self._step_fn(self._state, global_batch(next(self._data), self._mesh))
    return metrics["loss"]

  @property
  def variables(self) -> dict:
    """The model's current `params` and `batch_stats`."""
    return self._state.variables

  def start_from(self, variables: dict) -> None:
    """Restarts training from `variables` (`params`, `batch_stats`) with a fresh optimizer state."""
    state = self._state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    self._state = jax.device_put(state.replace(opt_state=self._tx.init(state.params)), replicated(self._mesh))

  def evaluate(self) -> dict[str, float]:
    return evaluate(self._config, self._model, self._state.variables, self._mesh, self._ground_truth)


def run_side(args) -> None:
  """The child process of one side: builds it, trains with the budgets, writes its JSON."""
  config = demo_config(args.data_dir, args.loss_normalizer, args.seed)
  if args.side == "ours":
    side = OursSide(config)
  else:
    # torch is imported by the torchvision process only.
    from torch_demo_model import TorchvisionSide  # pylint: disable=g-import-not-at-top

    side = TorchvisionSide(config, args.threads, args.torch_layout)
  print(f"[{side.name}] {side.description}; {side.num_params:,} parameters", flush=True)
  result = {"side": side.name, "description": side.description, "num_params": side.num_params,
            **train_with_budgets(side, args.budgets, config.train.total_steps, config.data.batch_size,
                                 args.log_every)}
  Path(args.side_out).write_text(json.dumps(result, indent=2))


def markdown_rows(results: list[dict]) -> str:
  """Markdown table rows of the results (train s: counted seconds, first step's included)."""
  lines = ["| side | budget | steps | train s (first step) | images/s | AP | AP50 |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for result in results:
    for row in result["budgets"]:
      steps = f"{row['steps']}" + (" (done)" if row["schedule_done"] else "")
      lines.append(f"| {result['side']} | {row['budget_s']:.0f} s | {steps} | {row['train_seconds']:.0f} "
                   f"({result['first_step_seconds']:.1f}) | {row['images_per_second']:.1f} | "
                   f"{row['AP']:.3f} | {row['AP50']:.3f} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--budgets", default="300,600",
                      help="training seconds (comma separated) at which to pause and evaluate")
  parser.add_argument("--only", choices=SIDES, help="run one side only")
  parser.add_argument("--data_dir", help="TFDS data dir (synthetic_shapes is built there if missing)")
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--torch_layout", choices=("channels_last", "contiguous"), default="channels_last")
  parser.add_argument("--loss_normalizer", choices=("batch", "image"),
                      help="both sides' loss normalizer (default: the demo's, batch; image is torchvision's "
                           "stock loss)")
  parser.add_argument("--seed", type=int,
                      help="both sides' initialization seed (default: the demo's train.seed); the batches stay the same")
  parser.add_argument("--log_every", type=int, default=100, help="steps per printed loss")
  parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "time_to_accuracy.json"))
  parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
  parser.add_argument("--side_out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  args.budgets = sorted(float(b) for b in args.budgets.split(","))
  if args.side:
    run_side(args)
    return

  config = demo_config(args.data_dir, args.loss_normalizer, args.seed)
  input_pipeline.require_prepared(config.data)  # built once here, outside both clocks
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    for side in [args.only] if args.only else SIDES:
      side_out = os.path.join(tmp, f"{side}.json")
      command = [sys.executable, __file__, "--side", side, "--side_out", side_out,
                 "--budgets", ",".join(f"{b:g}" for b in args.budgets), "--threads", str(args.threads),
                 "--torch_layout", args.torch_layout, "--log_every", str(args.log_every)]
      if args.data_dir:
        command += ["--data_dir", args.data_dir]
      if args.loss_normalizer:
        command += ["--loss_normalizer", args.loss_normalizer]
      if args.seed is not None:
        command += ["--seed", str(args.seed)]
      print(f"=== {side}", flush=True)
      subprocess.run(command, check=True)
      results.append(json.loads(Path(side_out).read_text()))

  report = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, "
                       f"python {platform.python_version()}",
            "load_average": os.getloadavg(), "command": " ".join(sys.argv), "config": "demo",
            "loss_normalizer": config.loss.normalizer, "seed": config.train.seed,
            "clock": "from the first training step (compilation and input waits included); "
                     "evaluations excluded",
            "sides": results}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))
  rows = markdown_rows(results)
  out.with_suffix(".md").write_text(rows + "\n")
  for result in results:
    print(f"{result['side']}: {result['description']}; {result['num_params']:,} parameters; "
          f"first step {result['first_step_seconds']:.1f} s")
  print(rows)
  print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
  main()
