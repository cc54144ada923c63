"""How close the R50-FPN train step and inference come to this CPU's matmul rate.

    python benchmarks/bench_flop_rate.py               # ours (and KerasHub where installed)
    python benchmarks/bench_flop_rate.py --repeats 7

The suite's ratios say who is faster; this says how much faster anyone can
be. The work of one call is XLA's own count (`cost_analysis()["flops"]` of
the compiled function: two per multiply-add, convolutions included), the
machine's rate is the best of a few square float32 matmuls through XLA, and
`work / rate` is the time a call would take if every FLOP ran at that rate.
A peer's time divided by that floor is the most an implementation of the
same model can be faster than the peer on this CPU in float32, as long as
it does the multiply-adds that XLA counts (direct or matmul convolutions)
no faster than XLA's matmuls. A Winograd or FFT convolution does fewer
(with other rounding), and a better matmul kernel would raise the rate;
either moves the bound. Ours computes the wide 3x3 convolutions by
Winograd's F(4x4, 3x3) on a CPU (`CpuRewrites.winograd`), so XLA counts
about half the FLOPs of the direct convolutions for our calls; the floor
printed is for our count.

Same models, inputs and calls as `suite.py` (batch 2 at 512x512, 91 classes,
its `--override`s); each contender is built, warmed up and timed in turn.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # suite.py and timing.py beside this file
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the `experiments` package (not installed)
import suite  # noqa: E402
from timing import cpu_model, interleaved_median_seconds  # noqa: E402


def matmul_rate(sizes=(1024, 2048, 3072), repeats: int = 5) -> float:
  """Best float32 FLOP/s of square `n x n @ n x n` matmuls through XLA on the default device."""
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    seconds = interleaved_median_seconds({"matmul": lambda: matmul(a, b)}, repeats=repeats)["matmul"]
    best = max(best, 2 * n ** 3 / seconds)
  return best


def flops(jitted, args) -> float:
  """XLA's FLOP count of one call of `jitted(*args)`."""
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):  # older jax: one dict per device program
    analysis = analysis[0]
  return float(analysis["flops"])


def our_train_step():
  """(call, FLOPs) of our train step."""
  step, state, batch = suite.ours_train_step_and_inputs()
  return suite.repeated_steps(step, state, batch), flops(step, (state, batch))


def one_jit(jitted, args):
  """(call, FLOPs) of a jitted function and its arguments."""
  return (lambda: jitted(*args)), flops(jitted, args)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--override", action="append", default=[],
                      help="a config override of our side, as in suite.py")
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args()
  suite.OVERRIDES[:] = args.override

  rate = matmul_rate()
  print(f"{cpu_model()}, {jax.device_count()} {jax.default_backend()} device(s)")
  print(f"float32 matmul rate: {rate / 1e9:.0f} GFLOP/s")
  results = {"cpu": cpu_model(), "matmul_gflops_per_s": rate / 1e9, "cases": {}}
  cases = {"train_step": {"focal_jax": our_train_step},
           "inference": {"focal_jax": lambda: one_jit(*suite.ours_inference_and_inputs())}}
  if suite._available("kerashub"):  # its train step jits inside keras: no FLOP count of its own
    cases["train_step"]["kerashub"] = lambda: (suite.kerashub_train_step(), None)
    cases["inference"]["kerashub"] = lambda: one_jit(*suite.kerashub_inference_and_inputs())
  for case, contenders in cases.items():
    built = {name: build() for name, build in contenders.items()}
    work = built["focal_jax"][1]
    seconds = interleaved_median_seconds({name: call for name, (call, _) in built.items()},
                                         repeats=args.repeats)
    floor = work / rate
    print(f"{case}: {work / 1e9:.0f} GFLOP per call (ours), {floor * 1e3:.0f} ms at the matmul rate")
    rows = {}
    for name, (_, own_flops) in built.items():
      rows[name] = {"ms": seconds[name] * 1e3, "gflop": (own_flops or work) / 1e9,
                    "fraction_of_matmul_rate": floor / seconds[name],
                    "times_the_floor": seconds[name] / floor}
      counted = f"{own_flops / 1e9:.0f} GFLOP by its own count" if own_flops else "our FLOP count"
      print(f"  {name}: {seconds[name] * 1e3:.0f} ms ({counted}); at {floor / seconds[name]:.0%} of the "
            f"matmul rate: at most {seconds[name] / floor:.2f}x faster at that rate")
    results["cases"][case] = {"gflop": work / 1e9, "floor_ms": floor * 1e3, "contenders": rows}
  if args.out:
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
