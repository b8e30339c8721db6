"""Named exceptions of the library.

Every error says what was wrong and how to fix it. The classes also derive from the matching
built-in exception (``ValueError``, ``FileNotFoundError``, ...) so generic handlers keep working.
"""

from __future__ import annotations

from typing import Any


class NfpiError(Exception):
    """Base class of every error raised on purpose by ``nfpi``."""


class ConfigError(NfpiError, ValueError):
    """A configuration value is invalid: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"config field {field!r} = {value!r} is invalid: {allowed}")

    def __reduce__(self) -> tuple[type, tuple[str, Any, str]]:
        # Picklable with its three fields (Ray sends a worker's exception to the driver).
        return type(self), (self.field, self.value, self.allowed)

    def within(self, path: str) -> ConfigError:
        """The same error with ``path`` prefixed to its field (a nested config's position)."""
        if not path:
            return self
        return ConfigError(f"{path}.{self.field}", self.value, self.allowed)


class UsageError(NfpiError, ValueError):
    """A command line is malformed (unknown flag, bad choice, missing argument)."""


class ShapeError(NfpiError, ValueError):
    """A tensor has the wrong shape, dtype or layout for the operation."""


class LabelRangeError(NfpiError, ValueError):
    """Class labels fall outside ``[0, num_classes)``."""


class InsufficientSamplesError(NfpiError, ValueError):
    """A class has too few samples for the requested statistic (e.g. < 2 for a variance)."""


class NonFiniteError(NfpiError, FloatingPointError):
    """A NaN or infinity appeared where only finite values are valid."""


class NonFiniteLossError(NonFiniteError):
    """Training produced a non-finite loss; the last good checkpoint is left untouched."""


class DegenerateGaussiansError(NfpiError, ArithmeticError):
    """Two class gaussians coincide, so a KL-weighted repulsion term would divide by zero."""


class SolverError(NfpiError, RuntimeError):
    """Base class of prior-solver failures; ``report`` holds the solver's report."""

    def __init__(self, message: str, report: Any = None) -> None:
        self.report = report
        super().__init__(message)

    def __reduce__(self) -> tuple[type, tuple[str, Any]]:
        return type(self), (str(self), self.report)


class FPIDivergenceError(SolverError):
    """The fixed-point iteration has no finite fixed point from this start: a mean or
    variance grows without bound. Bound the variances (``var_bounds``), lower ``lam``, or
    update the means only."""


class FPINotConvergedError(SolverError):
    """The fixed-point iteration hit ``max_iter`` without meeting its tolerance while the
    caller demanded convergence."""


class DatasetNotFoundError(NfpiError, FileNotFoundError):
    """The dataset files are missing; the message names the root and how to provide them."""


class CheckpointError(NfpiError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match the model/config."""
