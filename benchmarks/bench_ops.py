"""Focal loss forward+backward against optax, and anchor matching, on this machine.

    python benchmarks/bench_ops.py

Times are medians of repeated runs after warm-up; the ratio is computed in the
same run, so it holds on a noisy shared machine where absolute times drift.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from focal_jax import batch_match_anchors, focal_loss, generate_anchors
from timing import interleaved_median_seconds, machine_line, median_seconds


def focal_loss_ratio(shape, repeats):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(0, 3, shape), jnp.float32)
  targets = jnp.asarray(rng.random(shape) < 0.001, jnp.float32)

  def fwd_bwd(loss_fn):
    return jax.jit(jax.value_and_grad(lambda x: jnp.sum(loss_fn(x, targets))))

  ours = fwd_bwd(lambda x, t: focal_loss(x, t, alpha=0.25, gamma=2.0))
  peer = fwd_bwd(lambda x, t: optax.losses.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0))
  times = interleaved_median_seconds({"ours": lambda: ours(logits), "optax": lambda: peer(logits)},
                                     repeats=repeats)
  ours_s, peer_s = times["ours"], times["optax"]
  print(f"focal loss fwd+bwd {list(shape)}: focal_jax {ours_s * 1e3:.1f} ms, "
        f"optax {peer_s * 1e3:.1f} ms, optax / focal_jax = {peer_s / ours_s:.2f}x")


def matching_time(num_gt, image_size, repeats):
  anchors = jnp.asarray(generate_anchors(image_size))
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, image_size[0] - 64, (2, num_gt, 2))
  boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(8, 64, (2, num_gt, 2))], -1), jnp.float32)
  classes = jnp.asarray(rng.integers(0, 80, (2, num_gt)), jnp.int32)
  valid = jnp.ones((2, num_gt), bool)
  match = jax.jit(batch_match_anchors)
  seconds = median_seconds(lambda: match(anchors, boxes, classes, valid), repeats=repeats)
  print(f"matching {num_gt} gt boxes to {anchors.shape[0]} anchors: {seconds / 2 * 1e3:.2f} ms per image "
        f"(batch of 2)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  print(machine_line())
  focal_loss_ratio((2, 49104, 80), args.repeats)
  matching_time(100, (512, 512), args.repeats)


if __name__ == "__main__":
  main()
