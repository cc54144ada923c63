"""Weights to start from: converted checkpoints and training work dirs.

A pretrained directory (what `python -m focal_jax.convert` writes) holds

    variables/            orbax checkpoint of {"params": ..., "batch_stats": ...}
    focal_jax_pretrained.json   {"variant", "scope", "num_classes", "source", "source_sha256"}

`scope` is the module of a RetinaNet the variables belong to: "" for a whole
RetinaNet, "backbone" for an ImageNet ResNet. A training work dir (what
`experiments.coco_retinanet` writes: `config.json`, `checkpoints/N/`) gives
the variables of its latest train state. `init_from_pretrained` puts either
into the variables of a new model (`--train.init_checkpoint=DIR` in
`experiments.coco_retinanet`), e.g. to fine-tune a trained model on a dataset
of other classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from focal_jax.convert.torchvision import RESNET_VARIANTS, TorchvisionModel

METADATA_FILE = "focal_jax_pretrained.json"
VARIABLES_DIR = "variables"
WORKDIR_CONFIG = "config.json"  # with checkpoints/N/: a training work dir
_CHECKPOINT_ITEM = "default"  # the item name of the train state in checkpoints/N/ (orbax's for one item)
# The classification head's last layer: its shape depends on the number of classes.
CLASS_PREDICTOR = ("head", "classification_head", "predictor")
_BOX_PREDICTOR_BIAS = ("head", "regression_head", "predictor", "bias")
_LISTED = 8

log = logging.getLogger(__name__)


def _sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for chunk in iter(lambda: file.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def save_pretrained(directory: str | os.PathLike, converted: TorchvisionModel, variant: str,
                    source: str | os.PathLike | None = None) -> Path:
  """Writes `converted.variables` and their description to the new `directory`.

  The files are written to a temporary sibling that is renamed at the end, so
  `directory` is either complete or absent.

  Raises:
    FileExistsError: `directory` exists already.
  """
  directory = Path(directory).absolute()
  if directory.exists():
    raise FileExistsError(f"{directory} exists already; choose a new --out directory.")
  metadata = {
      "variant": variant,
      "scope": "backbone" if variant in RESNET_VARIANTS else "",
      "num_classes": getattr(converted.model, "num_classes", None),
      "source": None if source is None else os.path.basename(source),
      "source_sha256": None if source is None else _sha256(source),
  }
  staging = directory.with_name(f".{directory.name}.partial")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(staging / VARIABLES_DIR, converted.variables)
      checkpointer.wait_until_finished()
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    staging.rename(directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory


def load_pretrained(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
  """`(variables, metadata)` of a pretrained directory; the variables as NumPy arrays."""
  directory = Path(directory).absolute()
  if not (directory / METADATA_FILE).is_file():
    raise FileNotFoundError(f"{directory} is not a converted checkpoint (no {METADATA_FILE}); write one with "
                            "python -m focal_jax.convert.")
  metadata = json.loads((directory / METADATA_FILE).read_text())
  with ocp.StandardCheckpointer() as checkpointer:
    shapes = checkpointer.metadata(directory / VARIABLES_DIR).item_metadata
    target = jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), dict(shapes))
    variables = checkpointer.restore(directory / VARIABLES_DIR, target)
  return variables, metadata


def load_workdir_variables(workdir: str | os.PathLike, step: int | None = None) -> tuple[dict[str, Any], int]:
  """`(variables, step)` of a training work dir's checkpoint (the latest unless `step`), as NumPy arrays.

  Only `params` and `batch_stats` are read (not the optimizer state).

  Raises:
    ValueError: the work dir has no (finished) checkpoint, or none at `step`;
      the message says what to do.
  """
  checkpoints = Path(workdir).absolute() / "checkpoints"
  if not checkpoints.is_dir():
    raise ValueError(f"{workdir} has no checkpoints/ folder; train first (python -m experiments.coco_retinanet "
                     f"--workdir {workdir}).")
  manager = ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps())
  manager.close()
  if not steps:
    raise ValueError(f"{checkpoints} holds no finished checkpoint; train longer (checkpoints are saved every "
                     "train.checkpoint_every steps and at the end).")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise ValueError(f"no checkpoint at step {step} in {checkpoints}; there are steps {', '.join(map(str, steps))}.")
  path = checkpoints / str(step) / _CHECKPOINT_ITEM
  with ocp.PyTreeCheckpointer() as checkpointer:
    saved = checkpointer.metadata(path).item_metadata
    target = {name: jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), dict(saved[name]))
              for name in ("params", "batch_stats") if saved.get(name)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    variables = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  return variables, step


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(key, "key", key)) for key in path)


def _place(value: np.ndarray, like):
  """`value` with the dtype and placement (sharding) of `like`."""
  value = np.asarray(value, like.dtype)
  if isinstance(like, jax.Array):
    return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])
  return value


def _listing(kind: str, names: list[str]) -> str:
  names = sorted(names)
  more = f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else ""
  return f"  {kind} ({len(names)}): {', '.join(names[:_LISTED])}{more}"


def _source_variables(directory: str | os.PathLike) -> tuple[dict[tuple[str, ...], np.ndarray], tuple, str]:
  """`(variables by path without collection, scope, description)` of a converted checkpoint or work dir."""
  directory = Path(directory).absolute()
  if (directory / METADATA_FILE).is_file():
    variables, metadata = load_pretrained(directory)
    scope = tuple(metadata["scope"].split("/")) if metadata["scope"] else ()
    description = f"{directory} ({metadata['variant']})"
  elif (directory / WORKDIR_CONFIG).is_file():
    variables, step = load_workdir_variables(directory)
    scope, description = (), f"{directory} (step {step})"
  else:
    raise ValueError(f"{directory} is neither a converted checkpoint (no {METADATA_FILE}; write one with "
                     f"python -m focal_jax.convert) nor a training work dir (no {WORKDIR_CONFIG}).")
  flat = {scope + path[1:]: value for path, value in traverse_util.flatten_dict(variables).items()}
  return flat, scope, description


def _class_count_note(source, target, skipped) -> str:
  """Says how many classes the checkpoint and the model have (the anchors from the box predictor)."""
  bias = CLASS_PREDICTOR + ("bias",)
  if bias not in skipped or _BOX_PREDICTOR_BIAS not in target:
    return ""
  anchors = target[_BOX_PREDICTOR_BIAS].shape[-1] // 4
  return (f": {source[bias].shape[-1] // anchors} classes in the checkpoint, "
          f"{target[bias].shape[-1] // anchors} in the model")


def init_from_pretrained(variables: Any, directory: str | os.PathLike) -> Any:
  """`variables` of a new model with those of a converted checkpoint or a work dir in their place.

  `directory` is what `python -m focal_jax.convert` wrote, or a training work
  dir (its latest checkpoint). Variables are matched by module path and name,
  whatever their collection: frozen batch-norm statistics also initialise a
  trainable `BatchNorm` (`scale`/`bias` in `params`, `mean`/`var` in
  `batch_stats`). A RetinaNet checkpoint must fill every variable of the
  model, except the classification head's last layer (`CLASS_PREDICTOR`),
  which stays as initialised (and is logged) when the number of classes
  differs; a backbone checkpoint fills every variable under `backbone`,
  leaving the rest as initialised. The result keeps the structure, dtypes and
  shardings of `variables`, so every process of a multi-host run can call it.

  Raises:
    ValueError: `directory` is neither kind, or variables are missing, unknown
      to the model or of another shape (all listed); nothing is changed.
  """
  source, scope, description = _source_variables(directory)
  target = {_names(path)[1:]: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
  misshapen = [p for p in source if p in target and source[p].shape != target[p].shape]
  skipped = {p for p in misshapen
             if p[:len(CLASS_PREDICTOR)] == CLASS_PREDICTOR and source[p].shape[:-1] == target[p].shape[:-1]}
  problems = {
      "missing": ["/".join(p) for p in target if p[:len(scope)] == scope and p not in source],
      "not in the model": ["/".join(p) for p in source if p not in target],
      "wrong shape": [f"{'/'.join(p)} {source[p].shape} (the model's: {target[p].shape})"
                      for p in misshapen if p not in skipped],
  }
  if any(problems.values()):
    raise ValueError("\n".join(
        [f"{description} does not fit the model; nothing was loaded."]
        + [_listing(kind, paths) for kind, paths in problems.items() if paths]))
  if skipped and jax.process_index() == 0:
    log.info("%s left as initialised (the number of classes differs%s); every other variable is loaded "
             "from %s.", "/".join(CLASS_PREDICTOR), _class_count_note(source, target, skipped), description)
  loaded = {p: value for p, value in source.items() if p not in skipped}
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _place(loaded[_names(path)[1:]], leaf) if _names(path)[1:] in loaded else leaf,
      variables)
