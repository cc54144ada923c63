import dataclasses
import json
import signal

import jax
import numpy as np
import pytest

import focal_jax.engine.loop as train_loop
from focal_jax import data as input_pipeline
from focal_jax.ops.anchors import AnchorConfig, generate_anchors
from focal_jax.engine.config import (ExperimentConfig, LossConfig, ModelConfig, OptimizerConfig, TrainConfig,
                              apply_overrides)
from focal_jax.data import synthetic_shapes_config
from focal_jax.engine.inference import compile_predict_step
from focal_jax.engine.mesh import global_batch, make_mesh
from focal_jax.engine.config import model_from_config
from focal_jax.engine.train_step import compile_train_step, create_train_state
from focal_jax.engine.workdir import IncompatibleWorkdirError, Workdir


def tiny_config(data_dir=None, **train):
  return ExperimentConfig(
      model=ModelConfig(stage_sizes=(1, 1, 1, 1), block="basic", width=8, backbone_norm="bn", frozen_stages=0,
                        fpn_channels=16, head_convs=1, head_channels=16, p6_from="c5"),
      anchors=AnchorConfig(min_level=3, max_level=5, sizes=(16.0, 32.0, 64.0)),
      loss=LossConfig(box_loss="giou"),
      optimizer=OptimizerConfig(name="sgd", learning_rate=0.01, warmup_steps=2, decay_boundaries=(3,)),
      data=synthetic_shapes_config(dataset="synthetic_shapes/tiny", data_dir=data_dir, image_size=64, size_divisibility=64,
                                   batch_size=8, eval_batch_size=8, max_boxes=8, shuffle_buffer=32),
      train=TrainConfig(**{"total_steps": 4, "log_every": 1, "checkpoint_every": 2, **train}))


def _random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  size = config.data.batch_size
  xy = rng.uniform(0, 40, (size, 8, 2))
  return {
      "images": rng.normal(size=(size, 64, 64, 3)).astype(np.float32),
      "boxes": np.concatenate([xy, xy + rng.uniform(8, 24, (size, 8, 2))], -1).astype(np.float32),
      "classes": rng.integers(0, 4, (size, 8)).astype(np.int32),
      "valid": rng.random((size, 8)) < 0.5,
  }


def _state_and_step(config, mesh):
  """Fresh train state and the compiled train step for `config` on `mesh`."""
  model = model_from_config(config)
  state, tx = create_train_state(model, config, jax.random.key(0), mesh)
  anchors = generate_anchors(config.data.padded_size, config.anchors)
  return state, compile_train_step(model, tx, anchors, config.loss, mesh)


def test_eight_devices_match_one_device():
  assert jax.device_count() >= 8, "conftest sets 8 simulated CPU devices"
  config = tiny_config()
  batch = _random_batch(config)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = make_mesh(devices)
    state, step = _state_and_step(config, mesh)
    state, metrics = step(state, global_batch(batch, mesh))
    assert all(leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == len(devices)
               for leaf in jax.tree.leaves(state.params))
    results.append(jax.device_get((metrics, state.params, state.batch_stats)))
  (m1, p1, s1), (m8, p8, s8) = results
  np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["num_foreground"], m8["num_foreground"])
  for a, b in zip(jax.tree.leaves((p1, s1)), jax.tree.leaves((p8, s8))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_initial_state_is_flax_init_under_a_default_jit():
  """The quick compile of initialization (`INIT_COMPILER_OPTIONS`) gives the demo the parameters of a
  default compile, bit for bit (at optimization level 0 it would not: some differ in the last bits)."""
  from experiments import configs  # pylint: disable=g-import-not-at-top  (tests/multihost_worker.py imports this module)
  config = configs.get_config("demo")
  model = model_from_config(config)
  state, _ = create_train_state(model, config, jax.random.key(3), make_mesh(jax.devices()[:1]))
  dummy = np.zeros((1, *config.data.padded_size, 3), np.float32)
  expected = jax.jit(lambda rng: model.init(rng, dummy, train=False))(jax.random.key(3))
  got = {"params": state.params, "batch_stats": state.batch_stats}
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_train_step_compiles_once_and_learns():
  config = tiny_config()
  mesh = make_mesh(jax.devices()[:2])
  state, step = _state_and_step(config, mesh)
  batch = global_batch(_random_batch(config), mesh)
  losses = []
  for _ in range(4):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert step._cache_size() == 1
  assert int(state.step) == 4
  assert losses[-1] < losses[0]


def test_step_with_a_non_finite_loss_leaves_the_state_unchanged():
  config = tiny_config()
  mesh = make_mesh(jax.devices()[:1])
  state, step = _state_and_step(config, mesh)
  state, _ = step(state, global_batch(_random_batch(config), mesh))  # momentum and statistics non-trivial
  before = jax.device_get(state)
  poisoned = _random_batch(config, seed=1)
  poisoned["images"][0, 5, 5, 0] = np.nan
  state, metrics = step(state, global_batch(poisoned, mesh))  # `state` was donated
  assert not np.isfinite(metrics["loss"])
  for kept, old in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(kept, old)
  assert int(state.step) == 1


def test_predict_has_fixed_shapes_and_sorted_scores():
  config = dataclasses.replace(tiny_config(), postprocess=dataclasses.replace(
      tiny_config().postprocess, score_threshold=0.0))
  model = model_from_config(config)
  state, _ = create_train_state(model, config, jax.random.key(0), make_mesh(jax.devices()[:1]))
  predict = compile_predict_step(model, config.anchors, config.postprocess)
  batch = {"images": _random_batch(config)["images"][:3], "scale": np.full(3, 0.5, np.float32),
           "original_size": np.full((3, 2), 128, np.int32)}
  det = predict(state.variables, batch)
  assert det.boxes.shape == (3, 100, 4) and det.scores.shape == (3, 100) and det.classes.shape == (3, 100)
  assert det.valid.all()  # score threshold 0: the top 100 of >100 candidates
  assert np.all(np.diff(np.asarray(det.scores), axis=1) <= 0)
  assert np.all(np.asarray(det.boxes) <= 128) and np.all(np.asarray(det.boxes) >= 0)


def _losses(workdir):
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {l["step"]: l["loss"] for l in lines if "loss" in l}


def _interrupt_at(monkeypatch, call, action):
  """Makes the loop's `call`-th batch trigger `action(batch)`."""
  real = train_loop.global_batch
  calls = {"n": 0}

  def wrapped(batch, mesh):
    calls["n"] += 1
    if calls["n"] == call:
      batch = action(batch)
    return real(batch, mesh)

  monkeypatch.setattr(train_loop, "global_batch", wrapped)


@pytest.mark.slow
def test_stopped_runs_resume_on_the_same_trajectory(synthetic_data_dir, tmp_path, monkeypatch):
  """A SIGTERM and damaged data both stop a run after a checkpoint of its last step; the rerun continues it."""
  config = tiny_config(synthetic_data_dir)  # 4 steps, checkpoints every 2
  straight = train_loop.train_and_evaluate(config, tmp_path / "straight")
  assert set(straight) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}
  assert (tmp_path / "straight" / "eval_4.json").exists()

  def sigterm(batch):
    signal.raise_signal(signal.SIGTERM)
    return batch

  def damaged(batch):
    raise input_pipeline.DamagedDatasetError("reading its record files failed")

  _interrupt_at(monkeypatch, 3, sigterm)
  assert train_loop.train_and_evaluate(config, tmp_path / "preempted") is None  # preempted after step 3
  monkeypatch.undo()
  _interrupt_at(monkeypatch, 4, damaged)  # the batch of step 4 cannot be read
  with pytest.raises(input_pipeline.DamagedDatasetError):
    train_loop.train_and_evaluate(config, tmp_path / "damaged")
  monkeypatch.undo()
  for stopped in ("preempted", "damaged"):
    checkpoints = tmp_path / stopped / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["2", "3"], stopped
  # Both saved the state after step 3; the preempted run's resumes on the uninterrupted trajectory.
  (preempted, _), (damaged, _) = (Workdir(tmp_path / stopped).restore_variables(step=3)
                                  for stopped in ("preempted", "damaged"))
  jax.tree.map(np.testing.assert_array_equal, damaged, preempted)
  train_loop.train_and_evaluate(config, tmp_path / "preempted")
  straight_losses, resumed_losses = _losses(tmp_path / "straight"), _losses(tmp_path / "preempted")
  assert sorted(resumed_losses) == [1, 2, 3, 4]
  for step in range(1, 5):
    np.testing.assert_allclose(resumed_losses[step], straight_losses[step], rtol=1e-5)


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(synthetic_data_dir, tmp_path, monkeypatch):
  config = tiny_config(synthetic_data_dir)

  def poison(batch):
    return {**batch, "images": np.full_like(batch["images"], np.nan)}

  _interrupt_at(monkeypatch, 3, poison)
  with pytest.raises(train_loop.NonFiniteLossError, match="step 3"):
    train_loop.train_and_evaluate(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_incompatible_workdir_is_refused_before_anything_runs(tmp_path):
  config = tiny_config()
  Workdir(tmp_path).prepare(config, state=None)  # no checkpoints yet: only config.json is written
  saved = (tmp_path / "config.json").read_text()
  other = apply_overrides(config, ["model.width=16"])
  with pytest.raises(IncompatibleWorkdirError, match="model.width"):
    train_loop.train_and_evaluate(other, tmp_path)
  assert (tmp_path / "config.json").read_text() == saved
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_missing_dataset_is_one_clear_error_and_touches_nothing(tmp_path):
  from focal_jax.data import DatasetNotFoundError

  config = apply_overrides(tiny_config(), ["data.dataset=coco/2017", f"data.data_dir={tmp_path / 'tfds'}"])
  with pytest.raises(DatasetNotFoundError, match="tfds build coco/2017"):
    train_loop.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_split_the_dataset_lacks_is_refused_before_training(synthetic_data_dir, tmp_path):
  config = apply_overrides(tiny_config(synthetic_data_dir), ["data.eval_split='test'"])
  with pytest.raises(ValueError, match=r"data.eval_split 'test' is not a split of synthetic_shapes/tiny \(it has "
                                       r"train, validation\)"):
    train_loop.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()
  from focal_jax.data import require_prepared  # pylint: disable=g-import-not-at-top

  require_prepared(apply_overrides(config, ["data.eval_split='train[:50%]'"]).data)  # TFDS slices are fine


def test_config_overrides():
  config = apply_overrides(tiny_config(), ["optimizer.learning_rate=0.5", "train.total_steps=7",
                                           "model.head_norm=None", "anchors.sizes=(8, 16, 32)"])
  assert config.optimizer.learning_rate == 0.5 and config.train.total_steps == 7
  assert config.model.head_norm is None and config.anchors.sizes == (8.0, 16.0, 32.0)
  with pytest.raises(ValueError, match="unknown config key 'optimizer.lr'"):
    apply_overrides(config, ["optimizer.lr=0.1"])
  with pytest.raises(ValueError, match="takes a int"):
    apply_overrides(config, ["train.total_steps=many"])
  with pytest.raises(ValueError, match="one size per level"):
    apply_overrides(config, ["anchors.sizes=(8, 16)"])
