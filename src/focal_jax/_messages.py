"""How error messages list what went wrong (shared by the data and convert tools)."""

from __future__ import annotations

from collections.abc import Sequence

LISTED = 8  # offenders named per kind of problem


def problem_line(kind: str, items: Sequence[str]) -> str:
  """`"  kind (n): a, b, ..., h, ... (k more)"`: the first `LISTED` items and how many more."""
  more = f", ... ({len(items) - LISTED} more)" if len(items) > LISTED else ""
  return f"  {kind} ({len(items)}): {', '.join(items[:LISTED])}{more}"
