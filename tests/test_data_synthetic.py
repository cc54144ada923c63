"""synthetic_shapes: the TFDS builder and the input pipeline on it (tiny config)."""

import dataclasses
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from focal_jax import data as pipeline  # noqa: E402
from focal_jax.data import synthetic_shapes  # noqa: E402
from focal_jax.data.config import synthetic_shapes_config  # noqa: E402

# ImageNet per-channel mean and std in 0..255 pixels: what the pipelines normalize with.
MEAN = np.float32([0.485 * 255, 0.456 * 255, 0.406 * 255])
STD = np.float32([0.229 * 255, 0.224 * 255, 0.225 * 255])
NOISE = synthetic_shapes.RenderConfig().pixel_noise


def _config(data_dir, **kw):
  base = dict(dataset="synthetic_shapes/tiny", data_dir=data_dir, batch_size=8,
              shuffle_buffer=64, auto_prepare=False)
  return synthetic_shapes_config(**{**base, **kw})


def _stored_examples(data_dir, split):
  builder = synthetic_shapes.SyntheticShapes(data_dir=data_dir, config="tiny")
  return list(builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator())


def _pixel_boxes(example):
  h, w = example["image"].shape[:2]
  ymin, xmin, ymax, xmax = example["objects"]["bbox"].T
  return np.stack([xmin * w, ymin * h, xmax * w, ymax * h], axis=1)


def test_features_are_those_of_coco_2017(synthetic_data_dir, tmp_path):
  ours = synthetic_shapes.SyntheticShapes(data_dir=synthetic_data_dir, config="tiny")
  coco = tfds.builder("coco/2017", data_dir=str(tmp_path))  # info only, nothing downloaded
  assert ours.info.features.get_tensor_info() == coco.info.features.get_tensor_info()
  assert ours.info.features["objects"]["label"].num_classes == 80
  assert ours.info.splits["train"].num_examples == 32
  assert ours.info.splits["validation"].num_examples == 16
  assert ours.info.file_format.value == "tfrecord"


def test_split_contents(synthetic_data_dir):
  examples = _stored_examples(synthetic_data_dir, "train") + _stored_examples(
      synthetic_data_dir, "validation")
  ids = [int(e["image/id"]) for e in examples]
  assert len(set(ids)) == len(ids)
  num_objects = [len(e["objects"]["label"]) for e in examples]
  assert min(num_objects) == 0  # some negatives
  assert sum(e["objects"]["is_crowd"].any() for e in examples) >= 1
  labels = np.concatenate([e["objects"]["label"] for e in examples])
  assert set(labels.tolist()) == {0, 1, 2, 3}
  for e in examples:
    assert e["image"].shape == (128, 128, 3) and e["image"].dtype == np.uint8
    boxes = _pixel_boxes(e)
    sides = np.concatenate([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    crowd = e["objects"]["is_crowd"]
    single = np.concatenate([(boxes[:, 2] - boxes[:, 0])[~crowd], (boxes[:, 3] - boxes[:, 1])[~crowd]])
    assert np.all(sides > 0)
    assert np.all((single >= 9) & (single <= 91))  # 10-90 px objects (pixel-rounded)
    assert np.all(e["objects"]["area"] > 0)
    assert np.all(e["objects"]["area"] <= (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) + 1e-3)


def test_boxes_enclose_their_shapes(synthetic_data_dir):
  """Pixels of an object's colour lie inside its stored box; for an object that no
  other box touches, their tight box is the stored box."""
  tiny = synthetic_shapes.SyntheticShapes.builder_configs["tiny"]
  checked_tight = set()
  for split in ("train", "validation"):
    for example in _stored_examples(synthetic_data_dir, split):
      # TFDS stores examples in a hashed order; the image id says which one it is.
      i = int(example["image/id"]) - synthetic_shapes.SPLIT_CODES[split] * synthetic_shapes.IMAGE_ID_STRIDE - 1
      pixels, rendered = synthetic_shapes.render_split_example(tiny, split, i)
      np.testing.assert_array_equal(example["image"], pixels)  # lossless PNG of image i, rendered here alone
      image = example["image"].astype(np.int32)
      boxes = np.rint(_pixel_boxes(example)).astype(int)
      assert len(rendered) == len(boxes)
      for k, (obj, (x1, y1, x2, y2)) in enumerate(zip(rendered, boxes)):
        if example["objects"]["is_crowd"][k]:
          continue
        matches = np.abs(image - obj["colour"].astype(np.int32)).max(-1) <= NOISE
        inside = matches[y1:y2, x1:x2].sum()
        # At least half of the shape is visible.
        assert inside >= 0.5 * example["objects"]["area"][k], (split, i, k)
        # Nothing of that colour in the 2-pixel ring just outside the box,
        # except where another object's box reaches (it may share the colour).
        ring = np.zeros(matches.shape, bool)
        ring[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2] = True
        ring[y1:y2, x1:x2] = False
        others = np.zeros(matches.shape, bool)
        for j, (a1, b1, a2, b2) in enumerate(boxes):
          if j != k:
            others[b1:b2, a1:a2] = True
        assert not (matches & ring & ~others).any(), (split, i, k)
        touched = any(j != k and a1 < x2 + 2 and x1 - 2 < a2 and b1 < y2 + 2 and y1 - 2 < b2
                      for j, (a1, b1, a2, b2) in enumerate(boxes))
        if not touched:
          window = matches[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2]
          rows, cols = np.flatnonzero(window.any(1)), np.flatnonzero(window.any(0))
          ox, oy = max(x1 - 2, 0), max(y1 - 2, 0)
          tight = (cols[0] + ox, rows[0] + oy, cols[-1] + 1 + ox, rows[-1] + 1 + oy)
          assert tight == (x1, y1, x2, y2), (split, i, k)
          checked_tight.add(int(example["objects"]["label"][k]))
  assert checked_tight == {0, 1, 2, 3}


def _record_bytes(data_dir, config_name):
  folder = pathlib.Path(data_dir) / "synthetic_shapes" / config_name / "1.0.0"
  files = sorted(folder.glob("*.tfrecord*"))
  assert files
  return [f.read_bytes() for f in files]


def test_two_builds_with_one_seed_are_identical(synthetic_data_dir, tmp_path):
  synthetic_shapes.prepare(str(tmp_path / "a"), "tiny", verbose=False)
  assert _record_bytes(tmp_path / "a", "tiny") == _record_bytes(synthetic_data_dir, "tiny")
  other = dataclasses.replace(synthetic_shapes.SyntheticShapes.builder_configs["tiny"],
                              name="tiny_seed1", seed=1)
  synthetic_shapes.prepare(str(tmp_path / "b"), other, verbose=False)
  assert _record_bytes(tmp_path / "b", "tiny_seed1") != _record_bytes(synthetic_data_dir, "tiny")


def _denormalize(images):
  return images * STD + MEAN


def _first_batches(config, n, **kw):
  with pipeline.build_train_dataset(config, process_index=0, process_count=1, **kw) as it:
    return [next(it) for _ in range(n)]


def test_train_batches_shapes_and_padding(synthetic_data_dir):
  cfg = _config(synthetic_data_dir, max_boxes=8)
  batch = _first_batches(cfg, 1)[0]
  assert batch["images"].shape == (8, 128, 128, 3) and batch["images"].dtype == np.float32
  assert batch["boxes"].shape == (8, 8, 4) and batch["boxes"].dtype == np.float32
  assert batch["classes"].shape == (8, 8) and batch["classes"].dtype == np.int32
  assert batch["valid"].shape == (8, 8) and batch["valid"].dtype == np.bool_
  assert set(batch) == {"images", "boxes", "classes", "valid"}
  valid = batch["valid"]
  # Valid entries come first; padding is zeros with class -1.
  assert np.all(np.sort(valid, axis=1)[:, ::-1] == valid)
  assert np.all(batch["boxes"][~valid] == 0) and np.all(batch["classes"][~valid] == -1)
  assert np.all((batch["classes"][valid] >= 0) & (batch["classes"][valid] < 4))
  b = batch["boxes"][valid]
  assert np.all((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])) and np.all((b >= 0) & (b <= 128))


def test_flip_moves_boxes_with_pixels(synthetic_data_dir):
  plain = _first_batches(_config(synthetic_data_dir, flip_prob=0.0), 2)
  flipped = _first_batches(_config(synthetic_data_dir, flip_prob=1.0), 2)
  for p, f in zip(plain, flipped):
    np.testing.assert_array_equal(f["images"], p["images"][:, :, ::-1])
    np.testing.assert_array_equal(f["valid"], p["valid"])
    w = 128.0
    x1, y1, x2, y2 = np.moveaxis(p["boxes"], -1, 0)
    expected = np.stack([w - x2, y1, w - x1, y2], -1)
    np.testing.assert_allclose(f["boxes"][p["valid"]], expected[p["valid"]], atol=1e-4)


def test_vertical_flip_and_transpose_move_boxes_with_pixels(synthetic_data_dir):
  plain = _first_batches(_config(synthetic_data_dir, flip_prob=0.0), 2)
  flipped = _first_batches(_config(synthetic_data_dir, flip_prob=0.0, vertical_flip_prob=1.0), 2)
  transposed = _first_batches(_config(synthetic_data_dir, flip_prob=0.0, transpose_prob=1.0), 2)
  # Transpose, then flip left-right: a quarter turn clockwise (np.rot90 with k=-1).
  turned = _first_batches(_config(synthetic_data_dir, flip_prob=1.0, transpose_prob=1.0), 2)
  h = w = 128.0
  for p, f, t, r in zip(plain, flipped, transposed, turned):
    v = p["valid"]
    x1, y1, x2, y2 = np.moveaxis(p["boxes"], -1, 0)
    np.testing.assert_array_equal(f["images"], p["images"][:, ::-1])
    np.testing.assert_allclose(f["boxes"][v], np.stack([x1, h - y2, x2, h - y1], -1)[v], atol=1e-4)
    np.testing.assert_array_equal(t["images"], p["images"].transpose(0, 2, 1, 3))
    np.testing.assert_allclose(t["boxes"][v], np.stack([y1, x1, y2, x2], -1)[v], atol=1e-4)
    np.testing.assert_array_equal(r["images"], np.rot90(p["images"], k=-1, axes=(1, 2)))
    np.testing.assert_allclose(r["boxes"][v], np.stack([w - y2, x1, w - y1, x2], -1)[v], atol=1e-4)
    for other in (f, t, r):
      np.testing.assert_array_equal(other["valid"], v)


def test_resize_scales_boxes_and_pixels(synthetic_data_dir):
  plain = _first_batches(_config(synthetic_data_dir, flip_prob=0.0), 1)[0]
  half = _first_batches(_config(synthetic_data_dir, flip_prob=0.0, scale_range=(0.5, 0.5)), 1)[0]
  np.testing.assert_array_equal(half["valid"], plain["valid"])
  v = plain["valid"]
  # At scale 1 the targets are the stored (non-crowd) boxes themselves.
  stored = np.concatenate([_pixel_boxes(e)[~e["objects"]["is_crowd"]]
                           for e in _stored_examples(synthetic_data_dir, "train")])
  for box in plain["boxes"][v]:
    assert np.abs(stored - box).max(axis=1).min() < 1e-4
  np.testing.assert_allclose(half["boxes"][v], plain["boxes"][v] * 0.5, atol=1e-4)
  # Bilinear halving (half-pixel centres) averages 2x2 blocks; the rest is zero padding.
  orig = _denormalize(plain["images"])
  block_mean = orig.reshape(8, 64, 2, 64, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(_denormalize(half["images"][:, :64, :64]), block_mean, atol=1e-2)
  assert np.all(half["images"][:, 64:] == 0) and np.all(half["images"][:, :, 64:] == 0)


def test_crowd_is_never_a_target_and_padding_invalid(synthetic_data_dir):
  m = 3  # tiny has images with 4 objects: the 3 largest are kept
  for split in ("train", "validation"):
    stored = {int(e["image/id"]): e for e in _stored_examples(synthetic_data_dir, split)}
    cfg = _config(synthetic_data_dir, eval_split=split, eval_batch_size=6, max_boxes=m)
    ev = pipeline.build_eval_dataset(cfg, process_index=0, process_count=1)
    seen = 0
    for batch in ev:
      for b in range(6):
        valid = batch["valid"][b]
        if batch["is_padding"][b]:
          assert batch["image_id"][b] == -1 and not valid.any()
          continue
        e = stored[int(batch["image_id"][b])]
        seen += 1
        crowd = e["objects"]["is_crowd"]
        boxes = _pixel_boxes(e)
        n = int((~crowd).sum())
        assert valid.sum() == min(n, m)
        assert np.all(valid[: valid.sum()])  # valid entries first
        assert np.all(batch["classes"][b][valid] >= 0)
        assert np.all(batch["classes"][b][~valid] == -1)
        assert np.all(batch["boxes"][b][~valid] == 0)
        got = batch["boxes"][b][valid]
        for cb in boxes[crowd]:
          assert not np.any(np.all(np.abs(got - cb) < 1e-3, axis=1))
        targets = boxes[~crowd]
        if n > m:  # the largest ones, largest first
          area = (targets[:, 2] - targets[:, 0]) * (targets[:, 3] - targets[:, 1])
          targets = targets[np.argsort(-area, kind="stable")[:m]]
          np.testing.assert_allclose(got, targets, atol=1e-3)
        for gb in targets:
          assert np.any(np.all(np.abs(got - gb) < 1e-3, axis=1))
    assert seen == len(stored)
    over = sum(max(int((~e["objects"]["is_crowd"]).sum()) - m, 0) for e in stored.values())
    assert ev.stats["boxes_over_max"] == over
    if split == "train":
      assert over > 0


def test_same_seed_same_batches_and_resume(synthetic_data_dir):
  cfg = _config(synthetic_data_dir, scale_range=(0.7, 1.3))
  first = _first_batches(cfg, 6)  # 4 steps per epoch: crosses into epoch 1
  again = _first_batches(cfg, 6)
  for a, b in zip(first, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  resumed = _first_batches(cfg, 2, start_step=4)
  for a, b in zip(first[4:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(first[0]["images"], first[4]["images"])  # epochs differ
  other = _first_batches(dataclasses.replace(cfg, seed=1), 1)[0]
  assert not np.array_equal(other["images"], first[0]["images"])


def test_train_stream_is_its_epochs_in_order(synthetic_data_dir):
  """The next epoch opened in the background changes no batch: the stream is epoch 0, 1, 2... as built."""
  cfg = _config(synthetic_data_dir, scale_range=(0.7, 1.3))
  with pipeline.build_train_dataset(cfg, process_index=0, process_count=1) as it:
    got = [next(it) for _ in range(2 * it.steps_per_epoch + 1)]
    epochs = [list(it.epoch_dataset(epoch).as_numpy_iterator()) for epoch in range(3)]
  expected = [batch for epoch in epochs for batch in epoch][:len(got)]
  for a, b in zip(got, expected):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="closed"):
    next(it)


def _nice_values():
  """{thread id: nice value} of this process's threads (Linux: the nice value is per thread)."""
  values = {}
  for tid in map(int, os.listdir("/proc/self/task")):
    try:
      values[tid] = os.getpriority(os.PRIO_PROCESS, tid)
    except OSError:  # the thread ended meanwhile
      pass
  return values


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
def test_train_pipeline_threads_run_nicer_than_the_process(synthetic_data_dir):
  own = os.getpriority(os.PRIO_PROCESS, 0)  # this thread's
  before = _nice_values()
  cfg = _config(synthetic_data_dir, train_nice=7)
  with pipeline.build_train_dataset(cfg, process_index=0, process_count=1) as it:
    for _ in range(it.steps_per_epoch + 1):  # the next epochs opened too
      next(it)
    started = {tid: nice for tid, nice in _nice_values().items() if tid not in before}
  assert len(started) >= 3  # the opener and tf.data's threads
  assert set(started.values()) == {min(own + 7, 19)}
  assert os.getpriority(os.PRIO_PROCESS, 0) == own  # the consumer's priority is the process's
  with pytest.raises(ValueError, match="train_nice"):
    _config(synthetic_data_dir, train_nice=20)


def test_per_process_shards_are_disjoint(synthetic_data_dir):
  cfg = _config(synthetic_data_dir, eval_split="train", eval_batch_size=5)
  ids, lengths = [], []
  for p in range(3):
    ev = pipeline.build_eval_dataset(cfg, process_index=p, process_count=3)
    lengths.append(len(ev))
    batches = list(ev)
    assert len(batches) == len(ev)
    got = np.concatenate([b["image_id"][~b["is_padding"]] for b in batches])
    ids.append(set(got.tolist()))
  assert lengths == [3, 3, 3]  # ceil(ceil(32 / 3) / 5)
  assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
  assert len(ids[0] | ids[1] | ids[2]) == 32
  first = []
  for p in range(2):
    with pipeline.build_train_dataset(_config(synthetic_data_dir), process_index=p, process_count=2) as train:
      assert train.num_examples == 16
      first.append(next(train)["images"])
  assert not np.array_equal(first[0], first[1])


def test_eval_round_trip_through_cocoeval(synthetic_data_dir, capsys):
  """Ground truth boxes from the eval pipeline, mapped back with `scale`, score AP 1."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top

  cfg = _config(synthetic_data_dir, resize="square", image_size=200, eval_batch_size=5)
  gt = pipeline.coco_ground_truth(cfg)
  assert len(gt["images"]) == 16
  assert {c["id"] for c in gt["categories"]} == {1, 2, 3, 4}
  assert any(a["iscrowd"] for a in gt["annotations"])
  detections = []
  for batch in pipeline.build_eval_dataset(cfg, process_index=0, process_count=1):
    assert np.all(batch["scale"][~batch["is_padding"]] == np.float32(200 / 128))
    np.testing.assert_array_equal(batch["original_size"][~batch["is_padding"]], 128)
    for b in np.flatnonzero(~batch["is_padding"]):
      for box, cls in zip(batch["boxes"][b][batch["valid"][b]], batch["classes"][b][batch["valid"][b]]):
        x1, y1, x2, y2 = box / batch["scale"][b]
        detections.append({"image_id": int(batch["image_id"][b]), "category_id": int(cls) + 1,
                           "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                           "score": 1.0})
  coco = COCO()
  coco.dataset = gt
  coco.createIndex()
  evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
  evaluator.evaluate()
  evaluator.accumulate()
  evaluator.summarize()
  capsys.readouterr()
  assert evaluator.stats[0] == pytest.approx(1.0)  # AP
  assert evaluator.stats[1] == pytest.approx(1.0)  # AP50


def _record_ends(data):
  """The offsets where the records of a TFRecord file end (each: 8-byte length, 4-byte CRC, data, 4-byte CRC)."""
  ends, position = [], 0
  while position < len(data):
    position += 8 + 4 + int.from_bytes(data[position:position + 8], "little") + 4
    ends.append(position)
  return ends


def _damaged_copy(data_dir, tmp_path, split, damage):
  """A copy of `data_dir` whose `split` record file is damaged: bytes overwritten mid-file, or cut short."""
  copy = shutil.copytree(data_dir, tmp_path / "damaged")
  (shard,) = copy.glob(f"synthetic_shapes/tiny/*/*-{split}.tfrecord-*")
  data = bytearray(shard.read_bytes())
  middle = len(data) // 2
  if damage == "overwritten":
    data[middle:middle + 8] = b"\xff" * 8
  elif damage == "cut_mid_record":
    del data[middle:]
  else:  # cut between two records: what is left reads without an error, but is short
    ends = _record_ends(data)
    del data[ends[len(ends) // 2]:]
  shard.write_bytes(data)
  return str(copy)


@pytest.mark.parametrize("damage", ["overwritten", "cut_mid_record", "cut_between_records"])
def test_a_damaged_record_file_raises_instead_of_shortening_the_data(synthetic_data_dir, tmp_path, damage):
  """Only an undecodable image is skipped; a record file that cannot be read is an error, at once."""
  train_dir = _damaged_copy(synthetic_data_dir, tmp_path / "train", "train", damage)
  with pipeline.build_train_dataset(_config(train_dir), process_index=0, process_count=1) as it:
    with pytest.raises(pipeline.DamagedDatasetError, match=r"train: reading its record files .* failed"):
      for _ in range(it.steps_per_epoch):
        next(it)
  eval_dir = _damaged_copy(synthetic_data_dir, tmp_path / "eval", "validation", damage)
  with pytest.raises(pipeline.DamagedDatasetError, match=r"validation: reading its record files"):
    list(pipeline.build_eval_dataset(_config(eval_dir), process_index=0, process_count=1))


def test_missing_synthetic_dataset_without_auto_prepare(tmp_path):
  cfg = _config(str(tmp_path / "empty"))
  with pytest.raises(pipeline.DatasetNotFoundError, match="empty"):
    pipeline.build_train_dataset(cfg, process_index=0, process_count=1)


def test_prepare_command_line(tmp_path, capsys):
  synthetic_shapes.main(["--data_dir", str(tmp_path), "--config", "tiny"])
  out = capsys.readouterr().out
  assert str(tmp_path) in out and "Built synthetic_shapes/tiny" in out
  synthetic_shapes.main(["--data_dir", str(tmp_path), "--config", "tiny"])
  assert "Already prepared" in capsys.readouterr().out


def test_eval_images_are_the_stored_pixels_normalized(synthetic_data_dir):
  """At the native size, each eval image is exactly NumPy's float32 `(pixels - mean) / std`."""
  cfg = _config(synthetic_data_dir, eval_batch_size=5)
  stored = {int(e["image/id"]): e["image"] for e in _stored_examples(synthetic_data_dir, "validation")}
  seen = 0
  for batch in pipeline.build_eval_dataset(cfg, process_index=0, process_count=1):
    for b in np.flatnonzero(~batch["is_padding"]):
      pixels = stored[int(batch["image_id"][b])].astype(np.float32)
      np.testing.assert_array_equal(batch["images"][b], (pixels - MEAN) / STD)
      seen += 1
  assert seen == 16


@pytest.mark.parametrize("resize", [
    dict(resize="square", image_size=200),  # 128x128 -> 200x200, padded to 256x256
    dict(resize="short_side", eval_short_side=100, max_size=160, size_divisibility=32),  # -> 100x100 in 160x160
], ids=["square", "short_side"])
def test_eval_preprocessor_matches_the_eval_batches(synthetic_data_dir, resize):
  """The pre-processing of prediction gives what the eval pipeline gives for the same stored image."""
  cfg = _config(synthetic_data_dir, eval_batch_size=5, **resize)
  preprocess = pipeline.make_eval_preprocessor(cfg)
  stored = {int(e["image/id"]): e["image"] for e in _stored_examples(synthetic_data_dir, "validation")}
  expected_scale = 200 / 128 if resize["resize"] == "square" else 100 / 128
  seen = 0
  for batch in pipeline.build_eval_dataset(cfg, process_index=0, process_count=1):
    for b in np.flatnonzero(~batch["is_padding"]):
      image, scale, original_size = preprocess(stored[int(batch["image_id"][b])])
      assert image.dtype == np.float32 and image.shape == (*cfg.padded_size, 3)
      assert scale.dtype == np.float32 and original_size.dtype == np.int32
      np.testing.assert_array_equal(image, batch["images"][b])
      assert scale == batch["scale"][b] == np.float32(expected_scale)
      np.testing.assert_array_equal(original_size, [128, 128])
      np.testing.assert_array_equal(original_size, batch["original_size"][b])
      seen += 1
  assert seen == 16
