"""Trace-time argument checks shared by the ops (shapes are static under jit)."""

from __future__ import annotations

import math
from typing import Any


def check_boxes(name: str, boxes: Any, rank: int | None = None) -> None:
  """Raises ValueError unless `boxes` has a last axis of 4 (and the given rank)."""
  shape = getattr(boxes, "shape", None)
  if shape is None or len(shape) == 0 or shape[-1] != 4:
    raise ValueError(f"{name} must have a last axis of size 4 (x1, y1, x2, y2); got shape {shape}.")
  if rank is not None and len(shape) != rank:
    raise ValueError(f"{name} must have rank {rank}; got shape {shape}.")


def check_unit_interval(name: str, value: Any) -> None:
  """Raises ValueError unless `value` is a concrete number in [0, 1]."""
  if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0 or math.isnan(value):
    raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}.")
