"""Per-example transforms of the input pipelines: decode, augment, resize, normalize, pad.

`decode_example` turns a TFDS record of the `coco/2017` features into an image
and its target boxes in pixels; `train_transform` (random transpose and flips,
resize with jitter, crop) and `eval_transform` (deterministic resize) make
network examples of them: images ImageNet mean/std normalized and zero padded
to `config.padded_size`, ground truth padded to `config.max_boxes`.
Underscored keys (`_clipped`, `_invalid`, `_dropped`) are counters for the
iterators' stats. `make_eval_preprocessor` is the evaluation pre-processing of
one image outside a dataset (prediction on image files).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from focal_jax.data._tensorflow import tf
from focal_jax.data.config import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, InputConfig


def decode_example(example: dict[str, Any], config: InputConfig) -> dict[str, tf.Tensor]:
  """A TFDS example -> image uint8 [h, w, 3] and target boxes xyxy in its pixels.

  Returns a dict with `image`, `boxes` float32 [n, 4], `classes` int32 [n],
  `image_id` int64, and counters `_clipped` (boxes that reached outside the
  image), `_invalid` (zero-area or inverted boxes dropped); crowd boxes and
  labels that map to no class are dropped.
  """
  image = example["image"]
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  image = tf.ensure_shape(image, [None, None, 3])
  shape = tf.shape(image)
  h = tf.cast(shape[0], tf.float32)
  w = tf.cast(shape[1], tf.float32)

  objects = example["objects"]
  bbox = tf.reshape(tf.cast(objects["bbox"], tf.float32), [-1, 4])  # ymin, xmin, ymax, xmax
  clipped = tf.clip_by_value(bbox, 0.0, 1.0)
  was_clipped = tf.reduce_any(tf.abs(clipped - bbox) > 1e-6, axis=1)
  ymin, xmin, ymax, xmax = tf.unstack(clipped, axis=1)
  boxes = tf.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1)

  label_to_class = tf.constant(config.labels.label_to_class, tf.int32)
  labels = tf.cast(objects["label"], tf.int32)
  in_range = (labels >= 0) & (labels < len(config.labels.label_to_class))
  classes = tf.where(in_range, tf.gather(label_to_class, tf.clip_by_value(
      labels, 0, len(config.labels.label_to_class) - 1)), -1)
  is_target = ~tf.cast(objects["is_crowd"], tf.bool) & (classes >= 0)
  positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  keep = is_target & positive
  return {
      "image": image,
      "boxes": tf.boolean_mask(boxes, keep),
      "classes": tf.boolean_mask(classes, keep),
      "image_id": tf.cast(example["image/id"], tf.int64),
      "_clipped": tf.reduce_sum(tf.cast(was_clipped & is_target, tf.int32)),
      "_invalid": tf.reduce_sum(tf.cast(is_target & ~positive, tf.int32)),
  }


def _resize_scale(h, w, config: InputConfig, seed=None):
  """Scale factor (network pixels per image pixel) of the resize step."""
  if config.resize == "square":
    target = tf.constant(float(config.image_size))
    if seed is not None:
      lo, hi = config.scale_range
      target = target * tf.random.stateless_uniform([], seed, minval=lo, maxval=hi)
    return tf.minimum(target / h, target / w)
  if seed is not None:
    choices = tf.constant(config.short_side_choices, tf.float32)
    short = tf.gather(choices, tf.random.stateless_uniform(
        [], seed, minval=0, maxval=len(config.short_side_choices), dtype=tf.int32))
  else:
    short = tf.constant(float(config.eval_short_side))
  return tf.minimum(short / tf.minimum(h, w), config.max_size / tf.maximum(h, w))


def _resize(image, scale):
  """Bilinear resize by `scale` (each side rounded, at least 1 pixel) -> float32 [h', w', 3].

  When the size does not change, the image is only cast: bilinear resizing to
  the same size returns every pixel as it is.
  """
  size = tf.shape(image)[:2]
  new_size = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) * scale), tf.int32), 1)
  image = tf.cast(image, tf.float32)
  return tf.cond(tf.reduce_all(new_size == size), lambda: image,
                 lambda: tf.image.resize(image, new_size, method="bilinear"))


def _normalize_and_pad(image, config: InputConfig):
  """ImageNet mean/std normalization, then zero padding right/bottom -> float32 [H, W, 3] (`padded_size`).

  The mean and std come as rows of the padded width (`[W, 3]`), cut to the
  image's: TensorFlow broadcasts a row over each image row several times
  faster than a `[3]` vector over each pixel, with the same arithmetic.
  """
  ph, pw = config.padded_size
  image = image[:ph, :pw]  # no-op unless a short_side choice exceeds the pad size
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  mean_row = tf.constant(np.tile(np.asarray(IMAGENET_MEAN_RGB, np.float32), (pw, 1)))
  std_row = tf.constant(np.tile(np.asarray(IMAGENET_STD_RGB, np.float32), (pw, 1)))
  image = (image - mean_row[:width]) / std_row[:width]
  image = tf.pad(image, [[0, ph - height], [0, pw - width], [0, 0]])
  return tf.ensure_shape(image, [ph, pw, 3])


def _clip_and_filter(boxes, classes, height, width):
  boxes = tf.stack([tf.clip_by_value(boxes[:, 0], 0.0, width), tf.clip_by_value(boxes[:, 1], 0.0, height),
                    tf.clip_by_value(boxes[:, 2], 0.0, width), tf.clip_by_value(boxes[:, 3], 0.0, height)],
                   axis=1)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  return tf.boolean_mask(boxes, keep), tf.boolean_mask(classes, keep)


def pad_ground_truth(boxes, classes, max_boxes: int):
  """Pads (or cuts to the `max_boxes` largest) -> boxes [M, 4], classes [M], valid [M], dropped."""
  n = tf.shape(boxes)[0]
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

  def largest():
    idx = tf.math.top_k(area, k=max_boxes, sorted=True).indices
    return tf.gather(boxes, idx), tf.gather(classes, idx)

  boxes, classes = tf.cond(n > max_boxes, largest, lambda: (boxes, classes))
  kept = tf.minimum(n, max_boxes)
  boxes = tf.pad(boxes, [[0, max_boxes - kept], [0, 0]])
  classes = tf.pad(classes, [[0, max_boxes - kept]], constant_values=-1)
  valid = tf.range(max_boxes) < kept
  return (tf.ensure_shape(boxes, [max_boxes, 4]), tf.ensure_shape(classes, [max_boxes]),
          valid, tf.maximum(n - max_boxes, 0))


def _network_example(image, boxes, classes, decoded, config: InputConfig) -> dict[str, tf.Tensor]:
  """Clips the boxes to the (resized) image, pads the ground truth, normalizes and pads the image."""
  size = tf.cast(tf.shape(image)[:2], tf.float32)
  boxes, classes = _clip_and_filter(boxes, classes, size[0], size[1])
  gt_boxes, gt_classes, valid, dropped = pad_ground_truth(boxes, classes, config.max_boxes)
  return {
      "images": _normalize_and_pad(image, config),
      "boxes": gt_boxes,
      "classes": gt_classes,
      "valid": valid,
      "_dropped": dropped,
      "_clipped": decoded["_clipped"],
      "_invalid": decoded["_invalid"],
  }


def _at_random(seed, probability: float, transform, image, boxes):
  """`transform(image, boxes)` with `probability` (a stateless draw from `seed`), else both as they are."""
  apply = tf.random.stateless_uniform([], seed) < probability
  return tf.cond(apply, lambda: transform(image, boxes), lambda: (image, boxes))


def _transpose(image, boxes):
  """Swaps the image's axes (a mirroring in its main diagonal) and the boxes' x and y."""
  return tf.transpose(image, [1, 0, 2]), tf.gather(boxes, [1, 0, 3, 2], axis=1)


def _flip(image, boxes, axis: int, size):
  """Mirrors the image along `axis` (0: top-bottom, 1: left-right) of length `size`, and the boxes."""
  lo, hi = 1 - axis, 3 - axis  # the boxes' coordinates along that axis: (y1, y2) or (x1, x2)
  flipped = tf.unstack(boxes, axis=1)
  flipped[lo], flipped[hi] = size - flipped[hi], size - flipped[lo]
  return tf.reverse(image, axis=[axis]), tf.stack(flipped, axis=1)


def train_transform(decoded: dict[str, tf.Tensor], config: InputConfig, seed) -> dict[str, tf.Tensor]:
  """Transpose, flips, resize with jitter, crop (square mode), normalize, pad: one training example.

  `seed` is a stateless seed (int64 [2]); the same seed gives the same output.
  """
  image, boxes, classes = decoded["image"], decoded["boxes"], decoded["classes"]
  # Seeds 0-3 (left-right flip, scale, crop) come first so that a config without
  # the later transforms draws the same examples as before they existed.
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)

  image, boxes = _at_random(seeds[4], config.transpose_prob, _transpose, image, boxes)
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  image, boxes = _at_random(seeds[0], config.flip_prob, lambda i, b: _flip(i, b, axis=1, size=w), image, boxes)
  image, boxes = _at_random(seeds[5], config.vertical_flip_prob, lambda i, b: _flip(i, b, axis=0, size=h),
                            image, boxes)

  scale = _resize_scale(h, w, config, seeds[1])
  image, boxes = _resize(image, scale), boxes * scale
  new_shape = tf.shape(image)
  if config.resize == "square":  # random crop of at most image_size x image_size
    size = config.image_size
    spare = tf.cast(tf.maximum(new_shape[:2] - size, 0), tf.float32)
    oy = tf.cast(tf.floor(tf.random.stateless_uniform([], seeds[2]) * (spare[0] + 1)), tf.int32)
    ox = tf.cast(tf.floor(tf.random.stateless_uniform([], seeds[3]) * (spare[1] + 1)), tf.int32)
    oy, ox = tf.minimum(oy, tf.cast(spare[0], tf.int32)), tf.minimum(ox, tf.cast(spare[1], tf.int32))
    image = image[oy:oy + size, ox:ox + size]
    offset = tf.cast(tf.stack([ox, oy, ox, oy]), tf.float32)
    boxes = boxes - offset
  return _network_example(image, boxes, classes, decoded, config)


def _eval_resize(image, config: InputConfig):
  """The deterministic resize of evaluation.

  Returns:
    `(resized, scale, original_size)`: the image resized (float32, not yet
    normalized or padded), network pixels per original pixel (float32) and
    the (height, width) of `image` (int32 [2]).
  """
  shape = tf.shape(image)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = _resize_scale(h, w, config)
  return _resize(image, scale), tf.cast(scale, tf.float32), tf.cast(shape[:2], tf.int32)


def eval_transform(decoded: dict[str, tf.Tensor], config: InputConfig) -> dict[str, tf.Tensor]:
  """Deterministic resize, normalize, pad: one evaluation example."""
  image, scale, original_size = _eval_resize(decoded["image"], config)
  return {
      **_network_example(image, decoded["boxes"] * scale, decoded["classes"], decoded, config),
      "image_id": decoded["image_id"],
      "original_size": original_size,
      "scale": scale,
      "is_padding": tf.constant(False),
  }


def make_eval_preprocessor(
    config: InputConfig) -> Callable[[np.ndarray], tuple[np.ndarray, np.float32, np.ndarray]]:
  """The image pre-processing of evaluation, for images that are not in a dataset.

  The returned function maps a uint8 [h, w, 3] RGB image to `(image, scale,
  original_size)`: float32 [H, W, 3] resized, normalized and zero padded to
  `config.padded_size`, float32 network pixels per original pixel, and int32
  [2] (h, w). These are the `images`, `scale` and `original_size` that the
  evaluation batches hold for the same stored image, from the same code (one
  `tf.function`, traced once for images of any size).
  """

  @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
  def preprocess(image):
    resized, scale, original_size = _eval_resize(image, config)
    return _normalize_and_pad(resized, config), scale, original_size

  def call(image: np.ndarray) -> tuple[np.ndarray, np.float32, np.ndarray]:
    image, scale, original_size = preprocess(image)
    return image.numpy(), scale.numpy(), original_size.numpy()

  return call
