"""Named exceptions of the library.

Every error says what was wrong and how to fix it. The classes also derive from the matching
built-in exception (``ValueError``, ``FileNotFoundError``, ...) so generic handlers keep working.
"""

from __future__ import annotations

from typing import Any, ClassVar


class NfpiError(Exception):
    """Base class of every error raised on purpose by ``nfpi``.

    ``retryable`` says whether running the same thing again can succeed. It is ``False`` for
    almost every error here (a bad config, a wrong shape, a diverged run fail the same way every
    time), and the Ray layer then ends a run at once instead of restarting it from its last
    checkpoint; transient faults (a prior actor that did not answer) set it to ``True``.
    """

    retryable: ClassVar[bool] = False


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


class DivergenceError(NfpiError, FloatingPointError):
    """Training diverged: a non-finite loss, metric or weight, or one beyond its plausibility
    bound (:data:`nfpi.checkpoint.MAX_BITS_PER_DIM`, :data:`nfpi.checkpoint.MAX_PARAMETER_ABS`).

    Nothing of the diverged epoch is saved. ``checkpoint`` is the run's last good checkpoint
    file (left intact), or ``None`` when the run had saved none yet; the message says which.
    """

    def __init__(self, message: str, checkpoint: str | None = None) -> None:
        self.checkpoint = checkpoint
        super().__init__(message)

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:
        return type(self), (str(self), self.checkpoint)


class NonFiniteLossError(NonFiniteError, DivergenceError):
    """Training produced a non-finite loss; the last good checkpoint (if any) is left untouched
    and the message says where it is."""


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


class RunDirectoryLockedError(NfpiError, RuntimeError):
    """Another live process is training in this run directory; the message names it (pid,
    host, command) and how to proceed. The lock goes with that process, however it ends."""


class ClusterStartError(NfpiError, RuntimeError):
    """A local Ray cluster did not come up (e.g. its node did not register in time on an
    overloaded machine); the message says what to do instead."""
