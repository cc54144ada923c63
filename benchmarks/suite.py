"""The benchmark suite: focal_jax against its peers, on this machine, in one run.

    python benchmarks/suite.py                       # every case, results in benchmarks/results/
    python benchmarks/suite.py --cases focal_loss,postprocess --repeats 20
    python benchmarks/suite.py --time_to_accuracy    # adds the 2 x 10-minute training race
    python benchmarks/suite.py --separate_processes  # each contender timed alone in its own process
    python benchmarks/suite.py --allocator tcmalloc  # both sides on tcmalloc (see below)
    python benchmarks/suite.py --allocator hugepages --calls_per_turn 3  # huge pages, turns of 3 calls
    python benchmarks/suite.py --override model.cpu_rewrites.kernel_grad_as_matmul=wide
    python benchmarks/suite.py --cases train_step --override model.compute_dtype=bfloat16 --torch_autocast bfloat16

Peers: torchvision, and KerasHub (keras-hub on the JAX backend) where it is
installed (it brings the full tensorflow wheel: use a virtual environment of
its own, `pip install keras-hub==0.32.0 keras==3.15.1 -e .`, and run the suite
there; the peers that are not installed are left out).

Cases (R50-FPN RetinaNet, 91 classes, batch 2 at 512x512 unless stated):
- `train_step`: one optimizer step (SGD with momentum) with the loss and the
  anchor matching: ours jit-compiled with donated state against torchvision's
  `retinanet_resnet50_fpn` in train mode (`model(images, targets)`, backward,
  `optimizer.step()`); trainable batch norm on both sides, 10 boxes per image.
- `inference`: images to final detections (score > 0.05, top 1000 per level,
  NMS 0.5, 100 per image): ours forward + post-processing in one jit against
  torchvision's eval mode.
- `postprocess`: the post-processing alone for 2 images at full load (score
  threshold 0, so every level hands 1000 candidates to NMS): ours (jit)
  against torchvision's `postprocess_detections`, on the same head outputs.
- `focal_loss`: sigmoid focal loss summed, forward + backward, logits
  `[2, 49104, 80]`: ours against `optax.losses.sigmoid_focal_loss` and
  `torchvision.ops.sigmoid_focal_loss`.
- `matching`: 100 ground-truth boxes per image to the 49,104 anchors of
  512x512, batch 2 (no peer: torchvision matches inside its loss).
- `input`: the training input pipeline of the demo, images/s (no peer).

Every contender is timed in this process, the contenders of a case in turn
(so that they see the same machine load): by default one call each per turn;
with `--calls_per_turn N`, N calls in a row, the first of each turn untimed.
Medians after warm-up, ratios from those medians. With `--separate_processes`
each contender is timed alone in a fresh process instead, one after the
other: sharing a process, torch's and XLA's allocators interfere (our R50
step pays 2-3x the kernel time for its page faults right after a torch step).
Peak memory is measured separately: each contender runs alone in a fresh
process and reports its peak resident memory above what the process held
before the first call (inputs built, nothing run).

XLA:CPU allocates each call's temporary buffers afresh, and glibc serves such
large blocks with fresh `mmap`s in 4 KiB pages: about 400,000 page faults per
R50 train step. `--allocator` restarts the suite (and every child process)
with another allocator for every contender: `tcmalloc` preloads tcmalloc
(`LD_PRELOAD`, with `TCMALLOC_RELEASE_RATE=0` so that freed memory stays
mapped; needs Debian's `libtcmalloc-minimal4` or gperftools); `hugepages`
sets `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc's malloc on transparent
huge pages (glibc 2.35 or later, huge pages in `madvise` or `always` mode),
which takes the faults to about 2,000 per step. Freed huge pages are whole
2 MiB blocks, though, and a virtual machine that hands free memory back to
its host (virtio-balloon free page reporting) takes them away within
seconds: a call after a pause, or after the other contender's
turn, then pays seconds of kernel time to get them back. Time that mode with
`--calls_per_turn 3` (or `--separate_processes`).
Results go to `--out` as `results.json` and `results.md` (rewritten after
every case; a case that fails is recorded as failed and the others still
run), with the machine and versions. Without torch/torchvision only our side
(and optax) is timed.

On a GPU machine (JAX on a GPU) torch runs on CUDA as well: models and inputs
on the device, every call waited for, no pause between calls, and peak memory
from each framework's GPU allocator.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes.util
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

BATCH, SIZE, NUM_CLASSES, BOXES_PER_IMAGE = 2, 512, 91, 10
FOCAL_SHAPE = (2, 49104, 80)
# Before each contender's turn on the CPU: torch's OpenMP threads spin for a
# while after a call and would otherwise slow the contender timed next. Not on
# a GPU: there the pause made sub-millisecond calls 2-3x slower on both sides.
PAUSE_S = 0.2


# --------------------------------------------------------------------------- inputs


def _random_targets(seed: int = 0):
  """`(boxes [B, M, 4] xyxy, classes [B, M])` of plausible objects, as numpy."""
  import numpy as np

  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, SIZE - 160, (BATCH, BOXES_PER_IMAGE, 2))
  wh = rng.uniform(16, 160, (BATCH, BOXES_PER_IMAGE, 2))
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  return boxes, rng.integers(1, NUM_CLASSES, (BATCH, BOXES_PER_IMAGE)).astype(np.int32)


def _images(seed: int = 0):
  import numpy as np

  return np.random.default_rng(seed).normal(0, 1, (BATCH, SIZE, SIZE, 3)).astype(np.float32)


def _head_outputs(seed: int = 0):
  """Random `[B, A, K]` logits and `[B, A, 4]` deltas for 512x512 (torchvision's anchor count)."""
  import numpy as np

  from focal_jax.ops.anchors import AnchorConfig, generate_anchors

  anchors = generate_anchors((SIZE, SIZE), AnchorConfig.torchvision())
  rng = np.random.default_rng(seed)
  logits = rng.normal(-4, 2, (BATCH, anchors.shape[0], NUM_CLASSES)).astype(np.float32)
  deltas = rng.normal(0, 0.2, (BATCH, anchors.shape[0], 4)).astype(np.float32)
  return anchors, logits, deltas


# --------------------------------------------------------------------------- our side


# `--override section.field=value` of our side's config (e.g. model.cpu_rewrites.kernel_grad_as_matmul=wide).
OVERRIDES: list[str] = []
# `--torch_autocast bfloat16`: torch's side under `torch.autocast` (mixed precision), beside
# `--override model.compute_dtype=bfloat16` on ours.
TORCH_AUTOCAST: list[str] = []


def _our_config():
  """The R50-FPN config both sides share: torchvision's model and anchors, trainable BN (+ `OVERRIDES`)."""
  import dataclasses

  from experiments.configs import torchvision_r50_fpn
  from focal_jax.engine.config import apply_overrides

  config = torchvision_r50_fpn.get_config()
  config = dataclasses.replace(
      config,
      model=dataclasses.replace(config.model, backbone_norm="bn", frozen_stages=0),
      optimizer=dataclasses.replace(config.optimizer, name="sgd", warmup_steps=0),
      data=dataclasses.replace(config.data, image_size=SIZE, resize="square", batch_size=BATCH,
                               max_boxes=BOXES_PER_IMAGE, size_divisibility=128),
      postprocess=dataclasses.replace(config.postprocess, max_detections=100),
  )
  return apply_overrides(config, OVERRIDES)


def _override_args() -> list[str]:
  autocast = ["--torch_autocast", TORCH_AUTOCAST[0]] if TORCH_AUTOCAST else []
  return [arg for override in OVERRIDES for arg in ("--override", override)] + autocast


def _torch_autocast():
  """`torch.autocast` in `--torch_autocast`'s dtype on torch's device, or no context without it."""
  import torch

  if not TORCH_AUTOCAST:
    return contextlib.nullcontext()
  return torch.autocast(_torch_device().type, dtype=getattr(torch, TORCH_AUTOCAST[0]))


def ours_train_step_and_inputs():
  """Our jitted R50-FPN train step, its train state and its batch."""
  import jax
  import numpy as np

  from focal_jax.ops.anchors import generate_anchors
  from focal_jax.engine.mesh import global_batch, make_mesh
  from focal_jax.engine.config import model_from_config
  from focal_jax.engine.train_step import compile_train_step, create_train_state

  config = _our_config()
  mesh = make_mesh()
  model = model_from_config(config)
  state, tx = create_train_state(model, config, jax.random.key(0), mesh)
  step = compile_train_step(model, tx, generate_anchors((SIZE, SIZE), config.anchors), config.loss, mesh)
  boxes, classes = _random_targets()
  batch = global_batch({"images": _images(), "boxes": boxes, "classes": classes,
                        "valid": np.ones(classes.shape, bool)}, mesh)
  return step, state, batch


def ours_train_step():
  return repeated_steps(*ours_train_step_and_inputs())


def repeated_steps(step, state, batch):
  """A call of `step` on `batch` that carries the updated (donated) state on to the next call."""
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], batch)
    return metrics["loss"]

  return run


def ours_inference_and_inputs():
  """Our jitted predict step (forward pass and post-processing) and its arguments."""
  import jax
  import numpy as np

  from focal_jax.engine.config import model_from_config
  from focal_jax.engine.inference import compile_predict_step

  config = _our_config()
  model = model_from_config(config)
  images = jax.numpy.asarray(_images())
  variables = jax.jit(lambda: model.init(jax.random.key(0), images[:1], train=False))()
  predict = compile_predict_step(model, config.anchors, config.postprocess)
  batch = {"images": images, "scale": np.ones(BATCH, np.float32),
           "original_size": np.full((BATCH, 2), SIZE, np.float32)}
  return predict, (variables, batch)


def ours_inference():
  predict, args = ours_inference_and_inputs()
  return lambda: predict(*args)


def ours_postprocess():
  import jax

  from focal_jax.ops.anchors import AnchorConfig, anchors_per_level
  from focal_jax.ops.postprocess import PostprocessConfig, postprocess

  anchors, logits, deltas = _head_outputs()
  config = PostprocessConfig(score_threshold=0.0, topk_per_level=1000, iou_threshold=0.5, max_detections=100)
  counts = tuple(anchors_per_level((SIZE, SIZE), AnchorConfig.torchvision()))
  run = jax.jit(lambda logits, deltas, anchors: postprocess(logits, deltas, anchors, counts, (SIZE, SIZE),
                                                            config))
  logits, deltas, anchors = map(jax.numpy.asarray, (logits, deltas, anchors))
  return lambda: run(logits, deltas, anchors)


def _focal_inputs():
  import numpy as np

  rng = np.random.default_rng(0)
  return (rng.normal(-3, 3, FOCAL_SHAPE).astype(np.float32),
          (rng.random(FOCAL_SHAPE) < 0.0005).astype(np.float32))


def ours_focal_loss():
  import jax

  from focal_jax import focal_loss

  logits, targets = map(jax.numpy.asarray, _focal_inputs())
  step = jax.jit(jax.value_and_grad(lambda x, t: focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="sum")))
  return lambda: step(logits, targets)


def ours_matching():
  import jax
  import numpy as np

  from focal_jax import batch_match_anchors, generate_anchors

  anchors = jax.numpy.asarray(generate_anchors((SIZE, SIZE)))
  rng = np.random.default_rng(1)
  xy = rng.uniform(0, SIZE - 64, (BATCH, 100, 2))
  boxes = jax.numpy.asarray(np.concatenate([xy, xy + rng.uniform(8, 64, (BATCH, 100, 2))], -1), np.float32)
  classes = jax.numpy.asarray(rng.integers(0, 80, (BATCH, 100)), np.int32)
  valid = jax.numpy.ones((BATCH, 100), bool)
  match = jax.jit(batch_match_anchors)
  return lambda: match(anchors, boxes, classes, valid)


def optax_focal_loss():
  import jax
  import optax

  logits, targets = map(jax.numpy.asarray, _focal_inputs())
  step = jax.jit(jax.value_and_grad(
      lambda x, t: optax.losses.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0).sum()))
  return lambda: step(logits, targets)


# --------------------------------------------------------------------------- torchvision


@functools.cache
def _on_gpu() -> bool:
  """Whether JAX runs on a GPU; torch then runs on CUDA too, so that both sides use the same chip.

  Cached: `_block` asks inside every timed call.
  """
  import jax

  return jax.default_backend() == "gpu"


def _torch_device():
  import torch

  if not _on_gpu():
    return torch.device("cpu")
  if not torch.cuda.is_available():
    raise RuntimeError("JAX runs on a GPU but torch sees no CUDA device: install a CUDA build of torch "
                       "or run JAX on the CPU (JAX_PLATFORMS=cpu) so that both sides share one device.")
  return torch.device("cuda")


def _to_torch(array):
  """A numpy array as a torch tensor on the device torch is timed on."""
  import torch

  return torch.from_numpy(array).to(_torch_device())


def _torch_model():
  import torch
  import torchvision

  torch.manual_seed(0)
  # min/max size 512: torchvision's transform keeps the 512x512 input as it is.
  return torchvision.models.detection.retinanet_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=SIZE, max_size=SIZE,
      detections_per_img=100).to(_torch_device())


def _torch_images():
  return list(_to_torch(_images()).permute(0, 3, 1, 2).contiguous())


def torchvision_train_step():
  import torch

  model = _torch_model().train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
  images = _torch_images()
  boxes, classes = _random_targets()
  targets = [{"boxes": _to_torch(b), "labels": _to_torch(c).long()} for b, c in zip(boxes, classes)]

  def run():
    optimizer.zero_grad(set_to_none=True)
    with _torch_autocast():
      losses = model(images, targets)
      loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    return loss

  return run


def torchvision_inference():
  import torch

  model = _torch_model().eval()
  images = _torch_images()

  def run():
    with torch.inference_mode(), _torch_autocast():
      return model(images)

  return run


def _kerashub_detector():
  """KerasHub's RetinaNet, ResNet-50 from scratch: torchvision's size (34,068,119 trainable parameters).

  Differences that stay (keras-hub 0.32.0): its focal loss has no alpha and
  averages over classes, its box loss is Huber, and its NMS is class-agnostic
  with no per-level top-k (here at our score threshold 0.05).
  """
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import keras_hub
  import numpy as np

  resnet = keras_hub.models.ResNetBackbone(
      input_conv_filters=[64], input_conv_kernel_sizes=[7], stackwise_num_filters=[64, 128, 256, 512],
      stackwise_num_blocks=[3, 4, 6, 3], stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block",
      image_shape=(SIZE, SIZE, 3))
  backbone = keras_hub.models.RetinaNetBackbone(image_encoder=resnet, min_level=3, max_level=7, use_p5=False,
                                                image_shape=(SIZE, SIZE, 3))
  detector = keras_hub.models.RetinaNetObjectDetector(
      backbone=backbone, num_classes=NUM_CLASSES, bounding_box_format="xyxy",
      prediction_decoder=keras_hub.layers.NonMaxSuppression(
          bounding_box_format="xyxy", from_logits=True, confidence_threshold=0.05, iou_threshold=0.5,
          max_detections=100))
  trainable = sum(int(np.prod(v.shape)) for v in detector.trainable_variables)
  if trainable != 34_068_119:
    raise RuntimeError(f"KerasHub's model has {trainable:,} trainable parameters, not torchvision's 34,068,119.")
  return detector


def kerashub_train_step():
  import keras

  detector = _kerashub_detector()
  detector.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, weight_decay=1e-4))
  boxes, classes = _random_targets()
  images, targets = _images(), {"boxes": boxes, "labels": classes}
  # keras.Model's own train_on_batch: the detector's rejects dict targets.
  return lambda: keras.Model.train_on_batch(detector, images, targets)


def kerashub_inference_and_inputs():
  """KerasHub's forward pass and decoding in one jit, and its arguments."""
  import jax

  detector = _kerashub_detector()
  trainable = [v.value for v in detector.trainable_variables]
  non_trainable = [v.value for v in detector.non_trainable_variables]

  @jax.jit
  def predict(trainable, non_trainable, images):
    # decode_predictions directly: the detector's predict_on_batch fails unpacking its data.
    outputs, _ = detector.stateless_call(trainable, non_trainable, images, training=False)
    return detector.decode_predictions(outputs, images)

  return predict, (trainable, non_trainable, jax.numpy.asarray(_images()))


def kerashub_inference():
  predict, args = kerashub_inference_and_inputs()
  return lambda: predict(*args)


def torchvision_postprocess():
  import torch

  from focal_jax.ops.anchors import AnchorConfig, anchors_per_level

  model = _torch_model().eval()
  model.score_thresh = 0.0
  anchors, logits, deltas = map(_to_torch, _head_outputs())
  counts = anchors_per_level((SIZE, SIZE), AnchorConfig.torchvision())
  # What torchvision's forward hands to postprocess_detections: per level [B, n, K], anchors per image.
  split_logits = list(logits.split(counts, dim=1))
  split_deltas = list(deltas.split(counts, dim=1))
  split_anchors = [list(anchors.split(counts))] * BATCH

  def run():
    with torch.inference_mode():
      return model.postprocess_detections({"cls_logits": split_logits, "bbox_regression": split_deltas},
                                          split_anchors, [(SIZE, SIZE)] * BATCH)

  return run


def torchvision_focal_loss():
  from torchvision.ops import sigmoid_focal_loss

  logits, targets = map(_to_torch, _focal_inputs())
  logits.requires_grad_(True)

  def run():
    logits.grad = None
    loss = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
    loss.backward()
    return loss

  return run


# --------------------------------------------------------------------------- cases

CASES: dict[str, dict[str, Callable[[], Callable[[], object]]]] = {
    "train_step": {"focal_jax": ours_train_step, "torchvision": torchvision_train_step,
                   "kerashub": kerashub_train_step},
    "inference": {"focal_jax": ours_inference, "torchvision": torchvision_inference,
                  "kerashub": kerashub_inference},
    "postprocess": {"focal_jax": ours_postprocess, "torchvision": torchvision_postprocess},
    "focal_loss": {"focal_jax": ours_focal_loss, "optax": optax_focal_loss,
                   "torchvision": torchvision_focal_loss},
    "matching": {"focal_jax": ours_matching},
}
IMAGES_PER_CALL = {"train_step": BATCH, "inference": BATCH, "postprocess": BATCH, "focal_loss": None,
                   "matching": BATCH}


def _available(contender: str) -> bool:
  """Whether a peer's library is installed (ours and optax always are)."""
  modules = {"torchvision": ("torch", "torchvision"), "kerashub": ("keras_hub",)}.get(contender, ())
  return all(importlib.util.find_spec(module) is not None for module in modules)


def _block(result):
  """Waits until `result` is computed: JAX arrays, and torch's queued CUDA work on a GPU."""
  import jax

  jax.block_until_ready(result)
  if "torch" in sys.modules and _on_gpu():
    sys.modules["torch"].cuda.synchronize()
  return result


def time_case(name: str, contenders: dict, warmup: int, repeats: int, calls_per_turn: int = 1) -> dict:
  """Medians (s) of each contender's call, the contenders taking turns `repeats` times.

  On its turn a contender makes `calls_per_turn` calls in a row; with more than
  one, the first call of the turn is not timed.
  """
  fns = {}
  for contender, build in contenders.items():
    started = time.perf_counter()
    fns[contender] = build()
    _block(fns[contender]())
    print(f"  {name}/{contender}: built and first call in {time.perf_counter() - started:.1f} s", flush=True)
  for _ in range(warmup):
    for fn in fns.values():
      _block(fn())
  times = {contender: [] for contender in fns}
  pause_s = PAUSE_S if len(fns) > 1 and not _on_gpu() else 0.0
  for _ in range(repeats):
    for contender, fn in fns.items():
      time.sleep(pause_s)
      for call in range(calls_per_turn):
        started = time.perf_counter()
        _block(fn())
        if call > 0 or calls_per_turn == 1:
          times[contender].append(time.perf_counter() - started)
  return {contender: statistics.median(values) for contender, values in times.items()}


def time_case_in_processes(name: str, contenders: dict, warmup: int, repeats: int) -> dict:
  """Medians (s) of each contender's call, each contender alone in a fresh process, in turn."""
  seconds = {}
  for contender in contenders:
    command = [sys.executable, __file__, "--time_of", f"{name}/{contender}", "--warmup", str(warmup),
               "--repeats", str(repeats), *_override_args()]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("median_seconds ")]
    if not lines:
      raise RuntimeError(f"timing {name}/{contender} failed:\n{completed.stderr[-2000:]}")
    seconds[contender] = float(lines[-1].split()[1])
    print(f"  {name}/{contender}: {seconds[contender] * 1e3:.1f} ms alone", flush=True)
  return seconds


def _time_here(spec: str, warmup: int, repeats: int) -> None:
  """Child process: times one contender alone and prints its median."""
  name, contender = spec.split("/")
  seconds = time_case(name, {contender: CASES[name][contender]}, warmup, repeats)[contender]
  print(f"median_seconds {seconds}")


def _status_bytes(field: str) -> int:
  """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes."""
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(name: str, contender: str) -> int | None:
  """Peak resident memory (bytes) a contender adds, measured alone in a fresh process."""
  command = [sys.executable, __file__, "--memory_of", f"{name}/{contender}", *_override_args()]
  completed = subprocess.run(command, capture_output=True, text=True, check=False)
  for line in completed.stdout.splitlines():
    if line.startswith("peak_bytes "):
      return int(line.split()[1])
  print(f"  memory of {name}/{contender} failed:\n{completed.stderr[-2000:]}", flush=True)
  return None


def _gpu_bytes(framework: str) -> tuple[int, int]:
  """(bytes in use, peak bytes in use) on the GPU by `framework`'s allocator ("jax" or "torch")."""
  if framework == "torch":
    import torch

    return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
  import jax

  stats = jax.devices()[0].memory_stats()
  return stats["bytes_in_use"], stats["peak_bytes_in_use"]


def _measure_memory_here(spec: str) -> None:
  """Child process: builds one contender, runs it 3 times, prints its peak memory increase.

  On the CPU, the peak resident memory (RSS): the peak is reset (Linux
  `clear_refs`) once the inputs and the model exist, so that imports do not
  count; JAX's compilation on the first call does. On a GPU, the peak of the
  framework's device allocator above what it held once the inputs and the
  model existed (torch's peak is reset there; JAX's cannot be, so a higher
  peak while building would count, which the model's initialisation is not).
  """
  name, contender = spec.split("/")
  run = CASES[name][contender]()
  if _on_gpu():
    framework = "torch" if contender == "torchvision" else "jax"
    if framework == "torch":
      sys.modules["torch"].cuda.reset_peak_memory_stats()
    before, _ = _gpu_bytes(framework)
    for _ in range(3):
      _block(run())
    print(f"peak_bytes {max(_gpu_bytes(framework)[1] - before, 0)}")
    return
  with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")  # resets VmHWM to the current RSS
  before = _status_bytes("VmRSS")
  for _ in range(3):
    _block(run())
  print(f"peak_bytes {max(_status_bytes('VmHWM') - before, 0)}")


def input_pipeline_rate(data_dir: str, batches: int = 30) -> float:
  """Training batches of the demo input (synthetic_shapes at 128x128), images/s."""
  from focal_jax.data import build_train_dataset, synthetic_shapes_config

  config = synthetic_shapes_config(data_dir=data_dir, batch_size=16)
  iterator = build_train_dataset(config, process_index=0, process_count=1)
  for _ in range(5):
    next(iterator)
  started = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * config.batch_size / (time.perf_counter() - started)


TCMALLOC = "tcmalloc_minimal"
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def _allocator_environment(allocator: str) -> dict[str, str]:
  """The environment variables to set so that `allocator` ("tcmalloc" or "hugepages") is used; none if it is."""
  if allocator == "tcmalloc":
    if TCMALLOC in os.environ.get("LD_PRELOAD", ""):
      return {}
    library = ctypes.util.find_library(TCMALLOC)
    if library is None:
      raise SystemExit("--allocator tcmalloc: libtcmalloc_minimal not found; install Debian/Ubuntu's "
                       "libtcmalloc-minimal4 (or gperftools).")
    return {"LD_PRELOAD": library, "TCMALLOC_RELEASE_RATE": "0"}
  tunables = os.environ.get("GLIBC_TUNABLES")
  if HUGEPAGES_TUNABLE in (tunables or ""):
    return {}
  libc, version = platform.libc_ver()
  if libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
    raise SystemExit(f"--allocator hugepages needs glibc 2.35 or later (this is {libc or 'not glibc'} {version}).")
  thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
  if not thp.exists() or "[never]" in thp.read_text():
    raise SystemExit("--allocator hugepages: transparent huge pages are off in this kernel "
                     f"({thp}); set it to madvise or always.")
  return {"GLIBC_TUNABLES": f"{tunables}:{HUGEPAGES_TUNABLE}" if tunables else HUGEPAGES_TUNABLE}


def restart_with_allocator(allocator: str, argv: list[str]) -> None:
  """Re-executes this script with `allocator` selected, unless it already is; never returns if it restarts."""
  variables = _allocator_environment(allocator)
  if not variables:
    return
  print("restarting with " + " ".join(f"{name}={value}" for name, value in variables.items()), flush=True)
  os.execve(sys.executable, [sys.executable, __file__, *argv], {**os.environ, **variables})


def _allocator_description() -> str:
  preloaded, tunables = os.environ.get("LD_PRELOAD"), os.environ.get("GLIBC_TUNABLES")
  return preloaded or (f"glibc malloc, GLIBC_TUNABLES={tunables}" if tunables else "default (glibc malloc)")


def machine() -> dict:
  import jax
  from timing import cpu_model

  info = {"cpu": cpu_model(), "cpus": os.cpu_count(),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
          "python": platform.python_version(), "jax": jax.__version__,
          "load_average_at_start": os.getloadavg()[0],
          "allocator": _allocator_description(),
          "peak_memory": "GPU allocator" if _on_gpu() else "host RSS"}
  if _available("torchvision"):
    import torch
    import torchvision

    info.update(torch=torch.__version__, torchvision=torchvision.__version__,
                torch_device=str(_torch_device()), torch_threads=torch.get_num_threads())
    if _on_gpu():
      info.update(torch_cudnn_benchmark=torch.backends.cudnn.benchmark,
                  torch_cudnn_tf32=torch.backends.cudnn.allow_tf32,
                  torch_matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
  if _available("kerashub"):
    import keras_hub

    info["keras_hub"] = keras_hub.__version__
  import optax

  info["optax"] = optax.__version__
  return info


def to_markdown(results: dict) -> str:
  lines = ["| case | contender | median | per image | peak memory | speed-up of focal_jax |",
           "| --- | --- | --- | --- | --- | --- |"]
  for name, case in results["cases"].items():
    if "error" in case:
      lines.append(f"| {name} | failed: {case['error'].splitlines()[-1]} | | | | |")
      continue
    ours = case["seconds"].get("focal_jax")
    for contender, seconds in case["seconds"].items():
      per_image = (f"{IMAGES_PER_CALL[name] / seconds:.2f} img/s" if IMAGES_PER_CALL.get(name) else "")
      memory = case["peak_bytes"].get(contender)
      memory = f"{memory / 2**20:.0f} MiB" if memory is not None else ""
      ratio = "" if contender == "focal_jax" or not ours else f"{seconds / ours:.2f}x"
      lines.append(f"| {name} | {contender} | {seconds * 1e3:.1f} ms | {per_image} | {memory} | {ratio} |")
  if "input_images_per_second" in results:
    lines.append(f"| input (demo, 128x128) | focal_jax | | {results['input_images_per_second']:.0f} img/s | | |")
  machine_info = ", ".join(f"{k} {v}" for k, v in results["machine"].items())
  return "\n".join([f"Machine: {machine_info}", "", *lines, ""])


def run_case(name: str, args) -> dict:
  """Times one case's contenders (and their peak memory unless skipped); prints the ratios."""
  contenders = {k: v for k, v in CASES[name].items() if _available(k)}
  if args.separate_processes:
    seconds = time_case_in_processes(name, contenders, args.warmup, args.repeats)
  else:
    seconds = time_case(name, contenders, args.warmup, args.repeats, args.calls_per_turn)
  peaks = {} if args.skip_memory else {c: peak_memory(name, c) for c in contenders}
  print(f"{name}: " + ", ".join(f"{c} {s * 1e3:.1f} ms" for c, s in seconds.items())
        + "".join(f"; {c}/focal_jax = {s / seconds['focal_jax']:.2f}x" for c, s in seconds.items()
                  if c != "focal_jax"), flush=True)
  return {"seconds": seconds, "peak_bytes": peaks}


def write_results(results: dict, out: Path) -> None:
  (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  (out / "results.md").write_text(to_markdown(results))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--cases", default=",".join([*CASES, "input"]), help="comma-separated cases (default: all)")
  parser.add_argument("--repeats", type=int, default=10, help="timed repetitions per contender")
  parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions after the first call")
  parser.add_argument("--skip_memory", action="store_true", help="do not measure peak memory")
  parser.add_argument("--data_dir", default="/tmp/focal_jax_benchmarks/tfds",
                      help="where the synthetic dataset is built for the input case")
  parser.add_argument("--time_to_accuracy", action="store_true",
                      help="also run bench_time_to_accuracy.py (two 10-minute trainings)")
  parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="output folder")
  parser.add_argument("--separate_processes", action="store_true",
                      help="time each contender alone in a fresh process (default: all in this one, in turn)")
  parser.add_argument("--allocator", choices=("default", "tcmalloc", "hugepages"), default="default",
                      help="tcmalloc: restart with tcmalloc preloaded; hugepages: with glibc's malloc on "
                           "transparent huge pages (for every contender; default: the C library's as it is)")
  parser.add_argument("--calls_per_turn", type=int, default=1,
                      help="calls each contender makes in a row on its turn; above 1 the first call of a "
                           "turn is not timed (default: 1, the contenders alternate on every call; "
                           "not used with --separate_processes, where each contender runs alone)")
  parser.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                      help="a change to our side's config, e.g. model.cpu_rewrites.kernel_grad_as_matmul=wide "
                           "(repeatable; recorded with the machine)")
  parser.add_argument("--torch_autocast", choices=("bfloat16", "float16"),
                      help="run torch's side under torch.autocast in this dtype (mixed precision; pair it "
                           "with --override model.compute_dtype=bfloat16)")
  parser.add_argument("--memory_of", help=argparse.SUPPRESS)
  parser.add_argument("--time_of", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  OVERRIDES[:] = args.override
  TORCH_AUTOCAST[:] = [args.torch_autocast] if args.torch_autocast else []
  unknown = set(args.cases.split(",")) - {*CASES, "input"}
  if unknown:
    parser.error(f"unknown cases {sorted(unknown)}; choose from {[*CASES, 'input']}")
  if args.calls_per_turn < 1:
    parser.error("--calls_per_turn must be at least 1")
  if args.allocator != "default":
    restart_with_allocator(args.allocator, sys.argv[1:] if argv is None else argv)
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ for the shared config
  if args.memory_of:
    _measure_memory_here(args.memory_of)
    return
  if args.time_of:
    _time_here(args.time_of, args.warmup, args.repeats)
    return

  results = {"machine": {**machine(), "separate_processes": args.separate_processes,
                         "calls_per_turn": args.calls_per_turn, "overrides": OVERRIDES,
                         "torch_autocast": args.torch_autocast}, "cases": {}}
  print(json.dumps(results["machine"]), flush=True)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for name in args.cases.split(","):
    try:
      if name == "input":
        results["input_images_per_second"] = input_pipeline_rate(args.data_dir)
        print(f"input: {results['input_images_per_second']:.0f} images/s", flush=True)
      else:
        results["cases"][name] = run_case(name, args)
    except Exception:  # One broken case must not lose the others' results.
      error = traceback.format_exc()
      print(f"{name} failed:\n{error}", flush=True)
      results["cases"][name] = {"error": error}
    write_results(results, out)  # after every case, so that a run cut short keeps what it measured
  if args.time_to_accuracy:
    subprocess.run([sys.executable, str(Path(__file__).parent / "bench_time_to_accuracy.py"),
                    "--out", str(out / "time_to_accuracy.json")], check=True)
  print(to_markdown(results))
  if any("error" in case for case in results["cases"].values()):
    raise SystemExit("some cases failed; see above")


if __name__ == "__main__":
  main()
