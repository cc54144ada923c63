"""Weights to start from: pretrained directories and training work dirs.

A pretrained directory (`python -m focal_jax.convert` writes one) holds

    variables/                  orbax checkpoint of {"params": ..., "batch_stats": ...}
    focal_jax_pretrained.json   {"variant", "scope", "num_classes", "source", "source_sha256"}

`scope` is the module of a RetinaNet the variables belong to: "" for a whole
RetinaNet, "backbone" for an ImageNet ResNet. A training work dir
(`focal_jax.engine.workdir`) gives the variables of its latest train state.
`init_from_pretrained` puts either into the variables of a new model
(`--train.init_checkpoint=DIR`), e.g. to fine-tune a trained model on a
dataset of other classes.
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

from focal_jax._messages import problem_line
from focal_jax.engine.workdir import CONFIG_FILE, Workdir

METADATA_FILE = "focal_jax_pretrained.json"
VARIABLES_DIR = "variables"
# The classification head's last layer: its shape depends on the number of classes.
CLASS_PREDICTOR = ("head", "classification_head", "predictor")
_BOX_PREDICTOR_BIAS = ("head", "regression_head", "predictor", "bias")

log = logging.getLogger(__name__)


def _sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for chunk in iter(lambda: file.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def write_pretrained(directory: str | os.PathLike, variables: Any, *, variant: str, scope: str = "",
                     num_classes: int | None = None, source: str | os.PathLike | None = None) -> Path:
  """Writes `variables` and their description as the new pretrained `directory`.

  Args:
    directory: the directory to create.
    variables: `{"params": ..., "batch_stats": ...}` of the model `variant`.
    variant: the name of the architecture (e.g. "resnet50").
    scope: the RetinaNet module the variables belong to ("" for a whole
      RetinaNet, "backbone" for a ResNet).
    num_classes: the classes of a whole RetinaNet (None for a backbone).
    source: the file the variables were converted from (its name and SHA-256
      are recorded).

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
      "scope": scope,
      "num_classes": num_classes,
      "source": None if source is None else os.path.basename(source),
      "source_sha256": None if source is None else _sha256(source),
  }
  staging = directory.with_name(f".{directory.name}.partial")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(staging / VARIABLES_DIR, variables)
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


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(key, "key", key)) for key in path)


def _place(value: np.ndarray, like):
  """`value` with the dtype and placement (sharding) of `like`."""
  value = np.asarray(value, like.dtype)
  if isinstance(like, jax.Array):
    return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])
  return value


def _source_variables(directory: str | os.PathLike) -> tuple[dict[tuple[str, ...], np.ndarray], tuple, str]:
  """`(variables by path without collection, scope, description)` of a converted checkpoint or work dir."""
  directory = Path(directory).absolute()
  if (directory / METADATA_FILE).is_file():
    variables, metadata = load_pretrained(directory)
    scope = tuple(metadata["scope"].split("/")) if metadata["scope"] else ()
    description = f"{directory} ({metadata['variant']})"
  elif (workdir := Workdir(directory)).is_training_workdir():
    variables, step = workdir.restore_variables()
    scope, description = (), f"{directory} (step {step})"
  else:
    raise ValueError(f"{directory} is neither a converted checkpoint (no {METADATA_FILE}; write one with "
                     f"python -m focal_jax.convert) nor a training work dir (no {CONFIG_FILE}).")
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
        + [problem_line(kind, sorted(paths)) for kind, paths in problems.items() if paths]))
  if skipped and jax.process_index() == 0:
    log.info("%s left as initialised (the number of classes differs%s); every other variable is loaded "
             "from %s.", "/".join(CLASS_PREDICTOR), _class_count_note(source, target, skipped), description)
  loaded = {p: value for p, value in source.items() if p not in skipped}
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _place(loaded[_names(path)[1:]], leaf) if _names(path)[1:] in loaded else leaf,
      variables)
