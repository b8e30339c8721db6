"""Small predicates shared by the config validators."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["is_int", "is_number"]


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int in Python, never a valid count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
