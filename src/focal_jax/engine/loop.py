"""`train_and_evaluate`: the whole run, from a config and a work dir.

What a run leaves on disk (config.json, checkpoints, metrics, evaluations,
pictures) is described and handled by `focal_jax.engine.workdir`.

Re-running the same command resumes from the latest checkpoint and continues
the same trajectory (the input pipeline skips to that step). SIGTERM
(preemption) saves a checkpoint at the current step and exits cleanly.

Several processes (after `focal_jax.engine.distributed.initialize`) run the same
call with the same config and work dir (a file system they all see): the
batch sizes of the config are global, each process reads its own share of the
split, every process takes part in each step, checkpoint save and restore and
evaluation, and only process 0 logs progress and writes config.json,
metrics.jsonl, TensorBoard events, eval_N.json and the pictures. A SIGTERM
that reaches any process makes all of them save the same step and return.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from focal_jax import data as input_pipeline
from focal_jax.engine.config import ExperimentConfig, model_from_config
from focal_jax.engine.evaluation import COCO_METRIC_NAMES, coco_evaluate, detections_to_coco, format_table
from focal_jax.engine.inference import compile_predict_step
from focal_jax.engine.mesh import global_batch, local_rows, make_mesh, per_process_batch_size
from focal_jax.engine.pretrained import init_from_pretrained
from focal_jax.engine.train_step import TrainState, compile_train_step, create_train_state
from focal_jax.engine.checkpointer import Checkpointer
from focal_jax.engine.workdir import Workdir
from focal_jax.ops.anchors import generate_anchors
from focal_jax.visualize import eval_batch_figure, plot_training_curves

log = logging.getLogger("focal_jax")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite at `step`; the last good checkpoint is kept."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def _log_progress(message: str, *args, level: int = logging.INFO) -> None:
  """Logs on process 0 only (every process runs the same loop)."""
  if jax.process_index() == 0:
    log.log(level, message, *args)


class _Preemption:
  """SIGTERM as a stop request that the loop polls once per step, on the same step everywhere.

  One process: a Python signal handler sets a flag. Several processes
  (`jax.distributed` initialized): JAX's preemption sync manager owns SIGTERM
  (which is why such a process no longer dies of it); a notice reaching any
  process spreads to all, and `reached_preemption_sync_point` turns True on
  the same step on every process, so that they all save that step.
  """

  def __init__(self):
    self._synced = jax.distributed.is_initialized()
    self._requested = False
    if not self._synced:
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step` (call once per step, on every process)."""
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def restore(self):
    if not self._synced:
      signal.signal(signal.SIGTERM, self._previous)


def _require_prepared(data: input_pipeline.InputConfig) -> None:
  """Checks the dataset (building synthetic_shapes where allowed) on process 0, then on the others.

  Processes that share a data dir thus never build it at the same time.
  """
  if jax.process_index() == 0:
    input_pipeline.require_prepared(data)
  multihost_utils.sync_global_devices("focal_jax: dataset ready on process 0")
  if jax.process_index() != 0:
    input_pipeline.require_prepared(data)


def per_process_data_config(config: ExperimentConfig, mesh) -> input_pipeline.InputConfig:
  """`config.data` with this process's shares of the global train and eval batch sizes.

  Raises:
    ValueError: a global batch size does not divide over the processes or devices.
  """
  data = config.data
  return dataclasses.replace(
      data, batch_size=per_process_batch_size(data.batch_size, mesh, "data.batch_size"),
      eval_batch_size=per_process_batch_size(data.eval_batch_size or data.batch_size, mesh,
                                             "data.eval_batch_size"))


def evaluate(config: ExperimentConfig, model, variables, mesh, ground_truth: dict | None,
             on_first_batch=None) -> dict[str, float]:
  """COCO numbers of `variables` on `config.data.eval_split`, returned on every process.

  Each process predicts its share of the split; the fixed-size detections and
  image ids of all processes are gathered, and process 0 alone runs
  pycocotools against `ground_truth` (other processes may pass None). Its
  numbers reach the other processes by a broadcast (as float32).
  `on_first_batch(batch, detections)`, when given, sees this process's first
  batch and its rows of the detections (host NumPy, original-image pixels).
  """
  predict = compile_predict_step(model, config.anchors, config.postprocess, mesh)
  dataset = input_pipeline.build_eval_dataset(per_process_data_config(config, mesh))
  leader = jax.process_index() == 0
  results = []
  for index, batch in enumerate(dataset):
    inputs = global_batch({k: batch[k] for k in ("images", "scale", "original_size")}, mesh)
    detections = predict(variables, inputs)
    mine = {"boxes": local_rows(detections.boxes), "scores": local_rows(detections.scores),
            "classes": local_rows(detections.classes), "valid": local_rows(detections.valid),
            "image_id": _int32(batch["image_id"])}
    if index == 0 and on_first_batch is not None:
      on_first_batch(batch, mine)
    every = multihost_utils.process_allgather(mine, tiled=True)  # all processes' rows, process by process
    if leader:
      results += detections_to_coco(every["boxes"], every["scores"], every["classes"], every["valid"],
                                    every["image_id"], config.data.labels.category_ids)
  numbers = coco_evaluate(ground_truth, results) if leader else dict.fromkeys(COCO_METRIC_NAMES, 0.0)
  shared = multihost_utils.broadcast_one_to_all(np.array([numbers[name] for name in COCO_METRIC_NAMES]))
  return numbers if leader else dict(zip(COCO_METRIC_NAMES, map(float, shared)))


def _int32(image_ids: np.ndarray) -> np.ndarray:
  """Image ids as int32 (JAX's integer type, which carries them between processes)."""
  if image_ids.size and image_ids.max() > np.iinfo(np.int32).max:
    raise ValueError(f"image id {image_ids.max()} does not fit in int32.")
  return image_ids.astype(np.int32)


def train_and_evaluate(config: ExperimentConfig, workdir: str | Path) -> dict[str, float] | None:
  """Trains `config` in `workdir` (resuming if it holds checkpoints) and evaluates at the end.

  Returns:
    The final COCO numbers, or None when the run was preempted (SIGTERM) and
    saved a checkpoint instead.

  Raises:
    WorkdirError: the work dir cannot be created or written, or another run
      uses it.
    UnreadableCheckpointsError: none of its checkpoints can be read.
    IncompatibleWorkdirError: the work dir holds a run of another model (in
      its config.json or its checkpoints).
    NonFiniteLossError: the loss became NaN/inf (no checkpoint is written
      after the last good one).
    DatasetNotFoundError: the dataset is not prepared.
    DamagedDatasetError: its record files cannot be read (a single-process
      run first checkpoints the steps trained since its last checkpoint).
  """
  workdir = Workdir(workdir)
  workdir.check_writable()
  mesh = make_mesh()
  data_config = per_process_data_config(config, mesh)  # checks that the batch sizes divide
  _require_prepared(config.data)
  with workdir.lock():
    return _train_and_evaluate(config, workdir, mesh, data_config)


def _train_and_evaluate(config: ExperimentConfig, workdir: Workdir, mesh, data_config) -> dict[str, float] | None:
  """`train_and_evaluate` once the data is checked and the work dir is locked."""
  model = model_from_config(config)
  state, tx = create_train_state(model, config, jax.random.key(config.train.seed), mesh)
  workdir.prepare(config, state)
  checkpointer = workdir.checkpointer(keep=config.train.keep_checkpoints)
  train_data = None
  try:
    state = _restore_or_initialize(state, checkpointer, config.train.init_checkpoint)
    start_step, total_steps = int(state.step), config.train.total_steps
    train_data = input_pipeline.build_train_dataset(data_config, start_step=start_step)
    train_step = compile_train_step(model, tx, generate_anchors(config.data.padded_size, config.anchors),
                                    config.loss, mesh)
    writer = workdir.metric_writer(resume_step=start_step, reevaluate=start_step >= total_steps)
  except BaseException:
    if train_data is not None:
      train_data.close()
    checkpointer.close()
    raise
  progress = _Progress(config, writer, checkpointer)
  preemption = _Preemption()
  ground_truth = functools.cache(  # only process 0 runs pycocotools
      lambda: input_pipeline.coco_ground_truth(config.data) if jax.process_index() == 0 else None)
  _log_progress("training %s steps from step %d, global batch %d (%d per process) on %d devices of %d "
                "processes; work dir %s", total_steps, start_step, config.data.batch_size,
                data_config.batch_size, mesh.size, jax.process_count(), workdir.path)
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = train_step(state, global_batch(next(train_data), mesh))
      progress.add(metrics)
      preempted = preemption.requested(step)
      checkpoint_due = step % config.train.checkpoint_every == 0 or step == total_steps or preempted
      if step % config.train.log_every == 0 or checkpoint_due:
        progress.report(step)  # first: a non-finite loss is never checkpointed
      if checkpoint_due:
        checkpointer.save(step, state)
      if preempted:
        checkpointer.wait()
        _log_progress("SIGTERM: saved a checkpoint at step %d in %s; run the same command to resume.", step,
                      checkpointer.directory, level=logging.WARNING)
        return None
      if config.train.eval_every and step % config.train.eval_every == 0 and step < total_steps:
        _evaluate_and_record(config, model, state, mesh, workdir, step, writer, ground_truth())
    checkpointer.wait()
    metrics = _evaluate_and_record(config, model, state, mesh, workdir, total_steps, writer, ground_truth())
    if jax.process_index() == 0:
      _write_picture(workdir.curves_path, lambda path: plot_training_curves(workdir.metrics_path, path))
    return metrics
  except input_pipeline.DamagedDatasetError:
    _save_before_stopping(state, progress, checkpointer)
    raise
  finally:
    preemption.restore()
    train_data.close()
    writer.close()
    checkpointer.close()


def _save_before_stopping(state: TrainState, progress: _Progress, checkpointer: Checkpointer) -> None:
  """Checkpoints the steps trained since the last checkpoint, when a single-process run stops on damaged data.

  With several processes none is saved: a save needs every process, and the
  others wait in the collectives of their next step.
  """
  if jax.process_count() > 1:
    return
  checkpointer.wait()
  step = int(state.step)
  if step == (checkpointer.latest_step() or 0):
    return
  progress.report(step)  # first: a non-finite loss is never checkpointed
  checkpointer.save(step, state)
  checkpointer.wait()
  _log_progress("saved a checkpoint at step %d in %s before stopping.", step, checkpointer.directory,
                level=logging.WARNING)


def _restore_or_initialize(state: TrainState, checkpointer: Checkpointer, init_checkpoint: str | None):
  """`state` from the newest readable checkpoint, else with the weights of `init_checkpoint`, else as it is."""
  restored, step = checkpointer.restore_latest(state)
  if step is not None:
    _log_progress("resumed from %s at step %d", checkpointer.directory, step)
    return restored
  if init_checkpoint:  # weights converted by `python -m focal_jax.convert`, or another work dir
    variables = init_from_pretrained(state.variables, init_checkpoint)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    _log_progress("initialized from %s", init_checkpoint)
  return state


class _Progress:
  """The step metrics since the last report; `report` checks them, logs progress and writes their means.

  Metrics stay on the device until a report, so that steps are dispatched
  without waiting for the previous one.
  """

  def __init__(self, config: ExperimentConfig, writer, checkpointer: Checkpointer):
    self._total_steps = config.train.total_steps
    self._global_batch_size = config.data.batch_size
    self._writer = writer
    self._checkpointer = checkpointer
    self._pending = []
    self._started = time.perf_counter()

  def add(self, metrics: dict) -> None:
    self._pending.append(metrics)

  def report(self, step: int) -> None:
    """Logs and writes the means of the pending steps, which end with `step` (nothing if none is pending).

    Raises:
      NonFiniteLossError: a pending step's loss is not finite (named by its number).
    """
    if not self._pending:
      return
    fetched = jax.device_get(self._pending)
    bad = np.flatnonzero(~np.isfinite([m["loss"] for m in fetched]))
    if bad.size:
      bad_step = step - len(fetched) + int(bad[0]) + 1
      raise NonFiniteLossError(
          f"the loss is not finite at step {bad_step}; stopping. The last good checkpoint (step "
          f"{self._checkpointer.latest_step()}) in {self._checkpointer.directory} is kept.", bad_step)
    means = {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}
    elapsed = time.perf_counter() - self._started
    images_per_s = len(fetched) * self._global_batch_size / elapsed
    eta = (self._total_steps - step) * elapsed / len(fetched)
    _log_progress("step %d/%d  loss %.4f (cls %.4f, box %.4f)  %.1f img/s  ETA %s", step, self._total_steps,
                  means["loss"], means["classification_loss"], means["box_loss"], images_per_s,
                  time.strftime("%H:%M:%S", time.gmtime(eta)))
    _write_scalars(self._writer, step, {**means, "images_per_second": images_per_s})
    self._pending, self._started = [], time.perf_counter()


def _write_scalars(writer, step: int, scalars: dict[str, float]) -> None:
  """Writes `scalars` of `step` and flushes them, so that they are on disk whenever a run stops."""
  writer.write_scalars(step, scalars)
  writer.flush()


def _evaluate_and_record(config: ExperimentConfig, model, state: TrainState, mesh, workdir: Workdir,
                         step: int, writer, ground_truth: dict | None) -> dict[str, float]:
  """`evaluate`, then logs the table and writes the metrics, eval_N.json and visuals/eval_N.png."""
  started = time.perf_counter()

  def draw_first_batch(batch, detections):
    _write_picture(workdir.visuals_path(step),
                   lambda path: _save_eval_figure(path, batch, detections, config.data.labels.names))

  metrics = evaluate(config, model, state.variables, mesh, ground_truth,
                     on_first_batch=draw_first_batch if jax.process_index() == 0 else None)
  _log_progress("COCO evaluation after %d steps (%.0f s):\n%s", step, time.perf_counter() - started,
                format_table(metrics))
  _write_scalars(writer, step, {f"eval/{name}": value for name, value in metrics.items()})
  workdir.write_eval(step, metrics)
  return metrics


def _save_eval_figure(path: Path, batch: dict, detections: dict, class_names) -> None:
  """Predictions beside the ground truth for the first images of an eval batch (if any is not padding)."""
  figure = eval_batch_figure(batch, detections, class_names)
  if figure is not None:
    path.parent.mkdir(exist_ok=True)
    figure.save(path)


def _write_picture(path: Path, write) -> None:
  """`write(path)`, where a failure only logs a warning: pictures never stop a run."""
  try:
    write(path)
  except Exception as error:  # pylint: disable=broad-except
    log.warning("could not write %s: %s", path, error)
