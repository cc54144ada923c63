"""The exported program: uint8 images at one size -> detections in their pixels, as one pure JAX function.

`serving_function(config, variables, image_size)` closes over the model's
variables and does, inside the program, what evaluation and `focal_jax.predict`
do around the model: the eval resize (bilinear, half-pixel centres, no
antialiasing, as `tf.image.resize`), ImageNet normalization, zero padding to
the network input, the network, post-processing, and the map of the boxes
back to the input's pixels. Its input is `uint8 [B, H, W, 3]` RGB at the
export size `(H, W)`; its outputs are a dict of

    boxes           float32 [B, D, 4]  (x1, y1, x2, y2) in pixels of the input images
    scores          float32 [B, D]     decreasing; 0 in unused slots
    classes         int32   [B, D]     contiguous class index; -1 in unused slots
    num_detections  int32   [B]        valid slots, first in each row

with `D = config.postprocess.max_detections`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from focal_jax.data.config import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, InputConfig
from focal_jax.engine.config import ExperimentConfig, model_from_config
from focal_jax.engine.inference import predict_step

MAX_EXPORT_SIDE = 8192  # pixels; a larger input is surely a mistake


def check_export_size(image_size: tuple[int, int]) -> tuple[int, int]:
  """`(height, width)` as ints; ValueError unless both are whole numbers in [1, MAX_EXPORT_SIDE]."""
  if len(image_size) != 2 or not all(isinstance(side, (int, np.integer)) and not isinstance(side, bool)
                                     for side in image_size):
    raise ValueError(f"the export size must be two whole numbers (height, width); got {image_size!r}.")
  height, width = map(int, image_size)
  if not (1 <= height <= MAX_EXPORT_SIDE and 1 <= width <= MAX_EXPORT_SIDE):
    raise ValueError(f"the export size must lie in 1..{MAX_EXPORT_SIDE} pixels per side; got {height}x{width}.")
  return height, width


def eval_resize(image_size: tuple[int, int], config: InputConfig) -> tuple[np.float32, tuple[int, int]]:
  """`(scale, resized_size)` of evaluation's resize for images of `image_size`, in float32 as the pipeline.

  `scale` is network pixels per image pixel; each side of `resized_size` is
  `round(side * scale)`, at least 1 (the rules of `focal_jax.data.transforms`).
  """
  height, width = (np.float32(side) for side in image_size)
  if config.resize == "square":
    target = np.float32(config.image_size)
    scale = min(target / height, target / width)
  else:
    scale = min(np.float32(config.eval_short_side) / min(height, width),
                np.float32(config.max_size) / max(height, width))
  scale = np.float32(scale)
  resized = tuple(max(int(np.rint(np.float32(side) * scale)), 1) for side in (height, width))
  return scale, resized


def preprocess(images: jax.Array, config: InputConfig) -> tuple[jax.Array, np.float32]:
  """uint8 `[B, H, W, 3]` -> `(float32 [B, *padded_size, 3] network input, scale)`, as evaluation does."""
  scale, (new_height, new_width) = eval_resize(images.shape[1:3], config)
  x = images.astype(jnp.float32)
  if (new_height, new_width) != images.shape[1:3]:
    x = jax.image.resize(x, (x.shape[0], new_height, new_width, 3), method="linear", antialias=False)
  x = (x - jnp.asarray(IMAGENET_MEAN_RGB, jnp.float32)) / jnp.asarray(IMAGENET_STD_RGB, jnp.float32)
  padded_height, padded_width = config.padded_size
  x = x[:, :padded_height, :padded_width]
  x = jnp.pad(x, ((0, 0), (0, padded_height - x.shape[1]), (0, padded_width - x.shape[2]), (0, 0)))
  return x, scale


def serving_function(config: ExperimentConfig, variables: Any, image_size: tuple[int, int]
                     ) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """The detector as one function of uint8 images of `image_size` (see the module docstring).

  Args:
    config: the run's config (model, anchors, eval resize, post-processing).
    variables: the model's `{"params": ..., "batch_stats": ...}`, closed over.
    image_size: `(height, width)` of the images the function takes.
  """
  height, width = check_export_size(image_size)
  model = model_from_config(config)

  def detect(images: jax.Array) -> dict[str, jax.Array]:
    if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[1:] != (height, width, 3):
      raise ValueError(f"expected uint8 images [B, {height}, {width}, 3]; got {images.dtype} {images.shape}.")
    network_input, scale = preprocess(images, config.data)
    batch = images.shape[0]
    detections = predict_step(variables, {
        "images": network_input, "scale": jnp.full((batch,), scale, jnp.float32),
        "original_size": jnp.broadcast_to(jnp.array([height, width], jnp.int32), (batch, 2))},
        model=model, anchor_config=config.anchors, config=config.postprocess)
    return {"boxes": detections.boxes, "scores": detections.scores, "classes": detections.classes,
            "num_detections": jnp.sum(detections.valid, axis=1, dtype=jnp.int32)}

  return detect
