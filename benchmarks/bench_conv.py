"""The passes of a 3x3 convolution on XLA:CPU, XLA's own and rewritten.

Times, for the 3x3 convolutions of R50-FPN at batch 2 and 512x512 inputs,
the forward pass, the input gradient, XLA's own kernel gradient,
`focal_jax.models.cpu_rewrites.kernel_grad_as_matmul` (nine matrix products
over the shifted inputs), and Winograd's F(4x4, 3x3)
(`winograd_conv3x3`): its forward pass and its two gradients together, to
set against the sum of XLA's forward pass or of its two gradients. Each is
jit-compiled alone (medians after warm-up, in turn); the rewrites are checked
against XLA's results first. Where the nine products win for the wide
convolutions, train with `--model.cpu_rewrites.kernel_grad_as_matmul=wide`
(see benchmarks/README.md); Winograd's is the default where it applies
(`CpuRewrites.winograd`).

  python benchmarks/bench_conv.py
  python benchmarks/bench_conv.py --repeats 21
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from focal_jax.models.cpu_rewrites import kernel_grad_as_matmul, winograd_conv3x3
from timing import interleaved_median_seconds, machine_line

# (batch, size, C_in, C_out): heads and FPN at P3-P5, backbone stages 1-4, the classifier's predictor at P3.
SHAPES = [(2, 64, 256, 256), (2, 32, 256, 256), (2, 16, 512, 512), (2, 64, 128, 128), (2, 128, 64, 64),
          (2, 64, 256, 819)]
PASSES = ("forward", "input gradient", "kernel gradient, XLA's", "kernel gradient, nine products",
          "Winograd forward", "Winograd gradients")


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _check_close(expected, got, what: str, shape) -> None:
  expected, got = np.asarray(expected), np.asarray(got)
  if np.abs(expected - got).max() > 1e-4 * np.abs(expected).max():
    raise AssertionError(f"{what} differs from XLA's at {shape}")


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
    winograd = jax.jit(winograd_conv3x3)
    winograd_grads = jax.jit(lambda x, kernel, grad: jax.vjp(winograd_conv3x3, x, kernel)[1](grad))
    shape = (batch, size, c_in, c_out)
    _check_close(xla(x, grad), products(x, grad), "the nine-product kernel gradient", shape)
    _check_close(forward(x, kernel), winograd(x, kernel), "Winograd's convolution", shape)
    _check_close(xla(x, grad), winograd_grads(x, kernel, grad)[1], "Winograd's kernel gradient", shape)
    seconds = interleaved_median_seconds(
        dict(zip(PASSES, (lambda: forward(x, kernel), lambda: input_grad(grad, kernel),
                          lambda: xla(x, grad), lambda: products(x, grad), lambda: winograd(x, kernel),
                          lambda: winograd_grads(x, kernel, grad)))), repeats=args.repeats)
    gflop = 2 * batch * size * size * c_in * c_out * 9 / 1e9
    # GFLOP/s counts the direct convolution's multiply-adds (twice them for both gradients).
    flops = dict.fromkeys(PASSES, gflop) | {"Winograd gradients": 2 * gflop}
    cells = [f"{seconds[name] * 1e3:.1f} ms ({flops[name] / seconds[name]:.0f} GFLOP/s)" for name in PASSES]
    print(f"| {batch} x {size}x{size}, {c_in} -> {c_out} | {gflop:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
