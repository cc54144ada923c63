import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_fatal, train_tiny_demo
from PIL import Image

from focal_jax.data import SYNTHETIC_SHAPES_CLASS_NAMES
from focal_jax.engine.workdir import WorkdirError
from focal_jax import predict as predict_module
from focal_jax.predict import Predictor, coco_results, main

REPO = Path(__file__).resolve().parents[1]
# (width, height) of the good test images, by file name.
SIZES = {"gray.png": (100, 60), "rgba.png": (77, 130), "photo.jpg": (128, 128), "palette.png": (50, 40)}


@pytest.fixture(scope="module")
def workdir(synthetic_data_dir, tmp_path_factory):
  """A run of the demo model for 1 step on synthetic_shapes/tiny at 64x64, then evaluated."""
  return train_tiny_demo(synthetic_data_dir, tmp_path_factory.mktemp("run"), steps=1)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp("images")

  def noise(name, channels):  # a PIL image of mode L, RGB or RGBA
    width, height = SIZES[name]
    return Image.fromarray(rng.integers(0, 256, (height, width, channels), np.uint8).squeeze())

  noise("gray.png", 1).save(path / "gray.png")
  noise("rgba.png", 4).save(path / "rgba.png")
  noise("photo.jpg", 3).save(path / "photo.jpg", quality=90)
  noise("palette.png", 3).convert("P").save(path / "palette.png")
  (path / "bad.jpg").write_bytes(b"not an image at all" * 10)
  (path / "notes.txt").write_text("not an input: folders give only .jpg, .jpeg and .png files")
  return path


def test_training_writes_eval_pictures_and_curves(workdir):
  with Image.open(workdir / "visuals" / "eval_1.png") as picture:
    assert picture.format == "PNG"
    assert picture.width >= 2 * 320 and picture.height >= 4 * 320  # 4 images: predictions | ground truth
  with Image.open(workdir / "training_curves.png") as curves:
    assert curves.format == "PNG"


def test_training_writes_each_metric_line_to_jsonl_and_tensorboard(workdir):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [line["step"] for line in lines] == [1, 1]  # the log step, then the evaluation
  assert {"loss", "classification_loss", "box_loss", "images_per_second"} <= lines[0].keys()
  assert {"eval/AP", "eval/AP50"} <= lines[1].keys() and "loss" not in lines[1]
  [events] = workdir.glob("events.out.tfevents.*")
  logged = {(event.step, value.tag): float(tf.make_ndarray(value.tensor))
            for event in tf.compat.v1.train.summary_iterator(str(events)) for value in event.summary.value}
  expected = {(line["step"], name): value for line in lines for name, value in line.items() if name != "step"}
  assert logged.keys() == expected.keys()
  np.testing.assert_allclose([logged[key] for key in expected], list(expected.values()), rtol=1e-6)


def test_predict_a_folder_reports_the_bad_image_and_draws_the_rest(workdir, image_dir, tmp_path):
  output, drawn = tmp_path / "out" / "predictions.json", tmp_path / "drawn"
  done = subprocess.run(
      [sys.executable, "-m", "focal_jax.predict", "--checkpoint", str(workdir), str(image_dir), "--output",
       str(output), "--draw", str(drawn), "--score_threshold", "0", "--batch_size", "2", "--step", "1"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 1, done.stderr
  [bad_line] = [line for line in done.stderr.splitlines() if "bad.jpg" in line]
  assert bad_line.startswith("error:") and "Traceback" not in done.stderr
  assert "5/5 images" in done.stderr  # progress
  assert "400 detections in 4 of 5 images (checkpoint step 1)" in done.stdout

  detections = json.loads(output.read_text())
  inputs = sorted(["bad.jpg", *SIZES])  # the folder's images, in name order
  assert {Path(d["file_name"]).name for d in detections} == set(SIZES)
  for d in detections:
    name = Path(d["file_name"]).name
    width, height = SIZES[name]
    x, y, w, h = d["bbox"]
    assert d["image_id"] == inputs.index(name)
    assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
    assert d["category_name"] in SYNTHETIC_SHAPES_CLASS_NAMES
    assert d["category_id"] == SYNTHETIC_SHAPES_CLASS_NAMES.index(d["category_name"]) + 1
    assert 0 <= d["score"] <= 1
  # 128x128 is resized to the 64x64 network input: boxes come back to original pixels.
  photo = np.array([d["bbox"] for d in detections if d["file_name"].endswith("photo.jpg")])
  assert len(photo) == 100 and (photo[:, 0] + photo[:, 2]).max() > 100

  assert sorted(p.name for p in drawn.iterdir()) == sorted(Path(name).stem + ".png" for name in SIZES)
  for name, size in SIZES.items():
    with Image.open(drawn / (Path(name).stem + ".png")) as picture:
      assert picture.size == size and picture.mode == "RGB"


def test_help_explains_every_flag(capsys):
  with pytest.raises(SystemExit) as exit_:
    main(["--help"])
  assert exit_.value.code == 0
  text = capsys.readouterr().out
  for flag in ("--checkpoint", "--step", "--output", "--draw", "--score_threshold", "--batch_size", "--debug",
               "IMAGE"):
    assert flag in text
  assert "--config" not in text  # the work dir's own config.json describes the model


def test_workdir_errors_are_one_line_without_traceback(workdir, image_dir, tmp_path, capsys):
  image = str(image_dir / "photo.jpg")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text((workdir / "config.json").read_text())
  for argv, says in [(["--checkpoint", str(tmp_path / "missing"), image], "no training work dir"),
                     (["--checkpoint", str(tmp_path), image], "has no config.json"),
                     (["--checkpoint", str(empty), image], "has no checkpoints/"),
                     (["--checkpoint", str(workdir), image, "--step", "7"], "there are steps 1"),
                     (["--checkpoint", str(workdir), image, "--score_threshold", "2"], "score_threshold"),
                     (["--checkpoint", str(workdir), str(empty)], "no .jpg, .jpeg or .png images in")]:
    assert main(argv) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error:") and says in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
  with pytest.raises(WorkdirError, match="no training work dir"):  # --debug: the exception and its traceback
    main(["--checkpoint", str(tmp_path / "missing"), image, "--debug"])


def test_coco_results_are_xywh_in_original_pixels():
  result = {"boxes": np.array([[10.0, 20.0, 50.5, 60.0], [0.0, 0.0, 1.0, 3.0]], np.float32),
            "scores": np.array([0.9, 0.25], np.float32), "classes": np.array([1, 0]),
            "class_names": ["square", "circle"]}
  assert coco_results("a.jpg", 3, result, category_ids=(5, 7)) == [
      {"file_name": "a.jpg", "image_id": 3, "category_id": 7, "category_name": "square",
       "bbox": [10.0, 20.0, 40.5, 40.0], "score": pytest.approx(0.9)},
      {"file_name": "a.jpg", "image_id": 3, "category_id": 5, "category_name": "circle",
       "bbox": [0.0, 0.0, 1.0, 3.0], "score": 0.25}]


@pytest.fixture(scope="module")
def predictor(workdir):
  return Predictor.from_workdir(workdir, score_threshold=0.0, batch_size=4)


def test_predictor_maps_boxes_to_each_images_pixels(predictor):
  rng = np.random.default_rng(1)
  small = rng.integers(0, 256, (48, 64, 3), np.uint8)  # already the network's size: scale 1
  large = small.repeat(2, axis=0).repeat(2, axis=1)  # the same content at 2x: scale 0.5, same network input
  gray = small[..., 1]
  first, second, third, fourth, fifth = predictor.predict([small, large, gray, np.stack([gray] * 3, -1), small])
  assert first["boxes"].shape == (100, 4) and first["scores"].shape == (100,) and len(first["class_names"]) == 100
  np.testing.assert_allclose(second["boxes"], 2 * first["boxes"], rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(second["scores"], first["scores"], rtol=1e-5)
  np.testing.assert_array_equal(second["classes"], first["classes"])
  np.testing.assert_allclose(third["boxes"], fourth["boxes"])  # grayscale = its three-channel copy
  np.testing.assert_allclose(fifth["boxes"], first["boxes"], rtol=1e-6)  # the second batch pads the same way
  assert first["class_names"] == [SYNTHETIC_SHAPES_CLASS_NAMES[c] for c in first["classes"]]
  assert np.all(np.diff(first["scores"]) <= 0)
  for result, (height, width) in zip([first, second], [(48, 64), (96, 128)]):
    boxes = result["boxes"]
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all() and (boxes[:, [1, 3]] <= height).all()
  with pytest.raises(ValueError, match="uint8"):
    predictor.predict([small.astype(np.float32)])


def _fatal(argv, capsys, says):
  assert_fatal(main, argv, capsys, says)


def test_drawing_into_the_input_folder_is_refused_and_the_inputs_stay(workdir, tmp_path, capsys):
  folder = tmp_path / "photos"
  folder.mkdir()
  image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
  Image.fromarray(image).save(folder / "cat.png")
  before = (folder / "cat.png").read_bytes()
  _fatal(["--checkpoint", str(workdir), str(folder), "--draw", str(folder), "--output", str(tmp_path / "p.json")],
         capsys, "holds input images")
  _fatal(["--checkpoint", str(workdir), str(folder / "cat.png"), "--output", str(folder / "cat.png")],
         capsys, "is one of the input images")
  assert (folder / "cat.png").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["cat.png"]


def test_drawing_names_never_collide():
  paths = [Path("a/cat.png"), Path("b/cat.jpg"), Path("c/cat_1.png"), Path("d/CAT.png"), Path("e/dog.jpeg")]
  names = predict_module._drawing_names(paths)
  assert names == ["cat.png", "cat_1.png", "cat_1_1.png", "CAT_2.png", "dog.png"]
  assert len({name.lower() for name in names}) == len(names)


def test_a_symlink_in_the_drawing_folder_is_replaced_not_followed(workdir, image_dir, tmp_path):
  drawn, target = tmp_path / "drawn", tmp_path / "precious.txt"
  drawn.mkdir()
  target.write_text("not a drawing")
  (drawn / "photo.png").symlink_to(target)
  code = main(["--checkpoint", str(workdir), str(image_dir / "photo.jpg"), "--draw", str(drawn), "--output",
               str(tmp_path / "p.json")])
  assert code == 0
  assert target.read_text() == "not a drawing"
  assert not (drawn / "photo.png").is_symlink()
  with Image.open(drawn / "photo.png") as picture:
    assert picture.size == (128, 128)


def test_sixteen_bit_grayscale_is_scaled_to_eight_bits_not_clipped(tmp_path):
  levels = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], np.uint16)
  Image.fromarray(levels).save(tmp_path / "deep.png")
  image = predict_module.read_image(tmp_path / "deep.png")
  assert image.mode == "RGB"
  expected = np.floor(levels / 257 + 0.5).astype(np.uint8)  # round half up, by hand: 65535 -> 255, 32896 -> 128
  np.testing.assert_array_equal(np.asarray(image)[..., 0], expected)
  np.testing.assert_array_equal(np.asarray(image)[..., 2], expected)
  Image.fromarray(levels.astype(np.float32)).save(tmp_path / "float.tiff")
  with pytest.raises(ValueError, match="floating-point pixels"):
    predict_module.read_image(tmp_path / "float.tiff")


def test_a_checkpoint_that_does_not_fit_config_json_is_status_2(workdir, image_dir, tmp_path, capsys):
  other = shutil.copytree(workdir, tmp_path / "other")
  config = json.loads((other / "config.json").read_text())
  config["model"]["head_channels"] = 32
  (other / "config.json").write_text(json.dumps(config))
  _fatal(["--checkpoint", str(other), str(image_dir / "photo.jpg"), "--output", str(tmp_path / "p.json")],
         capsys, "does not fit the model")


def test_an_unwritable_output_is_refused_before_inference(workdir, image_dir, tmp_path, capsys, monkeypatch):
  def no_inference(*args, **kwargs):
    raise AssertionError("the model was loaded")

  monkeypatch.setattr(Predictor, "from_workdir", no_inference)
  blocker = tmp_path / "blocker"
  blocker.write_text("a file")
  image = str(image_dir / "photo.jpg")
  _fatal(["--checkpoint", str(workdir), image, "--output", str(blocker / "p.json")], capsys, "is a file")
  _fatal(["--checkpoint", str(workdir), image, "--output", str(tmp_path)], capsys, "is a folder")
  _fatal(["--checkpoint", str(workdir), image, "--output", str(tmp_path / "p.json"), "--draw", str(blocker)],
         capsys, "is a file")
