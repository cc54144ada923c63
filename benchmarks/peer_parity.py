"""Same initial weights, same batches: how far apart do our demo training and torchvision's drift?

Trains the demo (`experiments/configs/demo.py`) three times in lockstep, as
`bench_time_to_accuracy.py` trains it, on the same batches:

* torchvision: the peer of `torch_demo_model.py`, from its own initial weights;
* ours: focal_jax's train step from the peer's initial weights (converted by
  `torch_demo_model.focal_jax_variables`);
* twin: ours again from the same weights, each multiplied by `1 + e * N(0, 1)`
  (`--perturbation`, 1e-7 by default: float32 rounding). It shows how fast
  two runs of the same code part, the baseline for ours against torchvision.

Prints at the steps of `--report` the three losses and the relative
differences of all parameters, `||ours - torchvision|| / ||torchvision||` and
`||twin - ours|| / ||ours||`; at the end, each run's COCO AP and the AP of
torchvision's final weights scored by our evaluation (both evaluation paths on
the same weights). The per-tensor equality of the loss and gradients is a test
(`tests/test_torchvision_peer.py`).

Run from the repository root with focal_jax, torch==2.14.1 and torchvision==0.29.1:

  python benchmarks/peer_parity.py                  # 300 steps (about 5 minutes on 2 cores)
  python benchmarks/peer_parity.py --steps 3000     # the whole demo schedule
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from bench_time_to_accuracy import OursSide, demo_config
from torch_demo_model import TorchvisionSide, focal_jax_variables


def relative_difference(params, reference) -> float:
  """`||params - reference|| / ||reference||` over all leaves, in float64."""
  pairs = [(np.asarray(a, np.float64), np.asarray(b, np.float64))
           for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference))]
  difference = sum(float(np.sum((a - b) ** 2)) for a, b in pairs)
  return (difference / sum(float(np.sum(b**2)) for _, b in pairs)) ** 0.5


def perturbed(params, scale: float, seed: int = 0):
  """Each leaf multiplied elementwise by `1 + scale * N(0, 1)`."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x * (1 + scale * jax.random.normal(key, x.shape)) for x, key in zip(leaves, keys)])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--report", default="1,2,5,10,25,50,100,200,300,500,1000,2000,3000",
                      help="steps after which to print losses and parameter differences")
  parser.add_argument("--perturbation", type=float, default=1e-7, help="the twin's relative weight noise")
  parser.add_argument("--seed", type=int, help="the peer's initialization seed (default: the demo's)")
  parser.add_argument("--data_dir", help="TFDS data dir (default: TFDS's)")
  parser.add_argument("--threads", type=int, default=2, help="torch threads")
  args = parser.parse_args()
  if args.steps < 1 or args.perturbation < 0:
    parser.error("--steps must be positive and --perturbation non-negative")
  report = {int(step) for step in args.report.split(",")} | {args.steps}

  config = demo_config(args.data_dir, None, args.seed)
  peer = TorchvisionSide(config, args.threads, "channels_last")
  ours, twin = OursSide(config), OursSide(config)
  template = ours.variables
  start = focal_jax_variables(peer.model.state_dict(), template)
  ours.start_from(start)
  twin.start_from({"params": perturbed(start["params"], args.perturbation),
                   "batch_stats": start["batch_stats"]})
  print(f"{ours.num_params:,} parameters; the twin's weights perturbed by {args.perturbation:g} "
        f"(relative difference {relative_difference(twin.variables['params'], start['params']):.2e})")

  def peer_params():
    return focal_jax_variables(dict(peer.model.named_parameters()), {"params": template["params"]})["params"]

  print("| step | loss: ours | torchvision | twin | ours vs torchvision | twin vs ours |")
  print("| --- | --- | --- | --- | --- | --- |")
  for step in range(1, args.steps + 1):
    losses = [float(side.step()) for side in (ours, peer, twin)]
    if step in report:
      ours_params = ours.variables["params"]
      print(f"| {step} | {losses[0]:.6f} | {losses[1]:.6f} | {losses[2]:.6f} | "
            f"{relative_difference(ours_params, peer_params()):.2e} | "
            f"{relative_difference(twin.variables['params'], ours_params):.2e} |", flush=True)

  results = {"ours": ours.evaluate(), "torchvision": peer.evaluate(), "twin": twin.evaluate()}
  ours.start_from(focal_jax_variables(peer.model.state_dict(), template))
  results["torchvision's weights, our evaluation"] = ours.evaluate()
  for name, metrics in results.items():
    print(f"{name}: AP {metrics['AP']:.4f}, AP50 {metrics['AP50']:.4f}, AP75 {metrics['AP75']:.4f}")


if __name__ == "__main__":
  main()
