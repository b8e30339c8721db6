"""The prior during training: who solves it, when, and how every rank gets the result.

Method notes section 5: data-init from the untrained flow at train start; the FPI solved at the
end of epoch ``prior.solve_epoch`` (then frozen, or re-solved every ``prior.resolve_every``
epochs up to ``prior.solve_until``); GD steps at the end of every epoch for the GD baseline;
nothing more for data-init. Only rank 0 talks to the :class:`PriorClient` (an in-process
:class:`~nfpi.prior.PriorService`, or a Ray actor in ``ray_jobs/``); the new prior is broadcast.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from nfpi.config import PriorConfig
from nfpi.prior import (
    ClassStatistics,
    FPIReport,
    GaussianPrior,
    GDReport,
    PriorReport,
    PriorService,
    PriorUpdate,
    pairwise_kl,
)
from nfpi.training.distributed import broadcast_object

__all__ = ["PriorClient", "PriorSchedule", "report_metrics", "service_arguments"]


class PriorClient(Protocol):
    """Who solves the prior: :class:`~nfpi.prior.PriorService` or a remote wrapper of it."""

    def initialize(self, stats: ClassStatistics) -> PriorUpdate: ...

    def update(self, stats: ClassStatistics) -> PriorUpdate: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def report_metrics(report: PriorReport | None) -> dict[str, float]:
    """The numbers of a solver report that go into the per-epoch metrics."""
    if isinstance(report, FPIReport):
        return {
            "fpi_iterations": float(report.iterations),
            "fpi_residual": report.final_residual,
            "fpi_converged": float(report.converged),
            "fpi_at_lower_bound": float(report.at_lower_bound),
            "fpi_at_upper_bound": float(report.at_upper_bound),
            # 0: no automatic bounds were needed (or none were asked for).
            "fpi_bound_factor": report.bound_factor,
        }
    if isinstance(report, GDReport):
        out = {"gd_merit": report.merit_after, "gd_steps": float(report.steps)}
        if report.lams:
            out["gd_lam"] = report.lams[-1]
        return out
    return {}


def service_arguments(
    config: PriorConfig, num_classes: int, dim: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The ``PriorService`` constructor's arguments for an experiment's prior section (the
    in-process service and the Ray actor are built from the same)."""
    kwargs = {
        "objective": config.objective_for(),
        "fpi": config.fpi,
        "gd": config.gd,
        "covariance": config.covariance,
    }
    return (config.method, num_classes, dim), kwargs


class PriorSchedule:
    """The prior of one run on this rank: its current value, version and last report.

    Args:
        config: the prior section of the experiment.
        client: the solver (rank 0 only; other ranks pass ``None``).
        num_classes, dim: K and d.
        device: where the prior lives for the loss.
    """

    def __init__(
        self,
        config: PriorConfig,
        client: PriorClient | None,
        num_classes: int,
        dim: int,
        device: torch.device,
    ) -> None:
        self.config, self.client, self.device = config, client, device
        self.prior = GaussianPrior.standard(num_classes, dim, config.covariance).to(device)
        self.initial: GaussianPrior | None = None  # the data-init prior, for the pictures
        self.version = 0
        self.report: PriorReport | None = None

    @staticmethod
    def default_client(config: PriorConfig, num_classes: int, dim: int) -> PriorService:
        """An in-process service for ``config`` (what a run without Ray uses)."""
        args, kwargs = service_arguments(config, num_classes, dim)
        return PriorService(*args, **kwargs)

    def due(self, epoch: int) -> bool:
        """Whether a prior update is scheduled at the end of ``epoch``."""
        return self.config.solves_after(epoch)

    def _apply(self, update: PriorUpdate | None) -> PriorUpdate:
        update = broadcast_object(update)
        self.prior.copy_(update.build().to(self.device))
        self.version, self.report = update.version, update.report
        return update

    def initialize(self, stats: ClassStatistics) -> PriorUpdate:
        """Data-init from the untrained flow's statistics (on every rank, from rank 0)."""
        update = self._apply(self.client.initialize(stats) if self.client is not None else None)
        self.initial = self.prior.clone()
        return update

    def update(self, stats: ClassStatistics) -> PriorUpdate:
        """A scheduled update from the all-reduced statistics (on every rank, from rank 0)."""
        return self._apply(self.client.update(stats) if self.client is not None else None)

    def separation(self) -> dict[str, float]:
        """Smallest and mean pairwise KL of the current prior."""
        kl = pairwise_kl(self.prior.means, self.prior.scale_param)
        k = kl.shape[0]
        if k < 2:
            return {}
        off = kl[~torch.eye(k, dtype=torch.bool, device=kl.device)]
        return {"kl_min": float(off.min()), "kl_mean": float(off.mean())}

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "prior": self.prior.state_dict(),
            "initial": None if self.initial is None else self.initial.state_dict(),
            "version": self.version,
            "service": self.client.state_dict() if self.client is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prior.copy_(GaussianPrior.from_state_dict(state["prior"]).to(self.device))
        if state["initial"] is not None:
            self.initial = GaussianPrior.from_state_dict(state["initial"]).to(self.device)
        self.version = int(state["version"])
        if self.client is not None and state["service"] is not None:
            self.client.load_state_dict(state["service"])
