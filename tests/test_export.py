"""Tests of focal_jax.export: each artifact, reloaded where focal_jax is not, detects as `Predictor` does.

The reference is `focal_jax.predict.Predictor` (TensorFlow pre-processing, the
jit predict step); the artifacts run in a fresh interpreter through the
`detect.py` written beside them, which must not import focal_jax or flax.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import assert_fatal, train_tiny_demo

from focal_jax.export import ExportError, export_workdir
from focal_jax.export.__main__ import main
from focal_jax.predict import Predictor

SCORE_THRESHOLD = 0.0  # every slot filled: the comparison covers all 100 detections of each image

RUN_EXPORT = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import detect
images = np.load(sys.argv[2])
results = detect.load(sys.argv[1])(images)
np.savez(sys.argv[3], **{f"{key}_{i}": np.asarray(r[key]) for i, r in enumerate(results)
                         for key in ("boxes", "scores", "classes")})
loaded = sorted(name for name in ("focal_jax", "flax", "jax", "tensorflow") if name in sys.modules)
print(json.dumps({"loaded": loaded}))
"""


@pytest.fixture(scope="module")
def workdir(synthetic_data_dir, tmp_path_factory):
  """The demo model after 2 steps on synthetic_shapes/tiny at 64x64."""
  return train_tiny_demo(synthetic_data_dir, tmp_path_factory.mktemp("run"), steps=2)


@pytest.fixture(scope="module")
def predictor(workdir):
  return Predictor.from_workdir(workdir, score_threshold=SCORE_THRESHOLD, batch_size=4)


def _run_artifact(folder, images, tmp_path):
  """The detections of the export in `folder` on `images`, computed in a fresh interpreter."""
  np.save(tmp_path / "images.npy", images)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ""}
  done = subprocess.run([sys.executable, "-c", RUN_EXPORT, str(folder), str(tmp_path / "images.npy"),
                         str(tmp_path / "results.npz")], capture_output=True, text=True, timeout=300, env=env,
                        cwd=tmp_path, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  loaded = json.loads(done.stdout.strip().splitlines()[-1])["loaded"]
  assert "focal_jax" not in loaded and "flax" not in loaded, loaded
  with np.load(tmp_path / "results.npz") as saved:
    return [{key: saved[f"{key}_{i}"] for key in ("boxes", "scores", "classes")} for i in range(len(images))]


def _assert_same_detections(mine, theirs, score_atol=1e-5, box_atol=0.01):
  """Each detection has one counterpart of the same class, score and box (within float tolerance).

  Both lists come sorted by score; detections whose scores tie within the
  tolerance may come in either order.
  """
  assert len(mine["scores"]) == len(theirs["scores"]) > 0
  np.testing.assert_allclose(mine["scores"], theirs["scores"], atol=score_atol, rtol=0)
  unmatched = list(range(len(theirs["scores"])))
  for i in range(len(mine["scores"])):
    j = next((j for j in unmatched if mine["classes"][i] == theirs["classes"][j]
              and abs(mine["scores"][i] - theirs["scores"][j]) <= score_atol
              and np.abs(mine["boxes"][i] - theirs["boxes"][j]).max() <= box_atol), None)
    assert j is not None, (f"detection {i} (class {mine['classes'][i]}, score {mine['scores'][i]}, box "
                           f"{mine['boxes'][i]}) has no counterpart")
    unmatched.remove(j)


@pytest.mark.slow
@pytest.mark.parametrize("format, batch_size", [("stablehlo", None), ("saved_model", 3), ("tflite", 3)])
@pytest.mark.parametrize("image_size", [(64, 64), (48, 80)])
def test_the_reloaded_artifact_detects_as_the_predictor(workdir, predictor, tmp_path, format, batch_size,
                                                         image_size):
  out = export_workdir(workdir, format, tmp_path / "export", image_size=image_size, batch_size=batch_size,
                       score_threshold=SCORE_THRESHOLD)
  metadata = json.loads((out / "metadata.json").read_text())
  assert metadata["input"]["shape"] == [batch_size, *image_size, 3] and metadata["input"]["dtype"] == "uint8"
  assert [c["name"] for c in metadata["classes"]] == list(predictor.class_names)
  assert [c["id"] for c in metadata["classes"]] == list(predictor.category_ids)
  assert metadata["score_threshold"] == SCORE_THRESHOLD and metadata["source"]["step"] == 2
  assert metadata["config"]["model"]["width"] == 16

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, *image_size, 3), np.uint8)  # fewer than a fixed batch of 3
  got = _run_artifact(out, images, tmp_path)
  want = predictor.predict(list(images))
  for mine, theirs in zip(got, want):
    _assert_same_detections(mine, theirs)
    height, width = image_size
    assert mine["boxes"][:, [0, 2]].max() <= width and mine["boxes"][:, [1, 3]].max() <= height


@pytest.mark.slow
@pytest.mark.parametrize("format, topk_per_level, says", [
    # More anchors in a level than topk_per_level: the program sorts, which the LiteRT converter refuses.
    ("tflite", 100, r"tflite: the LiteRT converter does not take the op vhlo.sort_v1 \(postprocess.py"),
    ("onnx", 1000, "onnx: tf2onnx cannot convert the op XlaCallModule"),
])
def test_a_format_that_cannot_hold_the_program_says_why_and_writes_nothing(workdir, tmp_path, format,
                                                                           topk_per_level, says):
  run = shutil.copytree(workdir, tmp_path / "run")
  config = json.loads((run / "config.json").read_text())
  config["postprocess"]["topk_per_level"] = topk_per_level
  (run / "config.json").write_text(json.dumps(config))
  with pytest.raises(ExportError, match=says):
    export_workdir(run, format, tmp_path / "export")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _fatal(argv, capsys, says):
  assert_fatal(main, argv, capsys, says)


def test_bad_exports_are_one_line_and_write_nothing(workdir, tmp_path, capsys):
  out = tmp_path / "out"
  base = ["--checkpoint", str(workdir), "--format", "stablehlo", "--out", str(out)]
  (tmp_path / "empty").mkdir()
  _fatal(["--checkpoint", str(tmp_path / "empty"), "--format", "stablehlo", "--out", str(out)], capsys,
         "has no config.json")
  (tmp_path / "no_checkpoint").mkdir()
  (tmp_path / "no_checkpoint" / "config.json").write_text((workdir / "config.json").read_text())
  _fatal(["--checkpoint", str(tmp_path / "no_checkpoint"), "--format", "stablehlo", "--out", str(out)], capsys,
         "has no checkpoints/ folder")
  _fatal(base + ["--image_size", "0", "64"], capsys, "the export size must lie in 1..8192")
  _fatal(base + ["--image_size", "64", "9000"], capsys, "the export size must lie in 1..8192")
  _fatal(base + ["--batch_size", "0"], capsys, "the batch size must be a positive whole number")
  _fatal(base + ["--score_threshold", "2"], capsys, "score_threshold must be a number in [0, 1]")
  assert not out.exists() and not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
  with pytest.raises(SystemExit) as exit_:  # argparse: an unknown format is a usage error (status 2)
    main(base[:2] + ["--format", "caffe", "--out", str(out)])
  assert exit_.value.code == 2 and "invalid choice: 'caffe'" in capsys.readouterr().err
  with pytest.raises(ExportError, match="unknown format 'caffe'"):
    export_workdir(workdir, "caffe", out)


@pytest.mark.slow
def test_an_existing_export_is_replaced_only_with_overwrite(workdir, tmp_path, capsys):
  out = tmp_path / "out"
  base = ["--checkpoint", str(workdir), "--format", "stablehlo", "--out", str(out)]
  assert main(base) == 0
  first = (out / "detector.stablehlo").read_bytes()
  _fatal(base, capsys, "already holds an export; pass --overwrite")
  assert main(base + ["--overwrite", "--score_threshold", "0.5"]) == 0
  assert json.loads((out / "metadata.json").read_text())["score_threshold"] == 0.5
  assert (out / "detector.stablehlo").read_bytes() != first
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  _fatal(["--checkpoint", str(workdir), "--format", "stablehlo", "--out", str(tmp_path / "busy"), "--overwrite"],
         capsys, "is a folder with other files in it")
  assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_an_artifact_refuses_a_wrong_dtype_rank_or_size(workdir, tmp_path):
  out = export_workdir(workdir, "stablehlo", tmp_path / "export")
  sys.path.insert(0, str(out))
  try:
    import detect  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  finally:
    sys.path.remove(str(out))
  detector = detect.load(out)
  good = np.zeros((1, 64, 64, 3), np.uint8)
  assert len(detector(good)) == 1
  for bad in (good.astype(np.float32), good[0], np.zeros((1, 64, 32, 3), np.uint8)):
    with pytest.raises(ValueError, match=r"expected uint8 RGB images \[N, 64, 64, 3\]"):
      detector(bad)
  exported = jax.export.deserialize(bytearray((out / "detector.stablehlo").read_bytes()))
  with pytest.raises(ValueError, match="(?i)dtype mismatch"):  # the program itself checks its input
    exported.call(good.astype(np.float32))
  with pytest.raises(ValueError, match="(?i)shape|rank"):
    exported.call(np.zeros((1, 64, 32, 3), np.uint8))
