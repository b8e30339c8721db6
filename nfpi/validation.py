"""Small predicates shared by the config validators."""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

from nfpi.errors import ConfigError

__all__ = ["config_kwargs", "is_int", "is_number"]


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int in Python, never a valid count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def config_kwargs(cls: type, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The keyword arguments of dataclass ``cls`` from a plain dict (a JSON override, a sweep
    sample): unknown keys are rejected with the allowed ones, and ints given for ``float``
    fields become floats (``lam=300`` is ``300.0``, as the config prints and logs it)."""
    known = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(prefix, unknown, f"unknown keys; allowed: {sorted(known)}")
    return {
        key: float(value) if known[key] in (float, "float") and is_int(value) else value
        for key, value in values.items()
    }
