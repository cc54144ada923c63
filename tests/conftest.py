"""Shared pytest fixtures."""

import os
import shutil
import tempfile

import pytest

# One persistent compilation cache for the session, empty at its start and removed at its
# end: the suite's many short training runs compile the same few programs once, and nothing
# compiled by an earlier session (or by the user's runs) is ever reused.
_SESSION_COMPILATION_CACHE = tempfile.mkdtemp(prefix="focal_jax_tests_compilation_cache_")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_COMPILATION_CACHE


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  shutil.rmtree(_SESSION_COMPILATION_CACHE, ignore_errors=True)


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


# The demo recipe shrunk for tests: synthetic_shapes/tiny at 64x64, batches of 8.
TINY_DEMO = ["data.dataset=synthetic_shapes/tiny", "data.image_size=64", "data.size_divisibility=64",
             "data.batch_size=8", "data.eval_batch_size=8"]


def tiny_demo_config(data_dir, *overrides):
  """The demo recipe on synthetic_shapes/tiny in `data_dir`, with `overrides`."""
  from experiments.configs import get_config  # pylint: disable=g-import-not-at-top
  from focal_jax.engine.config import apply_overrides  # pylint: disable=g-import-not-at-top

  return apply_overrides(get_config("demo"), [*TINY_DEMO, f"data.data_dir={data_dir}", *overrides])


def train_tiny_demo(data_dir, path, steps):
  """Trains `tiny_demo_config` for `steps` steps (logging each) on one device into `path`; returns `path`."""
  import jax  # pylint: disable=g-import-not-at-top

  import focal_jax.engine.loop as train_loop  # pylint: disable=g-import-not-at-top
  from focal_jax.engine.mesh import make_mesh  # pylint: disable=g-import-not-at-top

  config = tiny_demo_config(data_dir, f"train.total_steps={steps}", "train.log_every=1")
  with pytest.MonkeyPatch.context() as patch:  # one device compiles faster; data parallelism is tested elsewhere
    patch.setattr(train_loop, "make_mesh", lambda: make_mesh(jax.devices()[:1]))
    train_loop.train_and_evaluate(config, path)
  return path


def assert_fatal(main, argv, capsys, says):
  """`main(argv)` must end with status 2 and print one `error:` line that contains `says`."""
  assert main(argv) == 2
  stderr = capsys.readouterr().err
  assert stderr.startswith("error:") and says in stderr and stderr.count("\n") == 1, stderr


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
  """A TFDS data dir holding `synthetic_shapes/tiny` (32 train + 16 validation images)."""
  from focal_jax.data import synthetic_shapes  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("tfds"))
  synthetic_shapes.prepare(data_dir, "tiny", verbose=False)
  return data_dir
