"""Checks that the fields of a config dataclass hold values of their declared types.

Every config of focal_jax (`AnchorConfig`, `PostprocessConfig`, `InputConfig`,
the engine's sections, `CpuRewrites`) calls `check_field_types` first in its
`__post_init__`, so that a wrong value is refused where the config is built
(in Python or from a `--section.field=value` override), before anything is
compiled or written. Booleans are not integers, integers are floats, floats
must be finite, tuples hold their declared items.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import types
import typing
from typing import Any


def check_field_types(config: Any, section: str) -> None:
  """Raises ValueError naming `section.field` for the first field whose value does not fit its type hint."""
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    if not _fits(value, hints.get(field.name, Any)):
      raise ValueError(f"{section}.{field.name} takes {_describe(hints[field.name])}; got {value!r}.")


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fits(value: Any, hint: Any) -> bool:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if hint is Any:
    return True
  if origin is typing.Union or isinstance(hint, types.UnionType):
    return any(_fits(value, arg) for arg in args)
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return _is_number(value) and math.isfinite(value)
  if hint is str:
    return isinstance(value, str)
  if origin in (tuple, collections.abc.Sequence):
    if not isinstance(value, (tuple, list)):
      return False
    if len(args) == 2 and args[1] is Ellipsis or origin is collections.abc.Sequence:
      return all(_fits(item, args[0]) for item in value) if args else True
    return len(value) == len(args) and all(_fits(item, arg) for item, arg in zip(value, args))
  if isinstance(hint, type):
    return isinstance(value, hint)
  return True


def _describe(hint: Any) -> str:
  origin, args = typing.get_origin(hint), typing.get_args(hint)
  if origin is typing.Union or isinstance(hint, types.UnionType):
    return " or ".join(_describe(arg) for arg in args)
  if hint is type(None):
    return "None"
  if hint is bool:
    return "True or False"
  if hint is int:
    return "an integer"
  if hint is float:
    return "a finite number"
  if hint is str:
    return "a string"
  if origin in (tuple, collections.abc.Sequence):
    if len(args) == 2 and args[1] is Ellipsis or origin is collections.abc.Sequence:
      return f"a tuple of {_describe(args[0]) if args else 'values'} (as (a, b, ...))"
    return f"a tuple of {len(args)} ({', '.join(_describe(arg) for arg in args)})"
  return getattr(hint, "__name__", str(hint))
