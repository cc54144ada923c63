"""The jit-compiled predictor: images -> fixed-size detections in original-image pixels."""

from __future__ import annotations

import functools

import jax

from focal_jax.ops.anchors import AnchorConfig, anchors_per_level, generate_anchors
from focal_jax.models import RetinaNet
from focal_jax.engine.mesh import batch_sharded
from focal_jax.ops.postprocess import Detections, PostprocessConfig, postprocess, to_original_pixels


def predict_step(variables, batch: dict, *, model: RetinaNet, anchor_config: AnchorConfig,
                 config: PostprocessConfig) -> Detections:
  """Detections of a batch, with boxes mapped back to original-image pixels.

  `batch` holds `images [B, H, W, 3]` (normalized, padded), `scale [B]`
  (network pixels per original pixel) and `original_size [B, 2]`.
  """
  image_size = batch["images"].shape[1:3]
  cls_logits, box_deltas = model.apply(variables, batch["images"], train=False)
  detections = postprocess(cls_logits, box_deltas, generate_anchors(image_size, anchor_config),
                           anchors_per_level(image_size, anchor_config), image_size, config)
  return detections.replace(
      boxes=to_original_pixels(detections.boxes, batch["scale"], batch["original_size"]))


def compile_predict_step(model: RetinaNet, anchor_config: AnchorConfig, config: PostprocessConfig, mesh=None):
  """`predict_step` jitted (static output shapes: `[B, max_detections]`).

  With a `mesh`, the detections stay sharded over its `data` axis, so that
  each process finds its own rows.
  """
  step = functools.partial(predict_step, model=model, anchor_config=anchor_config, config=config)
  return jax.jit(step, out_shardings=None if mesh is None else batch_sharded(mesh))
