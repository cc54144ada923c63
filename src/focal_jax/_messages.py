"""How error messages name what went wrong: lists of offenders, and foreign errors inside ours."""

from __future__ import annotations

from collections.abc import Sequence

LISTED = 8  # offenders named per kind of problem


def problem_line(kind: str, items: Sequence[str]) -> str:
  """`"  kind (n): a, b, ..., h, ... (k more)"`: the first `LISTED` items and how many more."""
  more = f", ... ({len(items) - LISTED} more)" if len(items) > LISTED else ""
  return f"  {kind} ({len(items)}): {', '.join(items[:LISTED])}{more}"


def first_line(error: BaseException, *, kind: bool = False) -> str:
  """The first line of the message of the root of `error`'s causes, for naming a foreign error in one of ours.

  The root says what failed (orbax wraps TensorStore's "Error reading <array>
  in <file>: <why>" in an error that names only the array's slices). A
  `KeyError` is read without the quotes of its `str`; an empty message gives
  the error's class name. With `kind`: `"Kind: first line"`.
  """
  while error.__cause__ is not None:
    error = error.__cause__
  quoted = isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str)
  lines = (error.args[0] if quoted else str(error)).strip().splitlines()
  line, name = (lines[0] if lines else ""), type(error).__name__
  if not line:
    return name
  return f"{name}: {line}" if kind else line
