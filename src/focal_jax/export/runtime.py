"""Runs a focal_jax export (shipped beside it as detect.py): no focal_jax needed.

    from detect import load
    detector = load("exported/demo")        # the export folder, with metadata.json
    results = detector(images)              # uint8 [N, H, W, 3] RGB at the export size, any N
    results[0]["boxes"], results[0]["scores"], results[0]["class_names"]

    python detect.py exported/demo photo.png ...   # prints the detections as JSON (needs Pillow)

Needs NumPy and the runtime of the export's format: jax (stablehlo),
tensorflow (saved_model), ai-edge-litert or tensorflow (tflite). A fixed
batch is padded with blank images and their results dropped, so any number
of images can be passed. Images of another size or type are refused.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


class Detector:
  """An export loaded with its format's runtime; call it on a batch of images."""

  def __init__(self, folder):
    self.folder = Path(folder)
    self.metadata = json.loads((self.folder / "metadata.json").read_text())
    batch, height, width, _ = self.metadata["input"]["shape"]
    self.batch_size, self.image_size = batch, (height, width)
    self.class_names = [entry["name"] for entry in self.metadata["classes"]]
    self.class_ids = [entry["id"] for entry in self.metadata["classes"]]
    self._run = _RUNNERS[self.metadata["format"]](self.folder / self.metadata["artifact"])

  def __call__(self, images) -> list[dict]:
    """Per image: boxes float32 [n, 4] (x1, y1, x2, y2 in its pixels), scores, classes, class_names, class_ids."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (*self.image_size, 3):
      raise ValueError(f"expected uint8 RGB images [N, {self.image_size[0]}, {self.image_size[1]}, 3]; got "
                       f"{images.dtype} {list(images.shape)}.")
    step = self.batch_size or max(len(images), 1)
    results = []
    for start in range(0, len(images), step):
      chunk = images[start:start + step]
      count = len(chunk)
      if self.batch_size and count < self.batch_size:
        chunk = np.concatenate([chunk, np.zeros((self.batch_size - count, *chunk.shape[1:]), np.uint8)])
      outputs = self._run(chunk)
      for i in range(count):
        kept = int(outputs["num_detections"][i])
        classes = np.asarray(outputs["classes"][i, :kept], np.int32)
        results.append({"boxes": np.asarray(outputs["boxes"][i, :kept], np.float32),
                        "scores": np.asarray(outputs["scores"][i, :kept], np.float32), "classes": classes,
                        "class_names": [self.class_names[c] for c in classes],
                        "class_ids": [self.class_ids[c] for c in classes]})
    return results


def _stablehlo(path: Path):
  import jax  # pylint: disable=g-import-not-at-top

  exported = jax.export.deserialize(bytearray(path.read_bytes()))
  return lambda images: {name: np.asarray(value) for name, value in exported.call(images).items()}


def _saved_model(path: Path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  serve = tf.saved_model.load(str(path)).signatures["serving_default"]
  return lambda images: {name: value.numpy() for name, value in serve(images=tf.constant(images)).items()}


def _tflite(path: Path):
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    from tensorflow.lite import Interpreter  # pylint: disable=g-import-not-at-top

  runner = Interpreter(model_path=str(path)).get_signature_runner("serving_default")
  return lambda images: runner(images=images)


_RUNNERS = {"stablehlo": _stablehlo, "saved_model": _saved_model, "tflite": _tflite}


def load(folder) -> Detector:
  """The export in `folder` (what `python -m focal_jax.export --out` wrote)."""
  return Detector(folder)


if __name__ == "__main__":
  from PIL import Image  # pylint: disable=g-import-not-at-top

  detector = load(sys.argv[1])
  pictures = np.stack([np.asarray(Image.open(name).convert("RGB")) for name in sys.argv[2:]])
  for name, result in zip(sys.argv[2:], detector(pictures)):
    print(json.dumps({"file_name": name, "detections": [
        {"box": box.tolist(), "score": float(score), "class_name": class_name}
        for box, score, class_name in zip(result["boxes"], result["scores"], result["class_names"])]}))
