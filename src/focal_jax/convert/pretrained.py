"""Converted weights on disk: an orbax checkpoint of variables plus a JSON description.

A pretrained directory (what `python -m focal_jax.convert` writes) holds

    variables/            orbax checkpoint of {"params": ..., "batch_stats": ...}
    focal_jax_pretrained.json   {"variant", "scope", "num_classes", "source", "source_sha256"}

`scope` is the module of a RetinaNet the variables belong to: "" for a whole
RetinaNet, "backbone" for an ImageNet ResNet. `init_from_pretrained` puts them
into the variables of a new model (`--train.init_checkpoint=DIR` in
`experiments.coco_retinanet`).
"""

from __future__ import annotations

import hashlib
import json
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
_LISTED = 8


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


def init_from_pretrained(variables: Any, directory: str | os.PathLike) -> Any:
  """`variables` of a new model with the pretrained ones of `directory` in their place.

  Variables are matched by module path and name, whatever their collection:
  frozen batch-norm statistics also initialise a trainable `BatchNorm`
  (`scale`/`bias` in `params`, `mean`/`var` in `batch_stats`). A RetinaNet
  checkpoint must fill every variable of the model; a backbone checkpoint
  every variable under `backbone`, leaving the rest as initialised. The
  result keeps the structure, dtypes and shardings of `variables`, so every
  process of a multi-host run can call it.

  Raises:
    ValueError: variables are missing, unknown to the model or of another
      shape (all listed); nothing is changed.
  """
  pretrained, metadata = load_pretrained(directory)
  scope = tuple(metadata["scope"].split("/")) if metadata["scope"] else ()
  source = {scope + path[1:]: value for path, value in traverse_util.flatten_dict(pretrained).items()}
  target = {_names(path)[1:]: leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
  problems = {
      "missing": ["/".join(p) for p in target if p[:len(scope)] == scope and p not in source],
      "not in the model": ["/".join(p) for p in source if p not in target],
      "wrong shape": [f"{'/'.join(p)} {source[p].shape} (the model's: {target[p].shape})"
                      for p in source if p in target and source[p].shape != target[p].shape],
  }
  if any(problems.values()):
    raise ValueError("\n".join(
        [f"{directory} ({metadata['variant']}) does not fit the model; nothing was loaded."]
        + [_listing(kind, paths) for kind, paths in problems.items() if paths]))
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _place(source[_names(path)[1:]], leaf) if _names(path)[1:] in source else leaf,
      variables)
