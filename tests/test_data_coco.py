"""The input pipeline on COCO-shaped examples (`tfds.testing.mock_data` with consistent data)."""

import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from focal_jax import data as pipeline  # noqa: E402
from focal_jax.data.config import (  # noqa: E402
    COCO_2017_CATEGORY_IDS, COCO_2017_LABEL_MAP, InputConfig, coco_detectron2_config,
    coco_lsj_config)

# ImageNet per-channel mean and std in 0..255 pixels: what the pipelines normalize with.
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
GREY = 128


def _example(image, boxes_yxyx=(), labels=(), crowd=(), image_id=1, fmt="png"):
  """A coco/2017-shaped example: normalized (ymin, xmin, ymax, xmax) boxes."""
  n = len(labels)
  return {
      "image": image, "fmt": fmt,
      "image/filename": f"{image_id:012d}.jpg",
      "image/id": image_id,
      "objects": {
          "id": np.arange(1, n + 1, dtype=np.int64) + 1000 * image_id,
          "area": np.full([n], 100, np.int64),
          "bbox": np.asarray(boxes_yxyx, np.float32).reshape(n, 4),
          "label": np.asarray(labels, np.int64),
          "is_crowd": np.asarray(crowd if len(crowd) else [False] * n, bool),
      },
  }


def _as_dataset_fn(examples):
  """A replacement for the builders' `as_dataset` yielding `examples` (images encoded when asked)."""

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
    del split, read_config, shuffle_files, kwargs
    skip = decoders is not None and isinstance(decoders.get("image"), tfds.decode.SkipDecoding)
    spec = self.info.features.get_tensor_spec()
    if skip:
      spec["image"] = tf.TensorSpec([], tf.string)

    def gen():
      for ex in examples:
        out = {k: v for k, v in ex.items() if k != "fmt"}
        image = ex["image"]
        if skip and not isinstance(image, bytes):
          encode = tf.io.encode_png if ex["fmt"] == "png" else tf.io.encode_jpeg
          image = encode(image).numpy()
        elif not skip and isinstance(image, bytes):
          image = tf.io.decode_image(image, channels=3).numpy()
        out["image"] = image
        yield out

    return tf.data.Dataset.from_generator(gen, output_signature=spec)

  return as_dataset


def _rect_image(h, w, box_xyxy, colour):
  image = np.full([h, w, 3], GREY, np.uint8)
  x1, y1, x2, y2 = box_xyxy
  image[y1:y2, x1:x2] = colour
  return image


def _rect_examples(n=12, seed=0):
  rng = np.random.default_rng(seed)
  examples = []
  for i in range(n):
    h, w = int(rng.integers(60, 200)), int(rng.integers(60, 200))
    bw, bh = int(rng.integers(10, w // 2)), int(rng.integers(10, h // 2))
    x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
    box = (x1, y1, x1 + bw, y1 + bh)
    image = _rect_image(h, w, box, (230, 20, 40))
    examples.append(_example(image, [(y1 / h, x1 / w, (y1 + bh) / h, (x1 + bw) / w)], [i % 80],
                             image_id=i + 1))
  return examples


def _matching_box(image_normalized, colour=(230, 20, 40)):
  """Tight box of the pixels more rectangle than grey (bilinear puts the 50% level on the edge)."""
  pixels = image_normalized * STD + MEAN
  direction = np.array(colour, np.float32) - GREY
  alpha = (pixels - GREY) @ direction / (direction @ direction)
  match = alpha > 0.5
  if not match.any():
    return None
  rows, cols = np.flatnonzero(match.any(1)), np.flatnonzero(match.any(0))
  return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


@pytest.mark.parametrize("config", [
    coco_lsj_config(image_size=128, batch_size=4, shuffle_buffer=16),
    coco_detectron2_config(short_side_choices=(96, 128, 160), max_size=200, batch_size=4,
                           shuffle_buffer=16),
], ids=["square_lsj", "short_side"])
def test_boxes_move_with_the_pixels(config):
  """Random flip + resize (+ crop): the box of the rectangle's pixels is the target box."""
  examples = _rect_examples()
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(examples)):
    with pipeline.build_train_dataset(config, process_index=0, process_count=1) as it:
      batches = [next(it) for _ in range(6)]  # 2 epochs of 3 batches
  size = config.padded_size
  checked = 0
  for batch in batches:
    assert batch["images"].shape == (4, *size, 3) and batch["images"].dtype == np.float32
    for b in range(4):
      found = _matching_box(batch["images"][b])
      valid = batch["valid"][b]
      assert valid.sum() <= 1
      if found is None:  # the crop left nothing (or only a sliver blended at the edge)
        assert not valid.any() or np.prod(batch["boxes"][b][0, 2:] - batch["boxes"][b][0, :2]) < 4
        continue
      assert valid[0]
      np.testing.assert_allclose(batch["boxes"][b][0], found, atol=1.5)
      checked += 1
  assert checked >= 12


def test_train_batches_from_coco_shaped_examples():
  rng = np.random.default_rng(1)
  many = [(y, x, y + 0.02 + 0.01 * k, x + 0.02 + 0.01 * k)
          for k, (y, x) in enumerate(rng.uniform(0, 0.5, size=(15, 2)))]
  examples = [
      _example(rng.integers(0, 255, (120, 160, 3), np.uint8),
               [(0.1, 0.1, 0.5, 0.6), (0.2, 0.2, 0.9, 0.9)], [0, 79], [False, True], 1, "jpeg"),
      _example(rng.integers(0, 255, (90, 70, 3), np.uint8), image_id=2, fmt="jpeg"),  # no objects
      _example(rng.integers(0, 255, (100, 100, 3), np.uint8), many, list(range(15)), image_id=3),
      _example(rng.integers(0, 255, (80, 120, 3), np.uint8),
               [(0.1, 0.5, 0.6, 1.3), (0.6, 0.2, 0.4, 0.5), (0.3, 0.3, 0.3, 0.6), (0.0, 0.0, 0.5, 0.5)],
               [1, 2, 3, 4], image_id=4),  # reaches outside; inverted; zero area; fine
      _example(b"this is not an image", [(0.1, 0.1, 0.2, 0.2)], [0], image_id=5),
      _example(rng.integers(0, 255, (64, 64, 3), np.uint8), [(0.1, 0.1, 0.9, 0.9)], [11],
               image_id=6, fmt="jpeg"),
  ]
  config = coco_lsj_config(image_size=96, scale_range=(1.0, 1.0), flip_prob=0.0, max_boxes=10,
                           batch_size=5, shuffle_buffer=1)
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(examples)):
    with pipeline.build_train_dataset(config, process_index=0, process_count=1) as it:
      assert it.num_examples == 6 and it.steps_per_epoch == 1
      batch = next(it)
  assert batch["images"].shape == (5, 128, 128, 3) and batch["images"].dtype == np.float32
  assert batch["boxes"].shape == (5, 10, 4) and batch["boxes"].dtype == np.float32
  assert batch["classes"].shape == (5, 10) and batch["classes"].dtype == np.int32
  assert batch["valid"].shape == (5, 10) and batch["valid"].dtype == np.bool_
  counts = batch["valid"].sum(1).tolist()
  # shuffle_buffer=1 keeps the order; the corrupt image 5 is skipped.
  assert counts == [1, 0, 10, 2, 1]
  assert it.stats == {"examples_skipped": 1, "boxes_clipped": 1, "boxes_invalid": 2,
                      "boxes_over_max": 5}
  # Image 1 (120x160 -> 72x96): crowd dropped; box (0.1, 0.1, 0.5, 0.6) yxyx normalized.
  np.testing.assert_allclose(batch["boxes"][0, 0], [0.1 * 96, 0.1 * 72, 0.6 * 96, 0.5 * 72], atol=1e-3)
  assert batch["classes"][0, 0] == 0
  # Image 3: the 10 largest of 15, largest first.
  kept = batch["boxes"][2][batch["valid"][2]]
  areas = (kept[:, 2] - kept[:, 0]) * (kept[:, 3] - kept[:, 1])
  assert np.all(np.diff(areas) <= 1e-3)
  assert sorted(batch["classes"][2][batch["valid"][2]].tolist()) == list(range(5, 15))
  # Image 4 (80x120 -> 64x96): clipped at x = 1.0 and kept; inverted and empty dropped.
  np.testing.assert_allclose(batch["boxes"][3, 0], [0.5 * 96, 0.1 * 64, 96, 0.6 * 64], atol=1e-3)
  # The padding of the image is zeros (normalized mean colour), pixels are normalized.
  assert np.all(batch["images"][0, 72:] == 0) and np.all(batch["images"][0, :, 96:] == 0)
  assert -2.2 < batch["images"].min() and batch["images"].max() < 2.7


def test_eval_batches_short_side_keep_everything():
  examples = [
      _example(np.full((100, 150, 3), 7, np.uint8), [(0.2, 0.1, 0.6, 0.4)], [11], image_id=42),
      _example(np.full((150, 100, 3), 9, np.uint8), image_id=43),
      _example(np.full((50, 50, 3), 9, np.uint8), [(0.0, 0.0, 1.0, 1.0)], [0], [True], 44),
  ]
  config = InputConfig(dataset="coco/2017", resize="short_side", eval_short_side=80,
                       max_size=100, size_divisibility=64, eval_batch_size=2)
  assert config.padded_size == (128, 128)
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(examples)):
    ev = pipeline.build_eval_dataset(config, process_index=0, process_count=1)
    batches = list(ev)
  assert len(batches) == len(ev) == 2
  b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
  assert b["image_id"].dtype == np.int64 and b["original_size"].dtype == np.int32
  assert b["scale"].dtype == np.float32 and b["is_padding"].dtype == np.bool_
  np.testing.assert_array_equal(b["image_id"], [42, 43, 44, -1])
  np.testing.assert_array_equal(b["is_padding"], [False, False, False, True])
  np.testing.assert_array_equal(b["original_size"][:3], [[100, 150], [150, 100], [50, 50]])
  # min(short / min side, max_size / max side): 100/150, 100/150, 80/50
  np.testing.assert_allclose(b["scale"][:3], [2 / 3, 2 / 3, 1.6], rtol=1e-6)
  np.testing.assert_allclose(b["boxes"][0, 0], np.array([15, 20, 60, 60]) * (2 / 3), atol=1e-3)
  assert b["classes"][0, 0] == 11
  assert b["valid"].sum(1).tolist() == [1, 0, 0, 0]  # the crowd box is no target
  # 100x150 -> 67x100 resized content, the rest is zero padding
  assert np.all(b["images"][0, 67:] == 0) and np.all(b["images"][0, :, 100:] == 0)
  assert np.all(b["images"][0, :67, :100] != 0)


def test_a_split_without_one_decodable_batch_is_an_error():
  examples = [_example(b"not an image", [(0.1, 0.1, 0.2, 0.2)], [0], image_id=i) for i in range(1, 5)]
  config = coco_lsj_config(image_size=64, batch_size=2, shuffle_buffer=4)
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(examples)):
    with pipeline.build_train_dataset(config, process_index=0, process_count=1) as it:
      with pytest.raises(ValueError, match="epoch 0 has not one batch of 2 decodable examples"):
        next(it)


def test_coco_ground_truth_json():
  examples = [
      _example(np.zeros((100, 200, 3), np.uint8), [(0.2, 0.1, 0.6, 0.4), (0.0, 0.0, 1.0, 1.0)],
               [11, 0], [False, True], image_id=42, fmt="jpeg"),
      _example(np.zeros((50, 60, 3), np.uint8), image_id=7),
  ]
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(examples)):
    gt = pipeline.coco_ground_truth(InputConfig(dataset="coco/2017"))
  assert gt["images"] == [
      {"id": 42, "height": 100, "width": 200, "file_name": "000000000042.jpg"},
      {"id": 7, "height": 50, "width": 60, "file_name": "000000000007.jpg"}]
  a, c = gt["annotations"]
  assert a["category_id"] == 13 and a["iscrowd"] == 0 and a["image_id"] == 42  # stop sign
  np.testing.assert_allclose(a["bbox"], [20, 20, 60, 40], atol=1e-3)
  assert c["category_id"] == 1 and c["iscrowd"] == 1
  assert len(gt["categories"]) == 80 and gt["categories"][11] == {
      "id": 13, "name": "stop sign", "supercategory": "none"}


def test_coco_label_map():
  ids = COCO_2017_CATEGORY_IDS
  assert len(ids) == 80 == len(set(ids)) and list(ids) == sorted(ids)
  assert ids[0] == 1 and ids[-1] == 90
  assert {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}.isdisjoint(ids)
  assert COCO_2017_LABEL_MAP.num_classes == 80
  assert COCO_2017_LABEL_MAP.names[0] == "person" and COCO_2017_LABEL_MAP.names[-1] == "toothbrush"


def test_missing_coco_is_one_clear_error(tmp_path):
  config = InputConfig(dataset="coco/2017", data_dir=str(tmp_path))
  with pytest.raises(pipeline.DatasetNotFoundError) as info:
    pipeline.build_train_dataset(config, process_index=0, process_count=1)
  message = str(info.value)
  assert str(tmp_path) in message and "tfds build coco/2017" in message
  assert info.value.__cause__ is None and info.value.__suppress_context__
  with pytest.raises(pipeline.DatasetNotFoundError):
    pipeline.build_eval_dataset(config, process_index=0, process_count=1)
  with pytest.raises(pipeline.DatasetNotFoundError, match="no_such_dataset"):
    pipeline.build_eval_dataset(InputConfig(dataset="no_such_dataset", data_dir=str(tmp_path),
                                            label_map=COCO_2017_LABEL_MAP),
                                process_index=0, process_count=1)


def test_padded_sizes():
  assert coco_lsj_config().padded_size == (640, 640)
  assert coco_lsj_config(image_size=1024).padded_size == (1024, 1024)
  assert coco_detectron2_config().padded_size == (1408, 1408)
  assert InputConfig(image_size=600).padded_size == (640, 640)


def test_pipelines_run_without_autotuning():
  # An autotuned iterator waits for its tuning thread when destroyed, which stalls
  # every epoch end beside a busy train step. -1 parallel calls means one per core.
  config = coco_lsj_config(image_size=64, batch_size=2, shuffle_buffer=4, num_parallel_calls=-1)
  with tfds.testing.mock_data(as_dataset_fn=_as_dataset_fn(_rect_examples(4))):
    evaluation = pipeline.build_eval_dataset(config, process_index=0, process_count=1)
    with pipeline.build_train_dataset(config, process_index=0, process_count=1) as train:
      for ds in (train.epoch_dataset(0), evaluation.dataset()):
        assert ds.options().autotune.enabled is False
        assert ds.options().deterministic is True
      assert next(train)["images"].shape == (2, *config.padded_size, 3)
  for bad in (0, -2):
    with pytest.raises(ValueError, match="num_parallel_calls"):
      InputConfig(num_parallel_calls=bad)


def test_drawing_loads_no_tensorflow():
  """focal_jax.visualize draws (and denormalizes network inputs) without importing TensorFlow."""
  check = """
import sys
import numpy as np
from focal_jax.visualize import draw_detections, eval_batch_figure
draw_detections(np.zeros((16, 16, 3), np.uint8), [[2, 2, 10, 10]], [0.9], ["cat"])
batch = {"images": np.zeros((1, 8, 8, 3), np.float32), "boxes": np.zeros((1, 1, 4), np.float32),
         "classes": np.zeros((1, 1), np.int32), "valid": np.zeros((1, 1), bool),
         "scale": np.ones(1, np.float32), "original_size": np.full((1, 2), 8, np.int32),
         "is_padding": np.zeros(1, bool)}
detections = {"boxes": np.zeros((1, 1, 4), np.float32), "scores": np.zeros((1, 1), np.float32),
              "classes": np.zeros((1, 1), np.int32), "valid": np.zeros((1, 1), bool)}
assert eval_batch_figure(batch, detections, ["cat"]) is not None
assert "tensorflow" not in sys.modules, "tensorflow was imported"
"""
  subprocess.run([sys.executable, "-c", check], check=True)


def test_tensorflow_sees_no_accelerators():
  # Importing the pipelines hid them; calling it again is harmless.
  pipeline.hide_accelerators_from_tf()
  pipeline.hide_accelerators_from_tf()
  assert tf.config.get_visible_devices("GPU") == [] and tf.config.get_visible_devices("TPU") == []
