"""`train_and_evaluate`: the whole run, from a config and a work dir.

Work dir layout:
  config.json        the config of the run (a resumed run must be compatible)
  checkpoints/N/     orbax checkpoints of the train state after N steps
  metrics.jsonl      one JSON line per log step and per evaluation
  events.out.tfevents.*   the same for TensorBoard
  eval_N.json        the COCO numbers of the evaluation after N steps

Re-running the same command resumes from the latest checkpoint and continues
the same trajectory (the input pipeline skips to that step). SIGTERM
(preemption) saves a checkpoint at the current step and exits cleanly.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import time
from pathlib import Path

import jax
import numpy as np

from focal_jax import data as input_pipeline
from focal_jax.anchors import generate_anchors
from focal_jax.checkpointing import Checkpointer
from focal_jax.config import ExperimentConfig, to_json
from focal_jax.evaluation import coco_evaluate, detections_to_coco, format_table
from focal_jax.inference import compile_predict_step
from focal_jax.parallel import global_batch, make_mesh
from focal_jax.train import TrainState, build_model, compile_train_step, create_train_state

log = logging.getLogger("focal_jax")

# Sections whose change makes an existing checkpoint unusable.
_STATE_DEFINING = ("model", "anchors")


class IncompatibleWorkdirError(ValueError):
  """The work dir holds a run whose config does not fit the requested one."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_workdir(config: ExperimentConfig, workdir: Path) -> None:
  """Refuses a work dir whose saved config defines a different model; writes config.json if new.

  Called before anything is compiled; never overwrites an existing run's files.
  """
  saved_path = workdir / "config.json"
  current = json.loads(to_json(config))
  if saved_path.exists():
    saved = json.loads(saved_path.read_text())
    differing = [f"{section}.{key}" for section in _STATE_DEFINING
                 for key in sorted(set(current[section]) | set(saved.get(section, {})))
                 if current[section].get(key) != saved.get(section, {}).get(key)]
    if saved["data"]["dataset"] != current["data"]["dataset"]:
      differing.append("data.dataset")
    if differing:
      raise IncompatibleWorkdirError(
          f"{workdir} holds a run with a different {', '.join(differing)}; use a new --workdir or the "
          f"config saved in {saved_path}. Nothing was changed.")
    return
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    saved_path.write_text(to_json(config))


class _MetricsLog:
  """Writes scalars to metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: Path):
    self._enabled = jax.process_index() == 0
    if self._enabled:
      from flax.metrics import tensorboard
      self._jsonl = open(workdir / "metrics.jsonl", "a")
      self._tensorboard = tensorboard.SummaryWriter(str(workdir))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.scalar(name, value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()


class _Preemption:
  """Turns SIGTERM into a flag that the loop polls once per step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def evaluate(config: ExperimentConfig, model, variables, mesh, ground_truth: dict) -> dict[str, float]:
  """COCO numbers of `variables` on `config.data.eval_split`."""
  predict = compile_predict_step(model, config.anchors, config.postprocess)
  dataset = input_pipeline.build_eval_dataset(config.data)
  category_ids = config.data.labels.category_ids
  results = []
  for batch in dataset:
    inputs = global_batch({k: batch[k] for k in ("images", "scale", "original_size")}, mesh)
    detections = jax.device_get(predict(variables, inputs))
    results += detections_to_coco(detections.boxes, detections.scores, detections.classes, detections.valid,
                                  batch["image_id"], category_ids)
  return coco_evaluate(ground_truth, results)


def _mean_metrics(pending: list[dict]) -> tuple[dict[str, float], int | None]:
  """Host copies of the pending step metrics: their means and the first non-finite step's offset."""
  fetched = jax.device_get(pending)
  losses = np.array([m["loss"] for m in fetched])
  bad = np.flatnonzero(~np.isfinite(losses))
  means = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}
  return means, (int(bad[0]) if bad.size else None)


def train_and_evaluate(config: ExperimentConfig, workdir: str | Path) -> dict[str, float] | None:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) and evaluates at the end.

  Returns:
    The final COCO numbers, or None when the run was preempted (SIGTERM) and
    saved a checkpoint instead.

  Raises:
    IncompatibleWorkdirError: the work dir holds a run of another model.
    NonFiniteLossError: the loss became NaN/inf (no checkpoint is written
      after the last good one).
    DatasetNotFoundError: the dataset is not prepared.
  """
  workdir = Path(workdir)
  input_pipeline.hide_accelerators_from_tf()
  input_pipeline.require_prepared(config.data)
  check_workdir(config, workdir)
  mesh = make_mesh()
  model = build_model(config)
  anchors = generate_anchors(config.data.padded_size, config.anchors)
  process_count = jax.process_count()
  global_batch_size = config.data.batch_size * process_count
  if global_batch_size % mesh.size:
    raise ValueError(f"global batch {global_batch_size} does not divide over {mesh.size} devices.")

  state, tx = create_train_state(model, config, jax.random.key(config.train.seed), mesh)
  checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
  if (latest := checkpointer.latest_step()) is not None:
    state = checkpointer.restore(latest, state)
    log.info("resumed from %s at step %d", checkpointer.directory, latest)
  start_step = int(state.step)
  total_steps = config.train.total_steps
  train_data = input_pipeline.build_train_dataset(config.data, start_step=start_step)
  step_fn = compile_train_step(model, tx, anchors, config.loss, mesh)
  metrics_log = _MetricsLog(workdir)
  preemption = _Preemption()
  log.info("training %s steps from step %d, global batch %d on %d devices; work dir %s", total_steps,
           start_step, global_batch_size, mesh.size, workdir)

  pending = []
  ground_truth = functools.cache(lambda: input_pipeline.coco_ground_truth(config.data))
  timer = time.perf_counter()
  try:
    for step in range(start_step, total_steps):
      state, metrics = step_fn(state, global_batch(next(train_data), mesh))
      pending.append(metrics)
      done = step + 1
      checkpoint_due = done % config.train.checkpoint_every == 0 or done == total_steps or preemption.requested
      if done % config.train.log_every == 0 or checkpoint_due:
        means, bad = _mean_metrics(pending)
        if bad is not None:
          raise NonFiniteLossError(
              f"the loss is not finite at step {done - len(pending) + bad + 1}; stopping. The last good "
              f"checkpoint (step {checkpointer.latest_step()}) in {checkpointer.directory} is kept.")
        elapsed = time.perf_counter() - timer
        images_per_s = len(pending) * global_batch_size / elapsed
        eta = (total_steps - done) * elapsed / len(pending)
        log.info("step %d/%d  loss %.4f (cls %.4f, box %.4f)  %.1f img/s  ETA %s", done, total_steps,
                 means["loss"], means["classification_loss"], means["box_loss"], images_per_s,
                 time.strftime("%H:%M:%S", time.gmtime(eta)))
        metrics_log.write(done, {**means, "images_per_second": images_per_s})
        pending, timer = [], time.perf_counter()
      if checkpoint_due:
        checkpointer.save(done, state)
      if preemption.requested:
        checkpointer.wait()
        log.warning("SIGTERM: saved a checkpoint at step %d in %s; run the same command to resume.", done,
                    checkpointer.directory)
        return None
      if config.train.eval_every and done % config.train.eval_every == 0 and done < total_steps:
        _evaluate_and_record(config, model, state, mesh, workdir, done, metrics_log, ground_truth())
    checkpointer.wait()
    return _evaluate_and_record(config, model, state, mesh, workdir, total_steps, metrics_log,
                                ground_truth())
  finally:
    preemption.restore()
    metrics_log.close()
    checkpointer.close()


def _evaluate_and_record(config, model, state: TrainState, mesh, workdir: Path, step: int, metrics_log,
                         ground_truth: dict):
  started = time.perf_counter()
  metrics = evaluate(config, model, state.variables, mesh, ground_truth)
  log.info("COCO evaluation after %d steps (%.0f s):\n%s", step, time.perf_counter() - started,
           format_table(metrics))
  metrics_log.write(step, {f"eval/{name}": value for name, value in metrics.items()})
  if jax.process_index() == 0:
    (workdir / f"eval_{step}.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
  return metrics
