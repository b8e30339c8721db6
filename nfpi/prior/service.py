"""The object that owns the prior during training: a plain class (made a Ray actor in ray_jobs/).

Workers reduce their class statistics (all-reduce of :meth:`ClassStatistics.flat`) and hand the
result to :meth:`PriorService.update`; the service runs the configured solver and returns the new
prior's state with a version number that increases by one per update. Its whole state (prior,
version, solver reports, GD optimiser state) round-trips through :meth:`state_dict`, which goes
into every training checkpoint so that a restarted service can be re-seeded exactly.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from torch import Tensor

from nfpi.errors import ConfigError, ShapeError
from nfpi.prior.fpi import FPIConfig, FPIReport, solve_fpi
from nfpi.prior.gaussian import Covariance, GaussianPrior
from nfpi.prior.gd import GDConfig, GDReport, GDSolver
from nfpi.prior.objective import Objective
from nfpi.prior.stats import ClassStatistics

__all__ = [
    "PRIOR_METHODS",
    "InitReport",
    "PriorMethod",
    "PriorReport",
    "PriorService",
    "PriorUpdate",
    "report_from_dict",
    "report_kind",
    "report_to_dict",
]

log = logging.getLogger(__name__)
# The prior methods, in the order of the paper's Table 1 (baseline, GD, FPI): the one list that
# the config's ``prior.method``, the service, the search spaces and the benchmarks all read.
PriorMethod = Literal["data-init", "gd", "fpi"]
PRIOR_METHODS: tuple[str, ...] = get_args(PriorMethod)


@dataclass
class InitReport:
    """The data-init prior: class moments of ``samples`` latents."""

    samples: int = 0

    def summary(self) -> str:
        return f"class moments of {self.samples} samples"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PriorReport = InitReport | FPIReport | GDReport
_REPORTS: dict[str, type] = {"data-init": InitReport, "fpi": FPIReport, "gd": GDReport}
_KIND: dict[type, str] = {cls: kind for kind, cls in _REPORTS.items()}


def report_kind(report: PriorReport) -> str:
    """``data-init``, ``fpi`` or ``gd``."""
    return _KIND[type(report)]


def report_to_dict(report: PriorReport) -> dict[str, Any]:
    """Plain values (what checkpoints store: they load with ``weights_only=True``)."""
    return {"kind": report_kind(report), **report.to_dict()}


def report_from_dict(values: dict[str, Any]) -> PriorReport:
    """Inverse of :func:`report_to_dict`."""
    values = dict(values)
    return _REPORTS[values.pop("kind")](**values)


@dataclass
class PriorUpdate:
    """What a prior update hands back to the workers (picklable, small).

    ``prior`` is the new prior's state (``GaussianPrior.from_state_dict`` rebuilds it),
    ``version`` counts updates (1 = data-init), ``report`` is the solver's typed report.
    """

    prior: dict[str, Tensor]
    version: int
    report: PriorReport

    @property
    def kind(self) -> str:
        return report_kind(self.report)

    def build(self) -> GaussianPrior:
        return GaussianPrior.from_state_dict(self.prior)


class PriorService:
    """Holds the prior, its version and the solver reports; solves on request.

    Args:
        method: ``fpi`` (solve the FPI on :meth:`update`), ``gd`` (run GD steps) or
            ``data-init`` (class moments at :meth:`initialize`, never updated).
        num_classes, dim: K and d.
        objective: lambda, alpha, pi of the objective the solver minimises.
        fpi, gd: how the two solvers run.
        covariance: ``diag`` or ``full`` (full with ``fpi`` only).
    """

    def __init__(
        self,
        method: PriorMethod,
        num_classes: int,
        dim: int,
        *,
        objective: Objective | None = None,
        fpi: FPIConfig | None = None,
        gd: GDConfig | None = None,
        covariance: Covariance = "diag",
    ) -> None:
        if method not in PRIOR_METHODS:
            raise ConfigError("prior.method", method, f"one of {PRIOR_METHODS}")
        if covariance == "full" and method == "gd":
            raise ConfigError(
                "prior.covariance", covariance, "the GD baseline supports 'diag' only"
            )
        self.method, self.num_classes, self.dim = method, num_classes, dim
        self.objective = objective if objective is not None else Objective()
        self.fpi = fpi if fpi is not None else FPIConfig(covariance=covariance)
        self.gd = gd if gd is not None else GDConfig()
        if self.fpi.covariance != covariance:
            raise ConfigError(
                "prior.fpi.covariance",
                self.fpi.covariance,
                f"must match prior.covariance={covariance!r}",
            )
        self.covariance: Covariance = covariance
        self.reset()

    def reset(self) -> None:
        """Back to the state of a new service (version 0): a run that starts from scratch
        (e.g. restarted before its first checkpoint) must not meet a previous attempt's prior."""
        self.prior = GaussianPrior.standard(self.num_classes, self.dim, self.covariance)
        self.version = 0
        self.reports: list[PriorReport] = []
        self._gd: GDSolver | None = None

    # ------------------------------------------------------------------------------- requests
    def _check(self, stats: ClassStatistics) -> None:
        if (stats.num_classes, stats.dim) != (self.num_classes, self.dim):
            raise ShapeError(
                f"statistics for (K, d) = {(stats.num_classes, stats.dim)} sent to a prior service "
                f"of (K, d) = {(self.num_classes, self.dim)}"
            )

    def _publish(self, prior: GaussianPrior, report: PriorReport) -> PriorUpdate:
        self.prior = prior
        self.version += 1
        self.reports.append(report)
        log.info("prior v%d (%s): %s", self.version, report_kind(report), report.summary())
        return PriorUpdate(self.state(), self.version, report)

    def _gd_solver(self, prior: GaussianPrior) -> GDSolver:
        return GDSolver(prior, self.objective, self.gd)

    def initialize(self, stats: ClassStatistics) -> PriorUpdate:
        """Data-init: the class moments of ``stats`` (identity variances if the FPI asks so)."""
        self._check(stats)
        variance_init = self.fpi.variance_init if self.method == "fpi" else "data"
        prior = GaussianPrior.from_statistics(stats, self.covariance, variance_init)
        if self.method == "gd":
            self._gd = self._gd_solver(prior)
            prior = self._gd.prior()  # variances as the sigmoid range represents them
        return self._publish(prior, InitReport(samples=int(stats.count.sum())))

    def update(self, stats: ClassStatistics) -> PriorUpdate:
        """One scheduled prior update from the reduced statistics: an FPI solve (from the
        statistics' moments, as in the paper) or ``gd.steps_per_solve`` GD steps."""
        self._check(stats)
        if self.method == "data-init":
            raise ConfigError(
                "prior.method", self.method, "data-init priors are frozen; no update is scheduled"
            )
        if self.method == "fpi":
            init = self.prior if self.fpi.start == "current" else None
            return self._publish(*solve_fpi(stats, self.objective, self.fpi, init=init))
        if self._gd is None:
            self._gd = self._gd_solver(self.prior)
        return self._publish(*self._gd.run(stats))

    def state(self) -> dict[str, Tensor]:
        """The current prior's tensors (``GaussianPrior.from_state_dict`` rebuilds it)."""
        return {k: v.clone() for k, v in self.prior.state_dict().items()}

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "method": self.method,
            "prior": self.state(),
            "version": self.version,
            "reports": [report_to_dict(r) for r in self.reports],
            "gd": None if self._gd is None else self._gd.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["method"] != self.method:
            raise ConfigError(
                "prior.method", self.method, f"checkpoint was written by method {state['method']!r}"
            )
        prior = GaussianPrior.from_state_dict(state["prior"])
        if (prior.num_classes, prior.dim, prior.covariance) != (
            self.num_classes,
            self.dim,
            self.covariance,
        ):
            raise ShapeError("checkpointed prior does not match this service's (K, d, covariance)")
        self.prior, self.version = prior, int(state["version"])
        self.reports = [report_from_dict(r) for r in state["reports"]]
        self._gd = None
        if state.get("gd") is not None:
            self._gd = self._gd_solver(prior)
            self._gd.load_state_dict(state["gd"])
