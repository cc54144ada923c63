"""Shared pytest fixtures."""

import os

import pytest

# Eight simulated CPU devices for the data-parallel tests (read when JAX starts).
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()

# torchvision (where installed, for the comparisons in test_convert.py) must load
# before TensorFlow: in the other order, torch 2.14.1's triton extension crashes
# the process on import (seen with tensorflow-cpu 2.21). Test modules that load
# TensorFlow are collected before test_convert.py.
try:
  import torchvision  # noqa: F401  pylint: disable=unused-import
except ImportError:
  pass


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
  """A TFDS data dir holding `synthetic_shapes/tiny` (32 train + 16 validation images)."""
  from focal_jax.data import synthetic_shapes  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  synthetic_shapes.prepare(data_dir, "tiny", verbose=False)
  return data_dir
