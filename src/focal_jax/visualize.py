"""Pictures of detections and of training runs.

`draw_detections` draws boxes with class names and scores on an image (Pillow
only); `compare_detections` puts predictions beside the ground truth;
`eval_batch_figure` does so for the first images of an evaluation batch (what
training saves as `visuals/eval_N.png`); `plot_training_curves` plots a run's
`metrics.jsonl` (matplotlib, imported on first use, drawing with Agg and
leaving pyplot's global state alone).

Boxes are `(x1, y1, x2, y2)` in pixels of the image they are drawn on; a box
`(10, 20, 50, 60)` covers columns 10..49 and rows 20..59, and its outline is
drawn inside it.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence

import numpy as np

from focal_jax._extras import require
from focal_jax.data.config import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

Image = require("PIL.Image")
ImageDraw = require("PIL.ImageDraw")
ImageFont = require("PIL.ImageFont")

# Distinct, saturated colors; a class name always gets the same one.
_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))
_HEADER = 14  # pixels of the caption strip above each panel of `compare_detections`
_GAP = 4  # pixels between panels and rows

RGB = tuple[int, int, int]


def class_color(name: str) -> RGB:
  """The color of class `name` (stable across runs and processes)."""
  return _PALETTE[zlib.crc32(name.encode()) % len(_PALETTE)]


def as_rgb_array(image) -> np.ndarray:
  """A uint8 `[H, W, 3]` RGB array of a PIL image (any mode) or of a uint8 `[H, W(, 1 or 3)]` array.

  The one check of what counts as an image, shared by drawing and by
  `focal_jax.predict`: grayscale becomes three equal channels; a `[H, W, 3]`
  array comes back as it is (not copied).

  Raises:
    ValueError: another dtype or shape, or an image without pixels.
  """
  if isinstance(image, Image.Image):
    image = image.convert("RGB")
  array = np.asarray(image)
  if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))):
    raise ValueError(f"expected a uint8 image of shape [H, W], [H, W, 1] or [H, W, 3]; got {array.dtype} "
                     f"{array.shape}.")
  if array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f"expected an image with pixels; got shape {array.shape}.")
  if array.ndim == 2:
    array = array[..., None]
  return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def _label(name: str | None, score: float | None) -> str:
  parts = ([name] if name else []) + ([f"{score:.2f}"] if score is not None else [])
  return " ".join(parts)


def draw_detections(image, boxes, scores=None, class_names: Sequence[str] | None = None, *,
                    color: RGB | None = None, line_width: int | None = None) -> Image.Image:
  """Draws boxes, each with its class name and score, on a copy of `image`.

  Args:
    image: a PIL image or a uint8 `[H, W]`, `[H, W, 1]` or `[H, W, 3]` array.
    boxes: `[N, 4]` xyxy boxes in pixels of `image`; the outline,
      `line_width` pixels wide, lies inside each box (boxes under a pixel
      wide or high are not drawn).
    scores: `[N]` scores printed after the names, or None (ground truth).
    class_names: the class name of each box, or None.
    color: one RGB color for every box; None gives each class its own
      (`class_color`).
    line_width: outline width in pixels; None: 1 per 320 pixels of the
      image's longer side (at least 1). The label text is 1/64 of that side
      high (at least 10 pixels).

  Returns:
    A new RGB PIL image of the size of `image`.
  """
  canvas = Image.fromarray(as_rgb_array(image))  # a new image: `image` stays as it is
  longer_side = max(canvas.size)
  line_width = line_width or max(1, round(longer_side / 320))
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if scores is not None and len(scores) != len(boxes):
    raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores.")
  if class_names is not None and len(class_names) != len(boxes):
    raise ValueError(f"{len(boxes)} boxes but {len(class_names)} class names.")
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(max(10, round(longer_side / 64)))
  for i, box in enumerate(boxes):
    name = None if class_names is None else class_names[i]
    box_color = color or class_color(name or "")
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    if x2 <= x1 or y2 <= y1:
      continue
    draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=box_color, width=line_width)
    text = _label(name, None if scores is None else float(scores[i]))
    if text:
      left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
      height = bottom - top + 2
      y = y1 - height if y1 >= height else y1  # above the box, or inside it at the image's top
      draw.rectangle((x1, y, x1 + right - left + 3, y + height - 1), fill=box_color)
      draw.text((x1 + 2 - left, y + 1 - top), text, fill=_text_color(box_color), font=font)
  return canvas


def _text_color(background: RGB) -> RGB:
  luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
  return (0, 0, 0) if luminance > 150 else (255, 255, 255)


def _captioned(panel: Image.Image, caption: str) -> Image.Image:
  out = Image.new("RGB", (panel.width, panel.height + _HEADER), (255, 255, 255))
  out.paste(panel, (0, _HEADER))
  ImageDraw.Draw(out).text((2, 1), caption, fill=(0, 0, 0), font=ImageFont.load_default())
  return out


def _stack(images: Sequence[Image.Image], horizontal: bool) -> Image.Image:
  if horizontal:
    size = (sum(i.width for i in images) + _GAP * (len(images) - 1), max(i.height for i in images))
  else:
    size = (max(i.width for i in images), sum(i.height for i in images) + _GAP * (len(images) - 1))
  out = Image.new("RGB", size, (255, 255, 255))
  offset = 0
  for image in images:
    out.paste(image, (offset, 0) if horizontal else (0, offset))
    offset += (image.width if horizontal else image.height) + _GAP
  return out


def compare_detections(image, predictions: dict, ground_truth: dict, *, min_score: float = 0.0,
                       line_width: int | None = None) -> Image.Image:
  """Predictions (left) beside the ground truth (right), each on a copy of `image`.

  Args:
    image: a PIL image or a uint8 `[H, W(, 3)]` array.
    predictions: `{"boxes": [N, 4], "scores": [N], "class_names": [N]}` (what
      `focal_jax.predict.Predictor.predict` returns per image).
    ground_truth: `{"boxes": [M, 4], "class_names": [M]}`.
    min_score: predictions below this score are left out.
    line_width: outline width in pixels (None: as `draw_detections`).

  Returns:
    An RGB PIL image of two captioned panels.
  """
  scores = np.asarray(predictions["scores"], np.float64).reshape(-1)
  shown = np.flatnonzero(scores >= min_score)
  names = [predictions["class_names"][i] for i in shown]
  left = draw_detections(image, np.asarray(predictions["boxes"]).reshape(-1, 4)[shown], scores[shown], names,
                         line_width=line_width)
  right = draw_detections(image, ground_truth["boxes"], None, ground_truth["class_names"],
                          line_width=line_width)
  return _stack([_captioned(left, f"predictions ({len(shown)})"),
                 _captioned(right, f"ground truth ({len(ground_truth['class_names'])})")], horizontal=True)


def eval_batch_figure(batch: dict, detections: dict, class_names: Sequence[str], *, max_images: int = 4,
                      min_score: float = 0.3, panel_size: int = 320) -> Image.Image | None:
  """Predictions beside the ground truth for the first images of an evaluation batch.

  Args:
    batch: an evaluation batch of `focal_jax.data` (host NumPy): `images`
      (normalized, padded), `boxes`/`classes`/`valid` (network-input pixels),
      `scale`, `original_size` and `is_padding`.
    detections: host NumPy `boxes [B, D, 4]` (original-image pixels, as the
      predict step returns them), `scores`, `classes` and `valid` `[B, D]`.
    class_names: the name of each class index.
    max_images: at most this many (non-padding) images, one row each.
    min_score: predictions below this score are left out.
    panel_size: each image is resized so that its longer side has this many
      pixels.

  Returns:
    The figure, or None when the batch holds only padding.
  """
  rows = []
  for i in np.flatnonzero(~np.asarray(batch["is_padding"]))[:max_images]:
    scale = float(batch["scale"][i])
    padded_h, padded_w = batch["images"].shape[1:3]
    height = min(padded_h, max(1, int(round(batch["original_size"][i][0] * scale))))
    width = min(padded_w, max(1, int(round(batch["original_size"][i][1] * scale))))
    pixels = batch["images"][i, :height, :width] * np.asarray(IMAGENET_STD_RGB) + np.asarray(IMAGENET_MEAN_RGB)
    zoom = panel_size / max(height, width)
    image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    image = image.resize((max(1, round(width * zoom)), max(1, round(height * zoom))), Image.BILINEAR)
    kept = np.asarray(detections["valid"][i], bool)
    truth = np.asarray(batch["valid"][i], bool)
    predictions = {"boxes": detections["boxes"][i][kept] * scale * zoom, "scores": detections["scores"][i][kept],
                   "class_names": [class_names[c] for c in detections["classes"][i][kept]]}
    ground_truth = {"boxes": batch["boxes"][i][truth] * zoom,
                    "class_names": [class_names[c] for c in batch["classes"][i][truth]]}
    rows.append(compare_detections(image, predictions, ground_truth, min_score=min_score))
  return _stack(rows, horizontal=False) if rows else None


def _read_metrics(path: str | os.PathLike) -> dict[str, dict[int, float]]:
  """`{name: {step: value}}` of a metrics.jsonl; a step logged twice (a resumed run) keeps its last value."""
  series: dict[str, dict[int, float]] = {}
  with open(path) as file:
    for number, line in enumerate(file, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        step = int(record["step"])
      except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}:{number} is not a metrics line (JSON with a 'step'): {line.strip()[:80]}") \
            from None
      for name, value in record.items():
        if name != "step" and isinstance(value, (int, float)):
          series.setdefault(name, {})[step] = float(value)
  return series


def _plot(axes, series: dict[str, dict[int, float]], names: Sequence[str], title: str, markers: bool):
  axes.set_title(title)
  axes.set_xlabel("step")
  plotted = [name for name in names if series.get(name)]
  for name in plotted:
    steps = sorted(series[name])
    marker = "o" if markers or len(steps) == 1 else None  # a single point needs a marker to show
    axes.plot(steps, [series[name][s] for s in steps], marker=marker, label=name)
  if plotted:
    axes.legend()
    axes.grid(alpha=0.3)
  else:
    axes.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=axes.transAxes)


def plot_training_curves(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
  """Plots the losses and the COCO AP/AP50 of a run's metrics.jsonl against the step, as a PNG.

  Args:
    metrics_path: a `metrics.jsonl` as `focal_jax.engine.loop` writes it:
      lines `{"step", "loss", "classification_loss", "box_loss", ...}` and
      `{"step", "eval/AP", "eval/AP50", ...}`.
    png_path: where to write the figure.

  Raises:
    FileNotFoundError: no `metrics_path`.
    ValueError: a line of it is not a JSON object with a step.
  """
  Figure = require("matplotlib.figure").Figure  # pylint: disable=invalid-name

  series = _read_metrics(metrics_path)
  figure = Figure(figsize=(11, 4), layout="constrained")
  loss_axes, eval_axes = figure.subplots(1, 2)
  _plot(loss_axes, series, ("loss", "classification_loss", "box_loss"), "training losses", markers=False)
  _plot(eval_axes, series, ("eval/AP", "eval/AP50"), "COCO evaluation", markers=True)
  figure.savefig(png_path, dpi=100)
