"""Optional dependencies: which extra of `pip install focal-jax[...]` brings each.

The core install (jax, flax, optax, numpy) covers the ops and the models; the
training, data and evaluation stack comes with `[train]`, torchvision weights
with `[torch]`, the export converters with `[export]`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_OF = {
    "tensorflow": "train",
    "tensorflow_datasets": "train",
    "pycocotools": "train",
    "PIL": "train",
    "matplotlib": "train",
    "clu": "train",
    "torch": "torch",
    "torchvision": "torch",
    "tf2onnx": "export",
    "ai_edge_litert": "export",
}


def require(module: str) -> ModuleType:
  """Imports `module`, or raises ModuleNotFoundError naming the extra that installs it."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as error:
    top = module.split(".")[0]
    if error.name is None or error.name.split(".")[0] != top or top not in EXTRA_OF:
      raise
    raise ModuleNotFoundError(
        f"{top} is not installed; this part of focal_jax needs it: pip install 'focal-jax[{EXTRA_OF[top]}]'",
        name=error.name) from None
