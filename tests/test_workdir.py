"""Tests of focal_jax.engine.workdir: what a work dir guarantees when runs crash, collide or disagree.

Every test works on its own copy of one short run (4 steps of a tiny model,
checkpoints at steps 2 and 4).
"""

import errno
import gc
import json
import logging
import multiprocessing
import re
import shutil
import signal

import jax
import numpy as np
import pytest
from test_train import tiny_config

import focal_jax.engine.loop as train_loop
from focal_jax.engine.checkpointer import UnreadableCheckpointsError, silence_failed_read_leftovers
from focal_jax.engine.config import apply_overrides
from focal_jax.engine.mesh import make_mesh
from focal_jax.engine.workdir import IncompatibleWorkdirError, Workdir, WorkdirError
from focal_jax.predict import Predictor


def _steps(path):
  return sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())


def _metric_steps(path):
  return [(line["step"], "eval/AP" in line) for line in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]


@pytest.fixture(autouse=True)
def one_device(monkeypatch):
  monkeypatch.setattr(train_loop, "make_mesh", lambda: make_mesh(jax.devices()[:1]))


@pytest.fixture(scope="module")
def config(synthetic_data_dir):
  return tiny_config(synthetic_data_dir)


@pytest.fixture(scope="module")
def trained(config, tmp_path_factory):
  path = tmp_path_factory.mktemp("trained") / "run"
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train_loop, "make_mesh", lambda: make_mesh(jax.devices()[:1]))
    train_loop.train_and_evaluate(config, path)
  return path


@pytest.fixture
def run(trained, tmp_path):
  """A copy of the trained work dir."""
  return shutil.copytree(trained, tmp_path / "run", symlinks=True)


def test_the_fixture_run_checkpoints_steps_2_and_4(trained):
  assert _steps(trained) == [2, 4]
  assert _metric_steps(trained) == [(1, False), (2, False), (3, False), (4, False), (4, True)]


def _data_files(checkpoint):
  return sorted((p for p in checkpoint.rglob("*") if p.is_file() and p.parent.name == "d"),
                key=lambda p: p.stat().st_size)


def _truncate(path):
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _truncate_a_data_file(checkpoint):
  """Truncates the largest data file of the checkpoint (the state restored in training reads it)."""
  _truncate(_data_files(checkpoint)[-1])


@pytest.fixture
def asyncio_reports_nothing(caplog):
  """Fails the test if the `asyncio` logger reports anything, such as a task's exception nobody retrieved."""
  yield
  gc.collect()  # a task's unretrieved exception is reported when the task is freed
  reports = [record.getMessage() for record in caplog.records if record.name == "asyncio"]
  assert not reports, reports


def _no_leftover_reports(test):
  """orbax leaves the other reads of a failed restore behind; what they report must not reach the user.

  They report as unraisable exceptions, as coroutines never awaited and through the `asyncio` logger.
  """
  marks = (pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning",
                                      "error:coroutine:RuntimeWarning"),
           pytest.mark.usefixtures("asyncio_reports_nothing"))
  for mark in marks:
    test = mark(test)
  return test


@_no_leftover_reports
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    run, config, caplog):
  _truncate_a_data_file(run / "checkpoints" / "4")
  caplog.set_level(logging.WARNING)
  metrics = train_loop.train_and_evaluate(config, run)
  assert metrics is not None and "AP" in metrics
  # One line, naming the file and the array that could not be read, and no tracebacks.
  assert re.search(r"checkpoint step 4 cannot be read \(.*Error reading .* in OCDBT database at local file "
                   r".*checkpoints/4", caplog.text)
  assert "resumed from step 2" in caplog.text and "Traceback" not in caplog.text
  assert (run / "damaged_checkpoints" / "4").is_dir()  # kept, never deleted
  assert _steps(run) == [2, 4]  # step 4 trained again from step 2
  assert _metric_steps(run) == [(1, False), (2, False), (3, False), (4, False), (4, True)]


@_no_leftover_reports
def test_predict_names_the_damaged_checkpoint_and_the_step_to_use(run):
  for data in _data_files(run / "checkpoints" / "4"):  # the model's variables too, whichever file holds them
    _truncate(data)
  with pytest.raises(WorkdirError, match=r"checkpoint step 4 .* cannot be read .* --step 2 reads the one before"):
    Predictor.from_workdir(run)
  assert Predictor.from_workdir(run, step=2).step == 2


@_no_leftover_reports
def test_no_readable_checkpoint_stops_with_the_command_to_start_afresh(run, config):
  for step in (2, 4):
    _truncate_a_data_file(run / "checkpoints" / str(step))
  with pytest.raises(UnreadableCheckpointsError,
                     match=r"no checkpoint .* can be read .* mv .*checkpoints .*damaged_checkpoints"):
    train_loop.train_and_evaluate(config, run)
  assert _steps(run) == [2, 4]


def _raised(error):
  try:
    raise error
  except ValueError as raised:
    return raised


def test_the_asyncio_report_of_a_read_error_left_unretrieved_is_dropped(caplog):
  """TensorStore's messages for a truncated checkpoint, as orbax's leftover tasks hold them; nothing else is dropped."""
  silence_failed_read_leftovers()
  leftovers = [_raised(ValueError(message)) for message in (
      'OUT_OF_RANGE: Error opening "zarr" driver: Error reading "params.x/.zarray" in OCDBT database at local '
      'file "/run/checkpoints/4/default/": Error reading Byte range [0, 13735) of local file "/run/d/b3"',
      'OUT_OF_RANGE: Error reading "params.x/c/0" in OCDBT database at local file "/run/checkpoints/4/default/"')]
  other = _raised(ValueError("OUT_OF_RANGE: index 7 is outside [0, 4)"))
  for error in leftovers + [other]:
    logging.getLogger("asyncio").error("Task exception was never retrieved",
                                       exc_info=(ValueError, error, error.__traceback__))
  assert [record.exc_info[1] for record in caplog.records if record.name == "asyncio"] == [other]


def test_a_work_dir_without_config_json_refuses_another_model_and_writes_nothing(run, config):
  (run / "config.json").unlink()
  before = sorted(p.name for p in run.iterdir())
  other = apply_overrides(config, ["model.width=16"])
  with pytest.raises(IncompatibleWorkdirError, match=r"checkpoints .* hold another model .*backbone"):
    train_loop.train_and_evaluate(other, run)
  assert sorted(p.name for p in run.iterdir()) == before  # no config.json written


def test_a_second_run_in_the_same_work_dir_is_refused(run, config):
  with Workdir(run).lock():
    with pytest.raises(WorkdirError, match="another run is using the work dir"):
      train_loop.train_and_evaluate(config, run)


def _hold_lock_forever(path, ready):
  with Workdir(path).lock():
    ready.set()
    signal.pause()


def test_the_lock_of_a_killed_run_is_not_stale(tmp_path):
  ready = multiprocessing.get_context("spawn").Event()
  holder = multiprocessing.get_context("spawn").Process(target=_hold_lock_forever, args=(tmp_path, ready))
  holder.start()
  try:
    assert ready.wait(60)
    with pytest.raises(WorkdirError, match="another run"):
      with Workdir(tmp_path).lock():
        pass
  finally:
    holder.kill()
    holder.join()
  with Workdir(tmp_path).lock():  # SIGKILL released it
    pass


def test_metrics_after_a_resume_hold_each_step_once(run, config):
  # As if the run had been killed after logging steps 3 and 4 but before saving step 4's checkpoint.
  shutil.rmtree(run / "checkpoints" / "4")
  with open(run / "metrics.jsonl", "a") as metrics:
    metrics.write('{"step": 4, "loss": 1.')  # a line cut short by the kill
  train_loop.train_and_evaluate(config, run)
  assert _metric_steps(run) == [(1, False), (2, False), (3, False), (4, False), (4, True)]
  # Evaluating a finished run again replaces its evaluation line.
  train_loop.train_and_evaluate(config, run)
  assert _metric_steps(run) == [(1, False), (2, False), (3, False), (4, False), (4, True)]


@pytest.mark.parametrize("layout", ["file", "under_a_file"])
def test_a_work_dir_that_cannot_be_a_directory_is_refused_before_anything(tmp_path, config, layout):
  blocker = tmp_path / "blocker"
  blocker.write_text("a file")
  path = blocker if layout == "file" else blocker / "run"
  with pytest.raises(WorkdirError, match=r"blocker is a file, not a directory"):
    train_loop.train_and_evaluate(config, path)
  assert blocker.read_text() == "a file"


def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoints(run, config, monkeypatch, capsys):
  from experiments import coco_retinanet  # pylint: disable=g-import-not-at-top
  from focal_jax.engine import workdir as workdir_module  # pylint: disable=g-import-not-at-top

  def disk_full(self, step, state):
    raise OSError(errno.ENOSPC, "No space left on device", str(run / "checkpoints" / str(step)))

  monkeypatch.setattr(workdir_module.Checkpointer, "save", disk_full)
  monkeypatch.setattr(coco_retinanet.configs, "get_config", lambda name: config)
  (run / "checkpoints" / "4").rename(run / "gone")  # resume at step 2: step 4 is saved again
  assert coco_retinanet.main(["--workdir", str(run)]) == 2
  err = capsys.readouterr().err
  assert f"error: {run / 'checkpoints' / '4'}: No space left on device." in err and "Traceback" not in err
  assert _steps(run) == [2]


def test_ctrl_c_stops_cleanly_with_status_130(run, config, monkeypatch, capsys):
  from experiments import coco_retinanet  # pylint: disable=g-import-not-at-top

  def interrupt(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(coco_retinanet.configs, "get_config", lambda name: config)
  monkeypatch.setattr(train_loop, "compile_train_step", interrupt)
  assert coco_retinanet.main(["--workdir", str(run)]) == 130
  err = capsys.readouterr().err
  assert "interrupted" in err and "Traceback" not in err
  assert _steps(run) == [2, 4]


def test_shape_check_names_the_differing_variables(run):
  variables, step = Workdir(run).restore_variables()
  like = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), variables)
  assert Workdir(run).restore_variables(like=like)[1] == step == 4
  kernel = like["params"]["head"]["classification_head"]["predictor"]["kernel"]
  like["params"]["head"]["classification_head"]["predictor"]["kernel"] = np.zeros(kernel.shape[:-1] + (7,))
  with pytest.raises(WorkdirError, match=r"does not fit .*predictor/kernel: .* in the checkpoint"):
    Workdir(run).restore_variables(like=like)
