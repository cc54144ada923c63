"""The passes of a 3x3 convolution on XLA:CPU: forward, input gradient and both kernel gradients.

Times, for the 3x3 convolutions of R50-FPN at batch 2 and 512x512 inputs,
the forward pass, the input gradient, XLA's own kernel gradient and
`focal_jax.models.cpu_rewrites.kernel_grad_as_matmul` (nine matrix products
over the shifted inputs), each jit-compiled alone (medians after warm-up).
The two kernel gradients are checked against each other first. Where the
nine products win for the wide convolutions, train with
`--model.cpu_rewrites.kernel_grad_as_matmul=wide` (see benchmarks/README.md).

  python benchmarks/bench_conv.py
  python benchmarks/bench_conv.py --repeats 21
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from focal_jax.models.cpu_rewrites import kernel_grad_as_matmul
from timing import interleaved_median_seconds, machine_line

# (batch, size, C_in, C_out): heads and FPN at P3-P5, backbone stages 1-4.
SHAPES = [(2, 64, 256, 256), (2, 32, 256, 256), (2, 16, 512, 512), (2, 64, 128, 128), (2, 128, 64, 64)]
PASSES = ("forward", "input gradient", "kernel gradient, XLA's", "kernel gradient, nine products")


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=11)
  args = parser.parse_args()
  print(machine_line() + "\n")
  print("| 3x3 convolution | GFLOP | " + " | ".join(PASSES) + " |")
  print("| --- | --- |" + " --- |" * len(PASSES))
  rng = np.random.default_rng(0)
  for batch, size, c_in, c_out in SHAPES:
    x = jnp.asarray(rng.normal(size=(batch, size, size, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)) * 0.05, jnp.float32)
    grad = jnp.asarray(rng.normal(size=(batch, size, size, c_out)), jnp.float32)
    forward = jax.jit(_conv)
    input_grad = jax.jit(lambda grad, kernel, x=x: jax.vjp(lambda x: _conv(x, kernel), x)[1](grad)[0])
    xla = jax.jit(lambda x, grad, kernel=kernel: jax.vjp(lambda k: _conv(x, k), kernel)[1](grad)[0])
    products = jax.jit(kernel_grad_as_matmul)
    expected, got = np.asarray(xla(x, grad)), np.asarray(products(x, grad))
    if np.abs(expected - got).max() > 1e-4 * np.abs(expected).max():
      raise AssertionError(f"the two kernel gradients differ at {(batch, size, c_in, c_out)}")
    seconds = interleaved_median_seconds(
        dict(zip(PASSES, (lambda: forward(x, kernel), lambda: input_grad(grad, kernel),
                          lambda: xla(x, grad), lambda: products(x, grad)))), repeats=args.repeats)
    gflop = 2 * batch * size * size * c_in * c_out * 9 / 1e9
    cells = [f"{seconds[name] * 1e3:.1f} ms ({gflop / seconds[name]:.0f} GFLOP/s)" for name in PASSES]
    print(f"| {batch} x {size}x{size}, {c_in} -> {c_out} | {gflop:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
