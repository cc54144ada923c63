"""Folder datasets: a COCO-format folder -> TFDS -> the input pipelines, evaluation and fine-tuning."""

import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from focal_jax import data as pipeline  # noqa: E402
from focal_jax.data import coco_folder  # noqa: E402
from focal_jax.data.builders import get_builder  # noqa: E402
from focal_jax.data.config import InputConfig, LabelMap  # noqa: E402

NAME = "my_objects"
# Non-contiguous category ids, listed out of order: labels follow the ids (7 -> 0, 42 -> 1).
CATEGORIES = [{"id": 42, "name": "blue_box", "supercategory": "box"},
              {"id": 7, "name": "red_box", "supercategory": "box"}]
CLASS_OF = {7: 0, 42: 1}
COLOURS = {7: (220, 40, 40), 42: (40, 60, 220)}
BACKGROUND = (120, 130, 110)
REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Written:
  """What the test wrote for one image, and what the dataset must hold for it."""

  image_id: int
  file_name: str
  width: int
  height: int
  pixels: np.ndarray  # uint8 [H, W, 3] as a viewer shows it (EXIF orientation applied)
  lossless: bool
  boxes: list  # (annotation id, category id, [x, y, w, h] after clipping, iscrowd)


def _draw(width, height, boxes):
  pixels = np.empty((height, width, 3), np.uint8)
  pixels[:] = BACKGROUND
  for _, category, (x, y, w, h), _ in boxes:
    pixels[y:y + h, x:x + w] = COLOURS[category]
  return pixels


def _write_split(root, split, first_image_id, count, next_annotation_id):
  """Images of rectangles at known places, some stored in odd ways, and their COCO json."""
  folder = root / "images" / split
  (folder / "sub").mkdir(parents=True)
  coco = {"images": [], "annotations": [], "categories": CATEGORIES}
  written = []
  for i in range(count):
    image_id = first_image_id + i
    width, height = (96, 80) if i % 2 == 0 else (64, 64)
    odd_kinds = {3: "gray", 5: "rgba", 7: "exif"} if split == "train" else {}
    kind = odd_kinds.get(i, "png" if i % 2 == 0 else "jpeg")
    if kind == "exif":
      width, height = 48, 64  # as shown; stored as 64 x 48 with EXIF orientation 6
    boxes = [] if (split == "train" and i == 11) else [
        (next_annotation_id + 2 * i, 7, [4 + i, 6, 20, 16], 0),
        (next_annotation_id + 2 * i + 1, 42, [width - 30, height - 26 - i % 4, 24, 18], 0)]
    pixels = _draw(width, height, boxes)
    file_name = f"{'sub/' if i == 2 else ''}image_{i:02d}.{'jpg' if kind in ('jpeg', 'exif') else 'png'}"
    path = folder / file_name
    if kind == "gray":
      gray = pixels.mean(-1).astype(np.uint8)
      Image.fromarray(gray, "L").save(path)
      pixels = np.repeat(gray[..., None], 3, -1)
    elif kind == "rgba":
      alpha = np.full((height, width, 1), 128, np.uint8)
      Image.fromarray(np.concatenate([pixels, alpha], -1), "RGBA").save(path)
    elif kind == "exif":
      exif = Image.Exif()
      exif[0x0112] = 6  # shown rotated 90 degrees clockwise
      Image.fromarray(pixels).transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=95, exif=exif)
    elif kind == "jpeg":
      Image.fromarray(pixels).save(path, "JPEG", quality=95)
    else:
      Image.fromarray(pixels).save(path)
    coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    for annotation_id, category, box, crowd in boxes:
      coco["annotations"].append({"id": annotation_id, "image_id": image_id, "category_id": category,
                                  "bbox": box, "area": box[2] * box[3], "iscrowd": crowd})
    written.append(Written(image_id, file_name, width, height, pixels, kind in ("png", "gray", "rgba"),
                           list(boxes)))
  return folder, coco, written


def _add(coco, written, image_id, annotation_id, category, bbox, crowd=0, stored_box=None):
  coco["annotations"].append({"id": annotation_id, "image_id": image_id, "category_id": category,
                              "bbox": bbox, "iscrowd": crowd})
  if stored_box is not None:
    image = next(w for w in written if w.image_id == image_id)
    image.boxes.append((annotation_id, category, stored_box, crowd))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """A COCO-format folder (12 train + 4 validation images) and what it holds."""
  root = tmp_path_factory.mktemp("coco_folder")
  train_dir, train, train_written = _write_split(root, "train", 1000, 12, 100)
  val_dir, val, val_written = _write_split(root, "val", 2000, 4, 500)
  _add(train, train_written, 1002, 900, 42, [86, 10, 30, 12], stored_box=[86, 10, 10, 12])  # clipped
  _add(train, train_written, 1004, 901, 7, [10, 10, 0, 5])  # zero width: skipped
  _add(train, train_written, 1004, 902, 7, [100, 90, 10, 10])  # wholly outside: skipped
  _add(train, train_written, 1006, 903, 42, [0, 0, 16, 16], crowd=1, stored_box=[0, 0, 16, 16])
  (root / "train.json").write_text(json.dumps(train))
  (root / "val.json").write_text(json.dumps(val))
  return {"root": root, "train": (train_dir, root / "train.json"), "validation": (val_dir, root / "val.json"),
          "written": {"train": train_written, "validation": val_written}}


@pytest.fixture(scope="module")
def prepared(folder):
  data_dir = folder["root"] / "tfds"
  assert coco_folder.main(["--name", NAME, "--train", *map(str, folder["train"]),
                           "--validation", *map(str, folder["validation"]), "--data_dir", str(data_dir)]) == 0
  return str(data_dir)


def _config(data_dir, **kw):
  return InputConfig(**{"dataset": NAME, "data_dir": data_dir, "resize": "square", "image_size": 128,
                        "size_divisibility": 128, "scale_range": (1.0, 1.0), "eval_batch_size": 4,
                        "max_boxes": 8, **kw})


def test_features_and_label_map(prepared, tmp_path):
  builder = get_builder(_config(prepared))
  coco = tfds.builder("coco/2017", data_dir=str(tmp_path))  # info only, nothing downloaded
  assert builder.info.features.get_tensor_info() == coco.info.features.get_tensor_info()
  assert builder.info.features["objects"]["label"].names == ["red_box", "blue_box"]
  assert {s: builder.info.splits[s].num_examples for s in ("train", "validation")} == {
      "train": 12, "validation": 4}
  assert builder.info.file_format.value == "tfrecord"
  assert _config(prepared).labels == LabelMap(names=("red_box", "blue_box"), label_to_class=(0, 1),
                                              category_ids=(7, 42))
  # The label map comes without TensorFlow (data/config.py stays light).
  check = (f"import sys; from focal_jax.data.config import InputConfig; "
           f"assert InputConfig(dataset={NAME!r}, data_dir={prepared!r}).labels.category_ids == (7, 42); "
           f"assert 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", check], check=True)


def test_stored_images_and_boxes_are_the_written_ones(prepared, folder):
  builder = get_builder(_config(prepared))
  for split in ("train", "validation"):
    stored = {int(e["image/id"]): e for e in builder.as_dataset(split=split).as_numpy_iterator()}
    written = folder["written"][split]
    assert sorted(stored) == [w.image_id for w in written]
    for w in written:
      example = stored[w.image_id]
      assert example["image"].shape == (w.height, w.width, 3) and example["image"].dtype == np.uint8
      assert example["image/filename"].decode() == w.file_name
      if w.lossless:
        np.testing.assert_array_equal(example["image"], w.pixels)
      else:  # JPEG: each rectangle's inside has its colour (so the EXIF rotation was applied)
        for _, category, (x, y, bw, bh), _ in w.boxes:
          inside = example["image"][y + 2:y + bh - 2, x + 2:x + bw - 2].reshape(-1, 3).mean(0)
          np.testing.assert_allclose(inside, COLOURS[category], atol=12)
      objects = example["objects"]
      assert objects["id"].tolist() == [b[0] for b in w.boxes]
      assert objects["label"].tolist() == [CLASS_OF[b[1]] for b in w.boxes]
      assert objects["is_crowd"].tolist() == [bool(b[3]) for b in w.boxes]
      expected = np.array([[y / w.height, x / w.width, (y + bh) / w.height, (x + bw) / w.width]
                           for _, _, (x, y, bw, bh), _ in w.boxes]).reshape(-1, 4)
      np.testing.assert_allclose(objects["bbox"], expected, atol=1e-6)


def test_pipeline_boxes_classes_and_category_ids_round_trip(prepared, folder):
  from focal_jax.engine.evaluation import coco_evaluate, detections_to_coco  # pylint: disable=g-import-not-at-top

  config = _config(prepared, eval_split="train")
  written = {w.image_id: w for w in folder["written"]["train"]}
  results, seen = [], 0
  for batch in pipeline.build_eval_dataset(config, process_index=0, process_count=1):
    for b in np.flatnonzero(~batch["is_padding"]):
      w = written[int(batch["image_id"][b])]
      seen += 1
      scale = 128 / max(w.width, w.height)
      assert batch["scale"][b] == pytest.approx(scale)
      assert batch["original_size"][b].tolist() == [w.height, w.width]
      targets = [(x, y, x + bw, y + bh, CLASS_OF[c]) for _, c, (x, y, bw, bh), crowd in w.boxes if not crowd]
      valid = batch["valid"][b]
      assert valid.sum() == len(targets)
      got = np.concatenate([batch["boxes"][b][valid], batch["classes"][b][valid][:, None]], 1)
      want = np.array([[x1 * scale, y1 * scale, x2 * scale, y2 * scale, c] for x1, y1, x2, y2, c in targets])
      np.testing.assert_allclose(got, want.reshape(-1, 5), atol=1e-3)
    # Perfect detections (the ground truth boxes, in original pixels) through the evaluation code.
    original = batch["boxes"] / batch["scale"][:, None, None]
    results += detections_to_coco(original, np.ones(batch["valid"].shape), batch["classes"], batch["valid"],
                                  batch["image_id"], config.labels.category_ids)
  assert seen == 12
  assert {r["category_id"] for r in results} == {7, 42}

  truth = pipeline.coco_ground_truth(config)
  assert truth["categories"] == [{"id": 7, "name": "red_box", "supercategory": "none"},
                                 {"id": 42, "name": "blue_box", "supercategory": "none"}]
  assert sorted((i["id"], i["width"], i["height"], i["file_name"]) for i in truth["images"]) == sorted(
      (w.image_id, w.width, w.height, w.file_name) for w in written.values())
  annotations = {a["id"]: a for a in truth["annotations"]}
  expected = {b[0]: (w.image_id, b) for w in written.values() for b in w.boxes}
  assert sorted(annotations) == sorted(expected)
  for annotation_id, (image_id, (_, category, box, crowd)) in expected.items():
    a = annotations[annotation_id]
    assert (a["image_id"], a["category_id"], a["iscrowd"]) == (image_id, category, crowd)
    np.testing.assert_allclose(a["bbox"], box, atol=1e-3)
  metrics = coco_evaluate(truth, results)
  assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)


def test_report_of_clipped_and_skipped_boxes(folder, tmp_path, capsys):
  coco_folder.prepare("again", {"train": folder["train"]}, tmp_path, verbose=True)
  out = capsys.readouterr().out
  assert "train: images 12 (1 without boxes), boxes 24 (1 crowd)" in out  # 11 x 2, clipped, crowd
  assert "clipped to their image: 1;" in out
  assert "skipped (zero size or outside their image): 2 (annotations 901, 902)" in out


def _bad(folder, tmp_path, change):
  coco = json.loads(folder["validation"][1].read_text())
  change(coco)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(coco))
  return {"train": (folder["validation"][0], path)}


@pytest.mark.parametrize("change, message", [
    (lambda c: c["annotations"].append({"id": 999, "image_id": 2000, "category_id": 5, "bbox": [1, 1, 5, 5]}),
     r"unknown category id \(1\): 999 \(category 5\)"),
    (lambda c: c["annotations"].append({"id": 998, "image_id": 77, "category_id": 7, "bbox": [1, 1, 5, 5]}),
     r"unknown image id \(1\): 998 \(image 77\)"),
    (lambda c: c["annotations"].append({"id": 997, "image_id": 2000, "category_id": 7, "bbox": [1, 1, 5]}),
     r"bbox of 4 finite numbers \(1\): 997"),
    (lambda c: c["images"].append({"id": 2009, "file_name": "nope.png", "width": 8, "height": 8}),
     r"image files missing \(1\): .*nope\.png"),
    (lambda c: c["images"][1].update(width=65),
     r"another size than the json says \(1\): .*image_01\.jpg \(64x64, json 65x64\)"),
    (lambda c: c["images"].append(dict(c["images"][0])), r"duplicate image ids \(1\): 2000"),
    (lambda c: c["categories"].append({"id": 8, "name": "red_box"}),
     r"names with two ids \(1\): 'red_box' \(7, 8\)"),
    (lambda c: c["images"].append({"id": 2010, "file_name": "../elsewhere/image_00.jpg"}),
     r"file names that leave the images folder \(absolute, or through \.\.\) \(1\): '\.\./elsewhere"),
    (lambda c: c["images"].append({"id": 2011, "file_name": "/etc/hostname"}),
     r"file names that leave the images folder .*'/etc/hostname'"),
    (lambda c: c["images"].append({"id": 2012, "file_name": "\ud800.png"}),
     r"file names that the file system cannot encode \(1\)"),
    (lambda c: c.update(images=[], annotations=[]), r"lists no images; nothing was written"),
])
def test_bad_input_is_an_error_naming_it_and_writes_nothing(folder, tmp_path, change, message):
  with pytest.raises(coco_folder.CocoFolderError, match=message):
    coco_folder.prepare(NAME, _bad(folder, tmp_path, change), tmp_path / "tfds", verbose=False)
  assert not (tmp_path / "tfds").exists()


def test_bad_names_and_existing_datasets_are_refused(prepared, folder, capsys):
  splits = {"train": folder["train"]}
  with pytest.raises(coco_folder.CocoFolderError, match="lower case"):
    coco_folder.prepare("My-Objects", splits, prepared)
  with pytest.raises(coco_folder.CocoFolderError, match="TFDS catalog"):
    coco_folder.prepare("mnist", splits, prepared)
  with pytest.raises(FileExistsError, match="exists already"):
    coco_folder.prepare(NAME, splits, prepared)
  command = ["--name", NAME, "--train", *map(str, folder["train"]), "--data_dir", prepared]
  assert coco_folder.main(command) == 2
  assert "error:" in capsys.readouterr().err


def test_unprepared_dataset_says_how_to_prepare_it(tmp_path):
  config = _config(str(tmp_path), dataset="not_prepared")
  with pytest.raises(pipeline.DatasetNotFoundError, match="focal_jax.data.coco_folder --name not_prepared"):
    pipeline.require_prepared(config)
  with pytest.raises(ValueError, match="coco_folder --name not_prepared"):
    config.labels  # pylint: disable=pointless-statement


# --------------------------------------------------------------------------- fine-tuning

# The demo recipes, shrunk to seconds: a narrower network on 64 x 64 inputs, 3 steps.
SHRINK = ["model.width=8", "model.fpn_channels=16", "model.head_convs=1", "model.head_channels=32",
          "data.image_size=64", "data.size_divisibility=64", "data.batch_size=8", "data.eval_batch_size=8",
          "data.shuffle_buffer=16", "optimizer.warmup_steps=1", "train.total_steps=3", "train.log_every=1",
          "train.checkpoint_every=3"]


def _run_experiment(config, workdir, overrides, compilation_cache):
  """Runs `python -m experiments.coco_retinanet` as a user does; returns its log.

  One CPU device; runs given the same `compilation_cache` share compiled programs.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_COMPILATION_CACHE_DIR": str(compilation_cache),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  run = subprocess.run([sys.executable, "-m", "experiments.coco_retinanet", "--config", config,
                        "--workdir", str(workdir), *[f"--{o}" for o in SHRINK + overrides]],
                       cwd=REPO, capture_output=True, text=True, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "AP50" in run.stderr and (workdir / "eval_3.json").exists()  # the COCO table
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [line["loss"] for line in lines if "loss" in line]
  assert len(losses) == 3 and all(map(math.isfinite, losses))
  return run.stderr


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_fine_tune_from_scratch_and_from_a_work_dir(prepared, synthetic_data_dir, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from experiments import configs  # pylint: disable=g-import-not-at-top
  from focal_jax.engine.config import apply_overrides  # pylint: disable=g-import-not-at-top
  from focal_jax.engine import pretrained  # pylint: disable=g-import-not-at-top
  from focal_jax.engine.config import model_from_config  # pylint: disable=g-import-not-at-top

  source = tmp_path / "source"  # the demo model trained on synthetic_shapes (4 classes)
  synthetic = ["data.dataset=synthetic_shapes/tiny", f"data.data_dir={synthetic_data_dir}",
               "data.auto_prepare=False"]
  _run_experiment("demo", source, synthetic, tmp_path / "demo_cache")
  data = [f"data.dataset={NAME}", f"data.data_dir={prepared}"]  # 2 classes
  cache = tmp_path / "finetune_cache"
  log = _run_experiment("finetune", tmp_path / "scratch", data + ["train.init_checkpoint=None"], cache)
  assert "left as initialised" not in log
  log = _run_experiment("finetune", tmp_path / "tuned", data + [f"train.init_checkpoint={source}"], cache)
  assert "head/classification_head/predictor left as initialised" in log
  assert "4 classes in the checkpoint, 2 in the model" in log

  # What fine-tuning starts from: every variable of the source's last checkpoint but the class predictor.
  with ocp.PyTreeCheckpointer() as checkpointer:
    saved = checkpointer.restore(source / "checkpoints" / "3" / "default")
  saved = {path[1:]: np.asarray(leaf) for path, leaf in traverse_util.flatten_dict(
      {"params": saved["params"], "batch_stats": saved["batch_stats"]}).items()}

  def fresh_variables(overrides):
    config = apply_overrides(configs.get_config("finetune"), SHRINK + data + overrides)
    shapes = jax.eval_shape(model_from_config(config).init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
    return jax.tree.map(lambda s: np.full(s.shape, 7.0, s.dtype), shapes)

  loaded = traverse_util.flatten_dict(pretrained.init_from_pretrained(fresh_variables([]), source))
  loaded = {path[1:]: leaf for path, leaf in loaded.items()}
  assert loaded.keys() == saved.keys()
  predictor = {path for path in loaded if path[:3] == pretrained.CLASS_PREDICTOR}
  assert len(predictor) == 2 and all(loaded[p].shape != saved[p].shape for p in predictor)
  for path, value in loaded.items():
    expected = np.full(value.shape, 7.0) if path in predictor else saved[path]
    np.testing.assert_array_equal(value, expected, err_msg=str(path))
  # Any other difference is refused, with the offending variables named.
  with pytest.raises(ValueError, match=r"does not fit the model(.|\n)*wrong shape.*backbone"):
    pretrained.init_from_pretrained(fresh_variables(["model.width=16"]), source)


def test_converted_retinanet_of_other_classes_initialises_all_but_the_class_predictor(tmp_path, caplog):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top

  from focal_jax.convert import TorchvisionModel, save_pretrained  # pylint: disable=g-import-not-at-top
  from focal_jax.engine import pretrained  # pylint: disable=g-import-not-at-top
  from focal_jax.models import RetinaNet  # pylint: disable=g-import-not-at-top

  def variables(num_classes, fill=None):
    model = RetinaNet(num_classes=num_classes, depth=18, backbone_norm="bn", frozen_stages=0, fpn_channels=16,
                      head_convs=1, head_channels=16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
    rng = np.random.default_rng(0)
    return model, jax.tree.map(
        lambda s: np.full(s.shape, fill, s.dtype) if fill else rng.normal(size=s.shape).astype(s.dtype), shapes)

  coco_model, coco_variables = variables(91)  # as torchvision's COCO RetinaNet
  save_pretrained(tmp_path / "converted", TorchvisionModel(coco_model, coco_variables, None),
                  "retinanet_resnet50_fpn")
  caplog.set_level("INFO", logger=pretrained.__name__)
  loaded = pretrained.init_from_pretrained(variables(2, fill=7.0)[1], tmp_path / "converted")
  assert "91 classes in the checkpoint, 2 in the model" in caplog.text
  saved = {path[1:]: leaf for path, leaf in traverse_util.flatten_dict(coco_variables).items()}
  for path, value in traverse_util.flatten_dict(loaded).items():
    if path[1:4] == pretrained.CLASS_PREDICTOR:
      assert value.shape != saved[path[1:]].shape and np.all(value == 7.0)
    else:
      np.testing.assert_array_equal(value, saved[path[1:]], err_msg=str(path))


def test_a_missing_images_folder_is_one_line(folder, tmp_path):
  splits = {"train": (tmp_path / "no_such_folder", folder["train"][1])}
  with pytest.raises(coco_folder.CocoFolderError, match=r"no_such_folder .* is not a folder; nothing was written"):
    coco_folder.prepare(NAME, splits, tmp_path / "tfds", verbose=False)
  assert not (tmp_path / "tfds").exists()
