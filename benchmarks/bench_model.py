"""Speed of the RetinaNet R50-FPN network: forward and forward+backward, JAX vs torchvision.

Times the network only (backbone + FPN + heads, no resizing transform, no
loss targets, no post-processing) on random NHWC images, batch 2 at 512x512 by
default, with trainable batch norm on both sides (torchvision's
`retinanet_resnet50_fpn(weights=None, weights_backbone=None)`): forward in
inference mode, forward+backward in train mode with a sum-of-squares loss on
both outputs. torchvision is timed in the same run when it imports (channels-
last tensors, as our NHWC layout; `--torch_layout contiguous` for NCHW).
Reports medians over `--repeats` timed runs after `--warmup` runs; the two
frameworks alternate on every repetition so that both see the same machine
load, and process CPU seconds are printed beside wall seconds (a steadier
figure on a shared machine).

Run (from the repository root, with focal_jax importable: `pip install -e .` or
`PYTHONPATH=src`):
  python benchmarks/bench_model.py                      # JAX (+ torch if installed)
  PYTHONPATH=src TORCH_VENV/bin/python benchmarks/bench_model.py  # a venv that has torch
  python benchmarks/bench_model.py --parts             # backbone, FPN and heads apart
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable


def _timed(fn) -> tuple[float, float]:
  """(wall seconds, process CPU seconds summed over threads) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def jax_benchmarks(args) -> dict[str, Callable[[], object]]:
  """`{"forward": fn, "forward+backward": fn}` for our R50-FPN; each call blocks until done."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from focal_jax.models import retinanet_resnet50_fpn

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  model = retinanet_resnet50_fpn(91, backbone_norm="bn", frozen_stages=0, dtype=dtype)
  images = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  params, batch_stats = variables["params"], variables["batch_stats"]
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; params {num_params:,}; "
        f"compute dtype {args.dtype}")

  @jax.jit
  def forward(params, batch_stats, images):
    return model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)

  @jax.jit
  def forward_backward(params, batch_stats, images):
    def loss_fn(params):
      (cls_logits, box_deltas), updates = model.apply(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      return jnp.sum(cls_logits**2) + jnp.sum(box_deltas**2), updates
    return jax.grad(loss_fn, has_aux=True)(params)

  fns = {}
  for name, fn in (("forward", forward), ("forward+backward", forward_backward)):
    fns[name] = lambda fn=fn: jax.block_until_ready(fn(params, batch_stats, images))
    print(f"  jax {name}: first call (compile + run) {_timed(fns[name])[0]:.1f} s")
  return fns


def torch_benchmarks(args) -> dict[str, Callable[[], object]] | None:
  """The same two functions for torchvision's model, or None if it does not import."""
  try:
    import torch
    import torchvision
  except ImportError as e:
    print(f"torchvision not importable ({e}); timing JAX only.")
    return None

  model = torchvision.models.detection.retinanet_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=91)
  num_params = sum(p.numel() for p in model.parameters())
  print(f"torch {torch.__version__} / torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads; params {num_params:,}; layout {args.torch_layout}")
  images = torch.randn(args.batch, 3, args.size, args.size)
  if args.torch_layout == "channels_last":
    model = model.to(memory_format=torch.channels_last)
    images = images.contiguous(memory_format=torch.channels_last)

  def network(x):
    features = list(model.backbone(x).values())
    return model.head(features)  # {"cls_logits": [B, A_total, K], "bbox_regression": [B, A_total, 4]}

  def forward():
    model.eval()
    with torch.no_grad():
      network(images)

  def forward_backward():
    model.train()
    model.zero_grad(set_to_none=True)
    out = network(images)
    loss = out["cls_logits"].pow(2).sum() + out["bbox_regression"].pow(2).sum()
    loss.backward()

  return {"forward": forward, "forward+backward": forward_backward}


def _median_wall(fn, warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    fn()
  return statistics.median(_timed(fn)[0] for _ in range(repeats))


def jax_parts(args) -> dict[str, float]:
  """Median seconds of forward and forward+backward of backbone, FPN and heads, apart."""
  import jax
  import jax.numpy as jnp

  from focal_jax.models.fpn import FPN
  from focal_jax.models.heads import RetinaNetHead
  from focal_jax.models.resnet import ResNet

  def squares(tree):
    return sum(jnp.sum(x * x) for x in jax.tree.leaves(tree))

  images = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, 3))
  backbone = ResNet(stage_sizes=(3, 4, 6, 3), block="bottleneck", width=64, norm="bn", frozen_stages=0)
  # Arrays go in as arguments: closed over, XLA would constant-fold the convolutions.
  backbone_vars = jax.jit(backbone.init)(jax.random.key(1), images)
  features = jax.jit(backbone.apply)(backbone_vars, images)
  fpn = FPN(channels=256, min_level=3, max_level=7, p6_from="p5")
  fpn_vars = jax.jit(fpn.init)(jax.random.key(2), features)
  pyramid = [v for _, v in sorted(jax.jit(fpn.apply)(fpn_vars, features).items())]
  head = RetinaNetHead(num_classes=91, num_anchors=9, num_convs=4, channels=256)
  head_vars = jax.jit(head.init)(jax.random.key(3), pyramid)

  def backbone_loss(params, images):
    out, _ = backbone.apply({"params": params, "batch_stats": backbone_vars["batch_stats"]}, images,
                            train=True, mutable=["batch_stats"])
    return squares(out)

  # Gradients for the parameters, and for the inputs of FPN and heads (as on the torch side).
  parts = {
      "backbone": (backbone_loss, backbone_vars["params"], images, (0,)),
      "fpn": (lambda p, x: squares(fpn.apply({"params": p}, x)), fpn_vars["params"], features, (0, 1)),
      "heads": (lambda p, x: squares(head.apply({"params": p}, x)), head_vars["params"], pyramid, (0, 1)),
  }
  times = {}
  for name, (loss, params, inputs, argnums) in parts.items():
    forward = jax.jit(loss)
    both = jax.jit(jax.grad(loss, argnums=argnums))
    times[f"{name} forward"] = _median_wall(lambda: jax.block_until_ready(forward(params, inputs)),
                                            args.warmup + 1, args.repeats)
    times[f"{name} forward+backward"] = _median_wall(lambda: jax.block_until_ready(both(params, inputs)),
                                                     args.warmup + 1, args.repeats)
  return times


def torch_parts(args) -> dict[str, float]:
  """The same for torchvision's modules (gradients for parameters and inputs)."""
  import torch
  import torchvision

  model = torchvision.models.detection.retinanet_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=91).train()
  model = model.to(memory_format=torch.channels_last)
  images = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
  with torch.no_grad():
    features = model.backbone.body(images)
    pyramid = list(model.backbone.fpn(features).values())
  features = {k: v.requires_grad_(True) for k, v in features.items()}
  pyramid = [v.requires_grad_(True) for v in pyramid]

  def squares(out):
    values = out.values() if isinstance(out, dict) else out
    return sum((v * v).sum() for v in values)

  parts = {"backbone": (model.backbone.body, images), "fpn": (model.backbone.fpn, features),
           "heads": (model.head, pyramid)}
  times = {}
  for name, (module, inputs) in parts.items():
    def forward(module=module, inputs=inputs):
      with torch.no_grad():
        module(inputs)

    def both(module=module, inputs=inputs):
      model.zero_grad(set_to_none=True)
      squares(module(inputs)).backward()

    times[f"{name} forward"] = _median_wall(forward, args.warmup + 1, args.repeats)
    times[f"{name} forward+backward"] = _median_wall(both, args.warmup + 1, args.repeats)
  return times


def print_parts(args) -> None:
  """Backbone, FPN and heads timed apart: where a whole-network gap comes from."""
  results = {"jax": jax_parts(args)}
  if not args.skip_torch:
    try:
      results["torch"] = torch_parts(args)
    except ImportError as e:
      print(f"torchvision not importable ({e}); timing JAX only.")
  print(f"{'part':28}" + "".join(f"{fw + ' s':>10}" for fw in results))
  for name in results["jax"]:
    print(f"{name:28}" + "".join(f"{times[name]:10.3f}" for times in results.values()))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--torch_layout", choices=("channels_last", "contiguous"),
                      default="channels_last")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--parts", action="store_true",
                      help="time backbone, FPN and heads apart (forward and forward+backward)")
  args = parser.parse_args()
  if args.parts:
    print_parts(args)
    return
  print(f"RetinaNet R50-FPN, 91 classes, batch {args.batch}, {args.size}x{args.size}, "
        f"median of {args.repeats} after {args.warmup} warm-up")

  frameworks = {"jax": jax_benchmarks(args)}
  if not args.skip_torch:
    torch_fns = torch_benchmarks(args)
    if torch_fns:
      frameworks["torch"] = torch_fns
  # Interleave the frameworks on every repetition so that both see the same load.
  times = {(fw, name): [] for fw, fns in frameworks.items() for name in fns}
  for repetition in range(args.warmup + args.repeats):
    for name in ("forward", "forward+backward"):
      for fw, fns in frameworks.items():
        wall_cpu = _timed(fns[name])
        if repetition >= args.warmup:
          times[(fw, name)].append(wall_cpu)

  print(f"{'':18}" + "".join(f"{fw + ' s':>9}{fw + ' cpu s':>13}{fw + ' img/s':>13}"
                              for fw in frameworks)
        + (f"{'jax speed-up':>14}" if "torch" in frameworks else ""))
  for name in ("forward", "forward+backward"):
    line, medians = f"{name:18}", {}
    for fw in frameworks:
      wall = statistics.median(t[0] for t in times[(fw, name)])
      cpu = statistics.median(t[1] for t in times[(fw, name)])
      medians[fw] = wall
      line += f"{wall:9.3f}{cpu:13.2f}{args.batch / wall:13.2f}"
    if "torch" in frameworks:
      line += f"{medians['torch'] / medians['jax']:13.2f}x"
    print(line)
  print("(median wall seconds per batch, its process CPU seconds, images/s; "
        "jax speed-up = torch time / jax time)")


if __name__ == "__main__":
  main()
