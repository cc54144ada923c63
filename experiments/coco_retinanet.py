"""Train and evaluate RetinaNet: `python -m experiments.coco_retinanet`.

With no arguments it trains the `demo` config on the embedded synthetic
dataset (built on first use) and prints the COCO table. Any config field can be
overridden as `--section.field=value`, e.g.

    python -m experiments.coco_retinanet --config r50_1x --workdir runs/r50 \\
        --data.data_dir=~/tensorflow_datasets --train.total_steps=1000

Re-running with the same work dir resumes from its latest checkpoint.

Several processes (TPU pod slice, GPU nodes) run the same command, each with
`--distributed` where JAX detects the cluster (TPU pod slices, SLURM, Open
MPI), or with `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` otherwise; see "Multi-host training" in the README.
"""

from __future__ import annotations

import argparse
import sys

from experiments import configs


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m experiments.coco_retinanet", description=__doc__.split("\n\n")[0],
      epilog="Other arguments: --section.field=value overrides of the config (for example "
             "--train.total_steps=100 --optimizer.learning_rate=0.02).")
  parser.add_argument("--config", default="demo", choices=configs.NAMES, help="the recipe (default: demo)")
  parser.add_argument("--workdir", default=None,
                      help="checkpoints, metrics and config of the run (default: runs/<config>)")
  parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
  parser.add_argument("--debug", action="store_true", help="show full tracebacks")
  parser.add_argument("--compilation_cache", metavar="DIR",
                      help="where compiled programs are kept, so that a rerun or a resumed run starts without "
                           "compiling (default: $JAX_COMPILATION_CACHE_DIR, else "
                           "~/.cache/focal_jax/jax_compilation_cache; '' turns it off)")
  multi = parser.add_argument_group(
      "multi-process runs", "every process runs the same command; batch sizes in the config are global")
  multi.add_argument("--distributed", action="store_true",
                     help="join a multi-process run that JAX detects (TPU pod slice, SLURM, Open MPI)")
  multi.add_argument("--coordinator_address", metavar="HOST:PORT",
                     help="process 0's host and a free port (with --num_processes and --process_id)")
  multi.add_argument("--num_processes", type=int, metavar="N", help="processes in the run")
  multi.add_argument("--process_id", type=int, metavar="I", help="this process's id, 0 .. N - 1")
  multi.add_argument("--distributed_timeout", type=int, default=300, metavar="SECONDS",
                     help="how long to wait for the coordinator and the other processes (default 300)")
  args, overrides = parser.parse_known_args(argv)
  for item in overrides:
    if not item.startswith("--") or "=" not in item:
      parser.error(f"unrecognized argument {item!r}; overrides look like --section.field=value")
  from focal_jax.engine.distributed import check_process_arguments
  try:
    check_process_arguments(args.coordinator_address, args.num_processes, args.process_id)
  except ValueError as error:
    parser.error(str(error))
  return args, [item[2:] for item in overrides]


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from focal_jax._cli import run_command, set_up_training_process

  set_up_training_process(args.compilation_cache)
  from focal_jax.engine import distributed
  from focal_jax.engine.config import apply_overrides, to_json
  from focal_jax.engine.loop import train_and_evaluate

  def run() -> int:
    config = apply_overrides(configs.get_config(args.config), overrides)
    if args.print_config:
      print(to_json(config))
      return 0
    if args.distributed or args.coordinator_address:
      distributed.initialize(args.coordinator_address, args.num_processes, args.process_id,
                             timeout_s=args.distributed_timeout)
    train_and_evaluate(config, args.workdir or f"runs/{args.config}")
    return 0

  return run_command(run, debug=args.debug,
                     interrupted="interrupted: the last checkpoint is kept; run the same command to resume.")


if __name__ == "__main__":
  sys.exit(main())
