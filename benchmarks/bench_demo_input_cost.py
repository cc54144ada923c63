"""What the input pipeline costs the demo's training: steps with its batches against the same steps from memory.

    python benchmarks/bench_demo_input_cost.py --data_dir /tmp/tfds [--steps 300] [--repeats 3]
    python benchmarks/bench_demo_input_cost.py --data_dir /tmp/tfds --steps 800 --repeats 2  # epoch ends
    python benchmarks/bench_demo_input_cost.py --data_dir /tmp/tfds --steps 200 --repeats 12 --compare_train_nice
    python benchmarks/bench_demo_input_cost.py --data_dir /tmp/tfds --steps 200 --repeats 12 \
        --compare_data_dir /tmp/tfds_built_by_an_older_version

The demo recipe's compiled train step (`create_train_state`,
`compile_train_step`, as `train_and_evaluate` runs them) takes `--steps`
steps in a row twice per repetition, in turn: once with each batch drawn
from the training input pipeline as the loop draws it (tf.data working on the
same CPU cores as the step), once cycling through batches drawn before the
clock started (no input work); both place each batch on the devices as the
loop does. On a CPU the difference is the pipeline's share of the loop's
time: the cores it takes from the step. The loss is read
once at the end of each block, so nothing waits for the host in between.
Prints both rates (median images/s), the time the loop waited for batches
(in all, and the three longest waits: an epoch's end, where the pipeline has
to open the next epoch, shows there when `--steps` crosses one; the demo has
750 steps per epoch) and the pipeline's share, with the machine.
`--compare_train_nice` adds, in turn with the others, blocks from a second
pipeline whose threads run at the process's priority (`data.train_nice=0`);
`--compare_data_dir` adds blocks from a second pipeline over another build of
the dataset (for example one that an earlier version of `synthetic_shapes`
wrote), and checks first that its batches are the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path

import jax

from timing import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `experiments` package holds the recipes

from experiments import configs  # noqa: E402  pylint: disable=g-import-not-at-top
from focal_jax import data as input_pipeline  # noqa: E402
from focal_jax.engine.config import apply_overrides, model_from_config  # noqa: E402
from focal_jax.engine.loop import per_process_data_config  # noqa: E402
from focal_jax.engine.mesh import global_batch, make_mesh  # noqa: E402
from focal_jax.engine.train_step import compile_train_step, create_train_state  # noqa: E402
from focal_jax.ops.anchors import generate_anchors  # noqa: E402

IN_MEMORY_BATCHES = 50


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_dir", required=True, help="a data dir that holds (or will hold) synthetic_shapes")
  parser.add_argument("--steps", type=int, default=300, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=3, help="blocks of each kind, in turn")
  parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE")
  parser.add_argument("--compare_train_nice", action="store_true",
                      help="also time a pipeline whose threads are not made nicer (data.train_nice=0)")
  parser.add_argument("--compare_data_dir", help="also time a pipeline over the synthetic_shapes build in this "
                                                 "data dir")
  args = parser.parse_args()
  if args.compare_train_nice and args.compare_data_dir:
    parser.error("compare one thing at a time: --compare_train_nice or --compare_data_dir")

  config = apply_overrides(configs.get_config("demo"), [f"data.data_dir={args.data_dir}", *args.override])
  mesh = make_mesh()
  model = model_from_config(config)
  state, tx = create_train_state(model, config, jax.random.key(config.train.seed), mesh)
  step = compile_train_step(model, tx, generate_anchors(config.data.padded_size, config.anchors), config.loss, mesh)
  data_config = per_process_data_config(config, mesh)
  pipelines = {f"input pipeline (train_nice {data_config.train_nice})":
               input_pipeline.build_train_dataset(data_config)}
  if args.compare_train_nice:
    pipelines["input pipeline (train_nice 0)"] = input_pipeline.build_train_dataset(
        dataclasses.replace(data_config, train_nice=0))
  if args.compare_data_dir:
    pipelines[f"input pipeline ({args.compare_data_dir})"] = input_pipeline.build_train_dataset(
        dataclasses.replace(data_config, data_dir=args.compare_data_dir))
  reference = next(iter(pipelines.values()))
  in_memory = [next(reference) for _ in range(IN_MEMORY_BATCHES)]
  for name, pipeline in list(pipelines.items())[1:]:
    if not all(_same_batch(a, next(pipeline)) for a in in_memory):
      sys.exit(f"the {name} gives other batches than the first; its timing would not compare like with like")
  sources = {**pipelines, "in memory": itertools.cycle(in_memory)}

  waits = {name: [] for name in sources}  # seconds the loop waited for each batch (`next`)

  def block(name):
    nonlocal state
    start = time.perf_counter()
    for _ in range(args.steps):
      asked = time.perf_counter()
      batch = next(sources[name])
      waits[name].append(time.perf_counter() - asked)
      state, metrics = step(state, global_batch(batch, mesh))
    jax.block_until_ready(metrics["loss"])
    return args.steps * config.data.batch_size / (time.perf_counter() - start)

  for name in sources:  # compilation and warm-up
    block(name)
    waits[name].clear()
  rates = {name: [] for name in sources}
  for _ in range(args.repeats):
    for name in sources:
      rates[name].append(block(name))
  for pipeline in pipelines.values():
    pipeline.close()  # stops the next epoch's opening in the background
  medians = {name: statistics.median(values) for name, values in rates.items()}
  print(cpu_model())
  for name, values in rates.items():
    longest = sorted(waits[name], reverse=True)[:3]
    print(f"{name}: {medians[name]:.1f} img/s (blocks: {', '.join(f'{v:.1f}' for v in values)}); waited "
          f"{sum(waits[name]):.1f} s for batches, longest {', '.join(f'{w:.2f}' for w in longest)} s")
  for name in pipelines:
    share = 1 - medians[name] / medians["in memory"]
    print(f"the {name} takes {100 * share:.0f}% of the training loop's time "
          f"({config.data.dataset}, batch {config.data.batch_size})")
  if len(pipelines) == 2:
    (first, first_rates), (second, second_rates) = [(name, rates[name]) for name in pipelines]
    ahead = sum(a > b for a, b in zip(first_rates, second_rates))
    print(f"{first} against {second}: {medians[first] / medians[second]:.3f}x, "
          f"ahead in {ahead} of {len(first_rates)} turns")


def _same_batch(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and (a[k] == b[k]).all() for k in a)


if __name__ == "__main__":
  main()
