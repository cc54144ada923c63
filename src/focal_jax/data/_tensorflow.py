"""TensorFlow for the input pipelines, kept off the accelerators.

Every module of `focal_jax.data` that needs TensorFlow takes it from here
(`from focal_jax.data._tensorflow import tf, tfds`), so importing any of them
hides the GPUs and TPUs from TensorFlow before it can initialize them: the
pipelines run on the CPU and leave all accelerator memory to JAX. A missing
TensorFlow raises ModuleNotFoundError naming the `train` extra.
"""

from __future__ import annotations

from focal_jax._extras import require

tf = require("tensorflow")


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow off GPUs/TPUs so that it never takes accelerator memory.

  Importing any TensorFlow part of focal_jax has already done this; calling it
  again changes nothing (once TensorFlow has initialized its devices, their
  visibility is fixed and the call is ignored).
  """
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # already initialized, or no such device type
      pass


hide_accelerators_from_tf()


def __getattr__(name: str):
  # tensorflow_datasets loads on first use: the pre-processing of `transforms` needs only TensorFlow.
  if name == "tfds":
    return require("tensorflow_datasets")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
