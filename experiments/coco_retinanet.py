"""Train and evaluate RetinaNet: `python -m experiments.coco_retinanet`.

With no arguments it trains the `demo` config on the embedded synthetic
dataset (built on first use) and prints the COCO table. Any config field can be
overridden as `--section.field=value`, e.g.

    python -m experiments.coco_retinanet --config r50_1x --workdir runs/r50 \\
        --data.data_dir=~/tensorflow_datasets --train.total_steps=1000

Re-running with the same work dir resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import logging
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
  args, overrides = parser.parse_known_args(argv)
  for item in overrides:
    if not item.startswith("--") or "=" not in item:
      parser.error(f"unrecognized argument {item!r}; overrides look like --section.field=value")
  return args, [item[2:] for item in overrides]


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
  for noisy in ("absl", "tensorflow", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.ERROR)

  from focal_jax.config import apply_overrides, to_json
  from focal_jax.data import DatasetNotFoundError
  from focal_jax.train_loop import IncompatibleWorkdirError, NonFiniteLossError, train_and_evaluate

  try:
    config = apply_overrides(configs.get_config(args.config), overrides)
    if args.print_config:
      print(to_json(config))
      return 0
    train_and_evaluate(config, args.workdir or f"runs/{args.config}")
  except (ValueError, DatasetNotFoundError, IncompatibleWorkdirError, NonFiniteLossError) as error:
    if args.debug:
      raise
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
