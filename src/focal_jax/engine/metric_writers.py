"""clu metric writers for a work dir: `JsonlWriter` (metrics.jsonl) beside clu's TensorBoard writer.

`focal_jax.engine.workdir.Workdir.metric_writer` combines them with clu's
`MultiWriter`; importing this module loads clu and TensorFlow (the `[train]`
extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from focal_jax._extras import require

_clu_writers = require("clu.metric_writers")

MultiWriter = _clu_writers.MultiWriter
SummaryWriter = _clu_writers.SummaryWriter


class JsonlWriter(_clu_writers.MetricWriter):
  """Appends one JSON line `{"step": N, name: value, ...}` per `write_scalars` call.

  The file is flushed after every line, so that it stays whole (and readable
  by `focal_jax.visualize.plot_training_curves`) while a run goes on and after
  it stops. Values are written as floats. Only scalars have a place in it:
  the other kinds of summaries raise TypeError.
  """

  def __init__(self, path: str | os.PathLike):
    self._file = open(path, "a")  # a resumed run continues the same file

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    self._file.write(json.dumps({"step": int(step), **{name: float(v) for name, v in scalars.items()}}) + "\n")
    self._file.flush()

  def _not_a_scalar(self, *args, **kwargs):
    del args, kwargs
    raise TypeError("metrics.jsonl holds scalars only; write other summaries to TensorBoard.")

  write_summaries = write_images = write_videos = write_audios = write_texts = _not_a_scalar
  write_histograms = write_hparams = _not_a_scalar

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
