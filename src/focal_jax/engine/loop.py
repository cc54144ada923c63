"""`train_and_evaluate`: the whole run, from a config and a work dir.

Work dir layout:
  config.json        the config of the run (a resumed run must be compatible)
  checkpoints/N/     orbax checkpoints of the train state after N steps
  metrics.jsonl      one JSON line per log step and per evaluation
  events.out.tfevents.*   the same for TensorBoard
  eval_N.json        the COCO numbers of the evaluation after N steps
  visuals/eval_N.png a few validation images: predictions of step N beside the ground truth
  training_curves.png  losses and COCO AP/AP50 against the step (written at the end of a run)

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
import json
import logging
import signal
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from focal_jax import data as input_pipeline
from focal_jax.ops.anchors import generate_anchors
from focal_jax.engine.workdir import Checkpointer
from focal_jax.engine.config import ExperimentConfig, differing_fields, from_json, to_json
from focal_jax.convert.pretrained import init_from_pretrained
from focal_jax.engine.evaluation import COCO_METRIC_NAMES, coco_evaluate, detections_to_coco, format_table
from focal_jax.engine.inference import compile_predict_step
from focal_jax.engine.mesh import global_batch, local_rows, make_mesh, per_process_batch_size
from focal_jax.engine.train_step import TrainState, build_model, compile_train_step, create_train_state
from focal_jax.visualize import eval_batch_figure, plot_training_curves

log = logging.getLogger("focal_jax")


class IncompatibleWorkdirError(ValueError):
  """The work dir holds a run whose config does not fit the requested one."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_workdir(config: ExperimentConfig, workdir: Path) -> None:
  """Refuses a work dir whose saved config defines a different model; writes config.json if new.

  Called before anything is compiled; never overwrites an existing run's files.
  The saved config holds the dataset's label map itself, so that the work dir
  alone serves prediction (`focal_jax.predict`) anywhere.
  """
  saved_path = workdir / "config.json"
  if saved_path.exists():
    saved = from_json(saved_path.read_text(), str(saved_path))
    differing = differing_fields(config, saved)
    if saved.data.dataset != config.data.dataset:
      differing.append("data.dataset")
    if differing:
      raise IncompatibleWorkdirError(
          f"{workdir} holds a run with a different {', '.join(differing)}; use a new --workdir or the "
          f"config saved in {saved_path}. Nothing was changed.")
    return
  workdir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:  # written whole, then renamed: other processes may be reading
    partial = saved_path.with_suffix(".json.partial")
    resolved = dataclasses.replace(config, data=dataclasses.replace(config.data, label_map=config.data.labels))
    partial.write_text(to_json(resolved))
    partial.replace(saved_path)


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


def _log_progress(message: str, *args) -> None:
  """Logs on process 0 only (every process runs the same loop)."""
  if jax.process_index() == 0:
    log.info(message, *args)


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
  _require_prepared(config.data)
  mesh = make_mesh()
  data_config = per_process_data_config(config, mesh)  # checks that the batch sizes divide
  check_workdir(config, workdir)
  model = build_model(config)
  anchors = generate_anchors(config.data.padded_size, config.anchors)
  global_batch_size = config.data.batch_size

  state, tx = create_train_state(model, config, jax.random.key(config.train.seed), mesh)
  checkpointer = Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints)
  if (latest := checkpointer.latest_step()) is not None:
    state = checkpointer.restore(latest, state)
    _log_progress("resumed from %s at step %d", checkpointer.directory, latest)
  elif config.train.init_checkpoint:  # weights converted by `python -m focal_jax.convert`
    variables = init_from_pretrained(state.variables, config.train.init_checkpoint)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
    _log_progress("initialized from %s", config.train.init_checkpoint)
  start_step = int(state.step)
  total_steps = config.train.total_steps
  train_data = input_pipeline.build_train_dataset(data_config, start_step=start_step)
  step_fn = compile_train_step(model, tx, anchors, config.loss, mesh)
  # XLA:CPU sends every collective between processes over gloo with the same tag,
  # so two collectives in flight at once can take each other's messages and hang.
  # orbax's asynchronous save runs its barriers (collectives) on a thread of its
  # own, beside the next steps: with several processes on CPU, each save is
  # waited for. Accelerators save in the background.
  wait_for_saves = jax.process_count() > 1 and jax.default_backend() == "cpu"
  metrics_log = _MetricsLog(workdir)
  preemption = _Preemption()
  _log_progress("training %s steps from step %d, global batch %d (%d per process) on %d devices of %d "
                "processes; work dir %s", total_steps, start_step, global_batch_size, data_config.batch_size,
                mesh.size, jax.process_count(), workdir)

  pending = []
  ground_truth = functools.cache(  # only process 0 runs pycocotools
      lambda: input_pipeline.coco_ground_truth(config.data) if jax.process_index() == 0 else None)
  timer = time.perf_counter()
  try:
    for step in range(start_step, total_steps):
      state, metrics = step_fn(state, global_batch(next(train_data), mesh))
      pending.append(metrics)
      done = step + 1
      preempted = preemption.requested(done)
      checkpoint_due = done % config.train.checkpoint_every == 0 or done == total_steps or preempted
      if done % config.train.log_every == 0 or checkpoint_due:
        means, bad = _mean_metrics(pending)
        if bad is not None:
          raise NonFiniteLossError(
              f"the loss is not finite at step {done - len(pending) + bad + 1}; stopping. The last good "
              f"checkpoint (step {checkpointer.latest_step()}) in {checkpointer.directory} is kept.")
        elapsed = time.perf_counter() - timer
        images_per_s = len(pending) * global_batch_size / elapsed
        eta = (total_steps - done) * elapsed / len(pending)
        _log_progress("step %d/%d  loss %.4f (cls %.4f, box %.4f)  %.1f img/s  ETA %s", done, total_steps,
                      means["loss"], means["classification_loss"], means["box_loss"], images_per_s,
                      time.strftime("%H:%M:%S", time.gmtime(eta)))
        metrics_log.write(done, {**means, "images_per_second": images_per_s})
        pending, timer = [], time.perf_counter()
      if checkpoint_due:
        checkpointer.save(done, state)
        if wait_for_saves:
          checkpointer.wait()
      if preempted:
        checkpointer.wait()
        if jax.process_index() == 0:
          log.warning("SIGTERM: saved a checkpoint at step %d in %s; run the same command to resume.", done,
                      checkpointer.directory)
        return None
      if config.train.eval_every and done % config.train.eval_every == 0 and done < total_steps:
        _evaluate_and_record(config, model, state, mesh, workdir, done, metrics_log, ground_truth())
    checkpointer.wait()
    metrics = _evaluate_and_record(config, model, state, mesh, workdir, total_steps, metrics_log,
                                   ground_truth())
    if jax.process_index() == 0:
      _write_picture(workdir / "training_curves.png",
                     lambda path: plot_training_curves(workdir / "metrics.jsonl", path))
    return metrics
  finally:
    preemption.restore()
    metrics_log.close()
    checkpointer.close()


def _evaluate_and_record(config, model, state: TrainState, mesh, workdir: Path, step: int, metrics_log,
                         ground_truth: dict | None):
  started = time.perf_counter()

  def draw_first_batch(batch, detections):
    _write_picture(workdir / "visuals" / f"eval_{step}.png",
                   lambda path: _save_eval_figure(path, batch, detections, config.data.labels.names))

  metrics = evaluate(config, model, state.variables, mesh, ground_truth,
                     on_first_batch=draw_first_batch if jax.process_index() == 0 else None)
  _log_progress("COCO evaluation after %d steps (%.0f s):\n%s", step, time.perf_counter() - started,
                format_table(metrics))
  metrics_log.write(step, {f"eval/{name}": value for name, value in metrics.items()})
  if jax.process_index() == 0:
    (workdir / f"eval_{step}.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
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
