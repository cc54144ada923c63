"""The experiment configuration: plain frozen dataclasses, overridable field by field.

`ExperimentConfig` gathers every section a run depends on; the recipes in
`experiments/configs/` build instances of it, and
`apply_overrides(config, ["optimizer.learning_rate=0.02", ...])` changes any
field from the command line (values are Python literals; bare words are
strings). Unknown keys are errors, never silently ignored.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import types
import typing
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

from focal_jax._fields import check_field_types
from focal_jax.data.config import InputConfig
from focal_jax.models import RetinaNet
from focal_jax.ops.anchors import AnchorConfig, anchors_per_level
from focal_jax.ops.losses import BOX_LOSSES, CLASSIFICATION_LOSSES, NORMALIZERS
from focal_jax.ops.postprocess import PostprocessConfig


# `RetinaNet` fields that a config does not set directly: the classes come from the
# data, the levels and anchors per location from the anchor config, the dtypes
# from `compute_dtype`.
_DERIVED_MODEL_FIELDS = ("num_classes", "min_level", "max_level", "num_anchors", "dtype", "param_dtype",
                         "parent", "name")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _check_model_config(config) -> None:
  check_field_types(config, "model")
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"model.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}; got "
                     f"{config.compute_dtype!r}.")


def _model_config_fields() -> list[tuple[str, Any, dataclasses.Field]]:
  hints = typing.get_type_hints(RetinaNet)
  fields = [(field.name, hints[field.name], dataclasses.field(default=field.default))
            for field in dataclasses.fields(RetinaNet) if field.name not in _DERIVED_MODEL_FIELDS]
  return fields + [("compute_dtype", str, dataclasses.field(default="float32"))]


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", _model_config_fields(), frozen=True, namespace={"__post_init__": _check_model_config})
ModelConfig.__module__ = __name__
ModelConfig.__doc__ = """The network: the fields of `focal_jax.models.RetinaNet`, with its defaults.

All of `RetinaNet`'s fields but those a run derives, so that they always agree:
the number of classes comes from the data, the levels and anchors per
location from the anchor config, and `compute_dtype` ("float32", "bfloat16"
or "float16") gives the computation dtype (parameters stay float32).
`cpu_rewrites` chooses how XLA:CPU computes the same values
(`focal_jax.models.CpuRewrites`); it never changes the variables.
"""


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Anchor matching and the RetinaNet loss (see `focal_jax.ops.matching`, `focal_jax.ops.losses`).

  `classification="focal"` is the focal loss with `alpha` and `gamma`
  (`gamma=0`: the alpha-balanced cross-entropy); `"ohem"` is the paper's
  online hard example mining baseline (`focal_jax.ops.ohem`): plain
  cross-entropy over `ohem_batch_size` anchors per image, at most a
  `ohem_positive_fraction` of them positive (None: no ratio), after NMS at
  `ohem_iou_threshold`.
  """

  foreground_iou: float = 0.5
  background_iou: float = 0.4
  allow_low_quality: bool = True
  classification: str = "focal"
  alpha: float | None = 0.25  # None: no weighting of positives against negatives
  gamma: float = 2.0
  ohem_batch_size: int = 256
  ohem_positive_fraction: float | None = None
  ohem_iou_threshold: float = 0.7
  box_loss: str = "smooth_l1"
  smooth_l1_beta: float = 0.1
  normalizer: str = "batch"

  def __post_init__(self):
    check_field_types(self, "loss")
    if not 0.0 <= self.background_iou <= self.foreground_iou <= 1.0:
      raise ValueError(f"loss needs 0 <= background_iou <= foreground_iou <= 1; got {self.background_iou} and "
                       f"{self.foreground_iou}.")
    if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"loss.alpha weighs the positives, in [0, 1] (None: no weighting); got {self.alpha}.")
    if self.gamma < 0:
      raise ValueError(f"loss.gamma must be >= 0; got {self.gamma}.")
    if self.smooth_l1_beta < 0:
      raise ValueError(f"loss.smooth_l1_beta must be >= 0; got {self.smooth_l1_beta}.")
    if self.box_loss not in BOX_LOSSES:
      raise ValueError(f"loss.box_loss must be one of {', '.join(BOX_LOSSES)}; got {self.box_loss!r}.")
    if self.classification not in CLASSIFICATION_LOSSES:
      raise ValueError(f"loss.classification must be one of {', '.join(CLASSIFICATION_LOSSES)}; got "
                       f"{self.classification!r}.")
    if self.ohem_batch_size < 1:
      raise ValueError(f"loss.ohem_batch_size must be positive; got {self.ohem_batch_size}.")
    if self.ohem_positive_fraction is not None and not 0.0 < self.ohem_positive_fraction <= 1.0:
      raise ValueError(f"loss.ohem_positive_fraction must be in (0, 1] or None; got "
                       f"{self.ohem_positive_fraction}.")
    if not 0.0 <= self.ohem_iou_threshold <= 1.0:
      raise ValueError(f"loss.ohem_iou_threshold must be in [0, 1]; got {self.ohem_iou_threshold}.")
    if self.normalizer not in NORMALIZERS:
      raise ValueError(f"loss.normalizer must be one of {', '.join(NORMALIZERS)}; got {self.normalizer!r}.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer and learning-rate schedule.

  `schedule="step"`: linear warmup from `learning_rate * warmup_start_factor`
  over `warmup_steps`, then multiplied by `decay_factor` at each of
  `decay_boundaries` (detectron2's 1x: lr 0.01 at batch 16, boundaries 60k and
  80k of 90k). `schedule="cosine"`: the same warmup, then cosine decay to 0 at
  the last step.
  """

  name: str = "sgd"  # "sgd" (momentum) or "adamw"
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 1e-4
  decay_norm_and_bias: bool = True
  warmup_steps: int = 1000
  warmup_start_factor: float = 0.001
  schedule: str = "step"
  decay_boundaries: tuple[int, ...] = (60000, 80000)
  decay_factor: float = 0.1
  clip_grad_norm: float = 0.0  # 0: no clipping

  def __post_init__(self):
    check_field_types(self, "optimizer")
    if self.name not in ("sgd", "adamw"):
      raise ValueError(f"optimizer.name must be 'sgd' or 'adamw'; got {self.name!r}.")
    if self.schedule not in ("step", "cosine"):
      raise ValueError(f"optimizer.schedule must be 'step' or 'cosine'; got {self.schedule!r}.")
    if not self.learning_rate > 0:
      raise ValueError(f"optimizer.learning_rate must be positive; got {self.learning_rate}.")
    if not 0.0 <= self.momentum < 1.0:
      raise ValueError(f"optimizer.momentum must be in [0, 1); got {self.momentum}.")
    for name in ("weight_decay", "warmup_steps", "clip_grad_norm"):
      if getattr(self, name) < 0:
        raise ValueError(f"optimizer.{name} must be >= 0; got {getattr(self, name)}.")
    if not 0.0 < self.warmup_start_factor <= 1.0:
      raise ValueError(f"optimizer.warmup_start_factor must be in (0, 1]; got {self.warmup_start_factor}.")
    if not 0.0 < self.decay_factor <= 1.0:
      raise ValueError(f"optimizer.decay_factor must be in (0, 1]; got {self.decay_factor}.")
    if any(b < 0 for b in self.decay_boundaries) or list(self.decay_boundaries) != sorted(set(self.decay_boundaries)):
      raise ValueError(f"optimizer.decay_boundaries must be increasing steps >= 0; got {self.decay_boundaries}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The loop: length, logging, checkpoints and evaluation.

  `data.batch_size` (and `data.eval_batch_size`) is the global batch; each of
  N processes reads `data.batch_size / N` examples per step (it must divide).
  """

  total_steps: int = 90000  # 0: evaluate the initial (e.g. init_checkpoint) weights only
  log_every: int = 50
  checkpoint_every: int = 5000
  keep_checkpoints: int = 3
  eval_every: int = 0  # 0: evaluate once, at the end
  seed: int = 0
  # Weights to start from when the work dir has no checkpoint: a directory written by
  # `python -m focal_jax.convert` (a backbone-only one initialises just the backbone) or
  # another training work dir (its latest checkpoint; a class head of another size starts afresh).
  init_checkpoint: str | None = None

  def __post_init__(self):
    check_field_types(self, "train")
    if self.total_steps < 0:
      raise ValueError(f"train.total_steps must be >= 0 (0 only evaluates); got {self.total_steps}.")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"train.{name} must be positive; got {getattr(self, name)}.")
    if self.eval_every < 0:
      raise ValueError(f"train.eval_every must be >= 0 (0: only at the end); got {self.eval_every}.")
    if self.init_checkpoint is not None and not self.init_checkpoint.strip():
      raise ValueError("train.init_checkpoint must be a directory or None.")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything a run depends on."""

  model: ModelConfig = ModelConfig()
  anchors: AnchorConfig = AnchorConfig()
  loss: LossConfig = LossConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  data: InputConfig = InputConfig()
  postprocess: PostprocessConfig = PostprocessConfig()
  train: TrainConfig = TrainConfig()

  def __post_init__(self):
    check_field_types(self, "config")
    try:  # the model's own checks, with the levels and anchors per location of the anchor config
      model_from_config(self, num_classes=1)
    except ValueError as error:
      raise ValueError(f"model (with anchors levels {self.anchors.min_level}-{self.anchors.max_level}): "
                       f"{error}") from None
    _check_anchors(self.data, self.anchors, self.loss)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.model.compute_dtype)


def model_from_config(config: ExperimentConfig, num_classes: int | None = None) -> RetinaNet:
  """The `RetinaNet` module of an experiment config (classes from the data, levels from the anchors).

  Every field of `config.model` but `compute_dtype` is a `RetinaNet` field of
  the same name, passed as it is (nested dataclasses stay dataclasses);
  `compute_dtype` becomes the module's `dtype`. `num_classes` (default: the
  data's label map) is for building the model without reading the data.
  """
  fields = {field.name: getattr(config.model, field.name) for field in dataclasses.fields(config.model)
            if field.name != "compute_dtype"}
  return RetinaNet(num_classes=config.data.num_classes if num_classes is None else num_classes,
                   min_level=config.anchors.min_level, max_level=config.anchors.max_level,
                   num_anchors=config.anchors.anchors_per_location, dtype=config.compute_dtype, **fields)


def _check_anchors(data: InputConfig, anchors: AnchorConfig, loss: LossConfig) -> None:
  """Refuses an OHEM batch larger than an image's anchors, and anchors that would not fit in memory."""
  count = sum(anchors_per_level(data.padded_size, anchors))
  if loss.classification == "ohem" and loss.ohem_batch_size > count:
    raise ValueError(f"loss.ohem_batch_size {loss.ohem_batch_size} exceeds the {count} anchors of an image "
                     f"of {data.padded_size}.")
  needed = count * data.max_boxes * data.batch_size * 4
  try:
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
    return
  if needed > available:
    raise ValueError(
        f"data.image_size {data.image_size} (padded to {data.padded_size}) gives {count:,} anchors per image: "
        f"matching a batch of {data.batch_size} to {data.max_boxes} boxes needs {needed / 2**30:,.0f} GiB, "
        f"more than this machine's {available / 2**30:,.0f} GiB of memory.")


def _field_names(config) -> list[str]:
  names = []
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if dataclasses.is_dataclass(value):
      names += [f"{field.name}.{sub}" for sub in _field_names(value)]
    else:
      names.append(field.name)
  return names


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _coerce(key: str, value: Any, current: Any) -> Any:
  """Checks an override against the type of the value it replaces."""
  if current is None or value is None:
    return value
  if isinstance(current, bool):
    if not isinstance(value, bool):
      raise ValueError(f"{key} takes True or False; got {value!r}.")
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if isinstance(current, tuple) and isinstance(value, (list, tuple, int, float)):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
  if not isinstance(value, type(current)):
    raise ValueError(f"{key} takes a {type(current).__name__}; got {value!r}.")
  return value


def _replace(config, path: Sequence[str], value: Any, key: str):
  name = path[0]
  if not dataclasses.is_dataclass(config) or name not in {f.name for f in dataclasses.fields(config)}:
    raise KeyError(name)
  current = getattr(config, name)
  if len(path) > 1:
    value = _replace(current, path[1:], value, key)
  else:
    value = _coerce(key, value, current)
  return dataclasses.replace(config, **{name: value})


def apply_overrides(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
  """Returns `config` with `section.field=value` overrides applied.

  Raises:
    ValueError: for a malformed override, an unknown key (the message lists
      the valid ones) or a value of the wrong type.
  """
  for override in overrides:
    key, sep, text = override.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
      raise ValueError(f"override {override!r} is not of the form section.field=value.")
    try:
      config = _replace(config, key.split("."), _parse_value(text.strip()), key)
    except KeyError:
      raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(_field_names(config))}.") from None
  return config


def to_json(config: ExperimentConfig) -> str:
  """The config as JSON (tuples as lists), as saved in a work dir."""
  return json.dumps(dataclasses.asdict(config), indent=2, sort_keys=True)


def _dataclass_in(hint) -> type | None:
  """The dataclass named by a type hint (`X` or `X | None`), if any."""
  if dataclasses.is_dataclass(hint):
    return hint
  if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
    return next((arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)), None)
  return None


def _tuples(value):
  """JSON lists back to the tuples the configs hold."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _from_dict(cls, values: dict, where: str):
  hints = typing.get_type_hints(cls)
  unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
  if unknown:
    raise ValueError(f"{where} has fields this version of focal_jax does not know: {', '.join(unknown)}.")
  fields = {}
  for name, value in values.items():
    nested = _dataclass_in(hints[name])
    fields[name] = (_from_dict(nested, value, f"{where}.{name}") if isinstance(value, dict) and nested
                    else _tuples(value))
  return cls(**fields)


def from_json(text: str, where: str = "config") -> ExperimentConfig:
  """The config of `to_json(config)` (e.g. a work dir's config.json).

  Raises:
    ValueError: unknown fields (named, with `where`) or invalid values.
  """
  try:
    return _from_dict(ExperimentConfig, json.loads(text), where)
  except TypeError as error:
    raise ValueError(f"{where}: {error}") from None


# Sections whose change makes a checkpoint unusable, and the fields within them that do not.
MODEL_DEFINING_SECTIONS = ("model", "anchors")
COMPUTATION_ONLY_FIELDS = ("model.cpu_rewrites",)


def differing_fields(config: ExperimentConfig, other: ExperimentConfig,
                     sections: Sequence[str] = MODEL_DEFINING_SECTIONS) -> list[str]:
  """`section.field` names whose values differ between two configs, within `sections`.

  `COMPUTATION_ONLY_FIELDS` (how the same values are computed) never count.
  """
  a, b = json.loads(to_json(config)), json.loads(to_json(other))
  return [f"{section}.{key}" for section in sections
          for key in sorted(set(a[section]) | set(b.get(section, {})))
          if a[section].get(key) != b.get(section, {}).get(key)
          and f"{section}.{key}" not in COMPUTATION_ONLY_FIELDS]
