"""How every command of focal_jax ends: exit statuses and the one line that explains a failure.

Exit statuses: 0 done; 1 done, but some inputs were skipped (the command names
them); 2 a fatal error, shown as one `error: ...` line on stderr (`--debug`
shows the traceback instead); 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

FATAL = 2
INTERRUPTED = 130
DEFAULT_COMPILATION_CACHE = os.path.join("~", ".cache", "focal_jax", "jax_compilation_cache")


def set_up_training_process(compilation_cache: str | None) -> None:
  """Process-wide set-up of the training commands: progress logging, and JAX's compilation cache.

  Args:
    compilation_cache: where JAX keeps compiled programs, so that a rerun or a
      resumed run starts without compiling; None: `$JAX_COMPILATION_CACHE_DIR`,
      else `DEFAULT_COMPILATION_CACHE`; "": no cache. It holds compiled programs
      only: what a run computes does not depend on it.
  """
  # force: an import may already have given the root logger a handler (absl's, through orbax).
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
  for noisy in ("absl", "tensorflow", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  if compilation_cache is None:
    compilation_cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_COMPILATION_CACHE)
  if compilation_cache:
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run_command(body: Callable[[], int], *, debug: bool = False,
                interrupted: str = "interrupted; nothing more was written.") -> int:
  """`body()`'s exit status, with any exception turned into an `error:` line and status 2.

  Args:
    body: the command's work; returns 0 or 1.
    debug: let exceptions through (with their tracebacks) instead.
    interrupted: what to print on Ctrl-C (status 130).
  """
  try:
    return body()
  except KeyboardInterrupt:
    print(f"\n{interrupted}", file=sys.stderr)
    return INTERRUPTED
  except Exception as error:  # pylint: disable=broad-except  (every fatal error ends the same way)
    if debug:
      raise
    print(f"error: {describe(error)}", file=sys.stderr)
    return FATAL


def describe(error: BaseException) -> str:
  """The message of `error` as a user needs it.

  A file-system error is `path: cause`; focal_jax's errors (ValueError and
  its kinds, ModuleNotFoundError naming the extra to install, the errors
  defined in focal_jax) are shown whole, as written; anything else shows its
  kind and first line.
  """
  if isinstance(error, OSError) and error.strerror:
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror}."
  message = str(error).strip()
  if message and (isinstance(error, (ValueError, OSError, ImportError))
                  or type(error).__module__.startswith("focal_jax")):
    return message
  first = message.splitlines()[0] if message else ""
  hint = "; a smaller batch needs less memory" if "RESOURCE_EXHAUSTED" in message else ""
  return f"{type(error).__name__}: {first} (--debug shows the whole error{hint})"
