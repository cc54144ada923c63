"""Shared pytest fixtures."""

import os

import pytest

# Eight simulated CPU devices for the data-parallel tests (read when JAX starts).
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
  """A TFDS data dir holding `synthetic_shapes/tiny` (32 train + 16 validation images)."""
  from focal_jax.data import synthetic_shapes  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  synthetic_shapes.prepare(data_dir, "tiny", verbose=False)
  return data_dir
