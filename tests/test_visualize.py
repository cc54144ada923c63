import json

import numpy as np
import pytest
from PIL import Image

from focal_jax import visualize
from focal_jax.visualize import (class_color, compare_detections, draw_detections, eval_batch_figure,
                                 plot_training_curves)

RED = (255, 0, 0)


def test_draw_detections_outlines_the_box_inside_its_pixels():
  image = np.zeros((80, 100, 3), np.uint8)
  drawn = np.asarray(draw_detections(image, [[10, 20, 50, 60]], color=RED, line_width=2))
  assert drawn.shape == (80, 100, 3)
  rows, cols = slice(20, 60), slice(10, 50)
  for edge in (drawn[rows, 10], drawn[rows, 11], drawn[rows, 48], drawn[rows, 49],
               drawn[20, cols], drawn[21, cols], drawn[58, cols], drawn[59, cols]):
    assert (edge == RED).all()
  for outside in (drawn[rows, 9], drawn[rows, 50], drawn[19, cols], drawn[60, cols]):
    assert (outside == 0).all()
  assert (drawn[22:58, 12:48] == 0).all()  # the inside is untouched
  assert (image == 0).all()  # drawn on a copy


def test_draw_detections_labels_above_the_box_and_converts_grayscale():
  gray = np.full((80, 100), 40, np.uint8)
  drawn = np.asarray(draw_detections(gray, [[10, 40, 50, 70]], [0.9], ["cat"], line_width=1))
  color = class_color("cat")
  assert (drawn[55, 10] == color).all() and (drawn[55, 49] == color).all()
  label = drawn[25:40, 10:40].reshape(-1, 3)  # the label's strip sits just above the box
  assert (label == color).all(axis=1).mean() > 0.3
  assert (drawn[5, 80] == 40).all()
  with pytest.raises(ValueError, match="2 class names"):
    draw_detections(gray, [[0, 0, 5, 5]], class_names=["a", "b"])
  with pytest.raises(ValueError, match="uint8"):
    draw_detections(gray.astype(np.float32), [])


def test_compare_detections_puts_predictions_left_and_ground_truth_right():
  image = np.zeros((50, 60, 3), np.uint8)
  predictions = {"boxes": np.array([[5, 5, 30, 30], [0, 0, 60, 50]]), "scores": np.array([0.8, 0.1]),
                 "class_names": ["dog", "cat"]}
  ground_truth = {"boxes": np.array([[20, 10, 55, 45]]), "class_names": ["cat"]}
  figure = np.asarray(compare_detections(image, predictions, ground_truth, min_score=0.5))
  header, right = visualize._HEADER, 60 + visualize._GAP
  assert figure.shape == (50 + header, 2 * 60 + visualize._GAP, 3)
  assert (figure[header + 20, 5] == class_color("dog")).all()
  assert (figure[header + 45 - 1, 0] == 0).all()  # the 0.1 "cat" box is below min_score
  assert (figure[header + 30, right + 20] == class_color("cat")).all()
  assert (figure[header + 30, right + 5] == 0).all()  # no prediction on the ground truth side


def _eval_batch(names):
  from focal_jax.data import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

  pixels = np.full((2, 64, 64, 3), 100, np.float32)
  images = (pixels - np.asarray(IMAGENET_MEAN_RGB)) / np.asarray(IMAGENET_STD_RGB)
  images[:, :, 48:] = 0  # padding right of the 128x96 (h x w) image resized by 0.5 to 64x48
  boxes = np.zeros((2, 3, 4), np.float32)
  boxes[0, 0] = [30, 5, 46, 25]  # network-input pixels
  batch = {"images": images, "boxes": boxes, "classes": np.array([[1, -1, -1]] * 2, np.int32),
           "valid": np.array([[True, False, False]] * 2), "scale": np.array([0.5, 1.0], np.float32),
           "original_size": np.array([[128, 96], [0, 0]], np.int32), "is_padding": np.array([False, True])}
  detections = {"boxes": np.array([[[20, 40, 60, 80], [0, 0, 90, 120]]] * 2, np.float32),  # original pixels
                "scores": np.array([[0.9, 0.2]] * 2, np.float32), "classes": np.array([[0, 1]] * 2, np.int32),
                "valid": np.array([[True, True]] * 2)}
  return batch, detections


def test_eval_batch_figure_draws_predictions_and_truth_in_network_pixels():
  names = ("rectangle", "ellipse")
  batch, detections = _eval_batch(names)
  figure = np.asarray(eval_batch_figure(batch, detections, names, min_score=0.5, panel_size=128))
  # The 64x48 network image (padding cut off) at 2x; one row: the padding example is left out.
  header, right = visualize._HEADER, 96 + visualize._GAP
  assert figure.shape == (header + 128, 2 * 96 + visualize._GAP, 3)
  # The prediction (20, 40, 60, 80) in original pixels is (10, 20, 30, 40) in the network input: x2 in the panel.
  assert (figure[header + 60, 20] == class_color("rectangle")).all()
  assert (figure[header + 60, 59] == class_color("rectangle")).all()
  assert (figure[header + 60, 62] == 100).all()  # un-normalized background
  # The ground truth (30, 5, 46, 25) in network pixels.
  assert (figure[header + 44, right + 60] == class_color("ellipse")).all()  # below the label, inside the box
  assert (figure[header + 44, right + 91] == class_color("ellipse")).all()
  assert (figure[header + 44, right + 40] == 100).all()
  batch["is_padding"][:] = True
  assert eval_batch_figure(batch, detections, names) is None


def test_plot_training_curves_writes_a_png(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  lines = [{"step": s, "loss": 2.0 / s, "classification_loss": 1.5 / s, "box_loss": 0.5 / s,
            "images_per_second": 100.0} for s in range(1, 30)]
  lines += [{"step": 10, "eval/AP": 0.1, "eval/AP50": 0.3}, {"step": 29, "eval/AP": 0.2, "eval/AP50": 0.4}]
  metrics.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  plot_training_curves(metrics, tmp_path / "curves.png")
  with Image.open(tmp_path / "curves.png") as png:
    assert png.format == "PNG"
    pixels = np.asarray(png.convert("RGB")).reshape(-1, 3).astype(int)
  first_line_color = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first color: the plotted curves
  assert (np.abs(pixels - first_line_color).sum(axis=1) < 10).sum() > 100


def test_plot_training_curves_names_a_bad_line(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text('{"step": 1, "loss": 1.0}\nnot json\n')
  with pytest.raises(ValueError, match="metrics.jsonl:2"):
    plot_training_curves(metrics, tmp_path / "curves.png")
