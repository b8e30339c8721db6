"""Gradient-descent baseline NF^GD: the objective of Prop. 1 minimised by Adam instead of FPI.

Variances are reparametrised as v = a * sigmoid(b * theta) + c (released values (a, b, c) =
(1, 1, 0.25): v in (0.25, 1.25), v = 0.75 at theta = 0), so gradient steps can never leave the
positive range. Adam (0.9, 0.999, 1e-8) runs on mu and theta in float64, with the learning rate
set by a policy at every step.

Learning-rate policies (the paper names five without defining them; these are our definitions):

=================  ===========================================================================
``constant``        lr0
``sublinear_v1``    lr_min + (lr0 - lr_min) (1 - t/(T-1))^(1/2)   concave: stays high, drops late
``sublinear_v2``    lr_min + (lr0 - lr_min) (1 - t/(T-1))^(1/4)
``linear``          lr_min + (lr0 - lr_min) (1 - t/(T-1))
``superlinear_v1``  lr_min + (lr0 - lr_min) (1 - t/(T-1))^2       convex: drops early, tails off
``superlinear_v2``  lr_min + (lr0 - lr_min) (1 - t/(T-1))^4
``geometric_knots`` the release's default: log-linear interpolation between knots
                    (0, 0.1), (10, 0.1), (11, 0.01), (100, 0.001), constant after the last
=================  ===========================================================================

t is the GD step count (0-based, over the whole run) and T = ``total_steps`` the number of GD steps
the run takes, so step 0 runs at lr0 and the last step (T - 1) at exactly lr_min; steps past
the horizon keep lr_min. ``total_steps=None`` (the default) means "the steps this run takes":
:meth:`nfpi.config.ExperimentConfig.resolved` fills it from the run's schedule (epochs, solve
epochs, steps per solve), so a policy's horizon is never a constant that the run outlives or never
reaches.

Weight schedule (``GDConfig.lam_end``): the released GD configs do not keep lambda fixed, they
move it linearly from 50 to 25 over the first 100 GD steps (method notes section 10). With
``lam_end`` set, step t minimises the objective with
lambda(t) = lam + (lam_end - lam) min(t, lam_steps) / lam_steps, lam the objective's; without it
(the default) every step uses the objective's lambda, so FPI and GD compare at equal objective.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from nfpi.errors import ConfigError, NonFiniteError, ShapeError
from nfpi.prior.gaussian import GaussianPrior
from nfpi.prior.kl import pairwise_kl_diag
from nfpi.prior.objective import Objective, pairwise_potential, prior_objective
from nfpi.prior.stats import ClassStatistics
from nfpi.schema import Config, check, is_number

__all__ = ["POLICY_POWERS", "GDConfig", "GDReport", "GDSolver", "LRPolicy"]

PolicyName = Literal[
    "constant",
    "sublinear_v1",
    "sublinear_v2",
    "linear",
    "superlinear_v1",
    "superlinear_v2",
    "geometric_knots",
]
POLICY_POWERS: dict[str, float] = {
    "sublinear_v1": 0.5,
    "sublinear_v2": 0.25,
    "linear": 1.0,
    "superlinear_v1": 2.0,
    "superlinear_v2": 4.0,
}
_RELEASE_KNOTS = ((0, 0.1), (10, 0.1), (11, 0.01), (100, 0.001))


@dataclass(frozen=True)
class LRPolicy(Config):
    """A learning-rate schedule over GD steps; ``lr(t)`` gives the rate of step t (0-based).

    Attributes:
        name: the policy: ``constant``, a polynomial decay (``sublinear_v1`` ... ``superlinear_v2``)
            or ``geometric_knots`` (log-linear between ``knots``, the release's).
        lr0: initial learning rate of the polynomial and constant policies.
        lr_min: final learning rate of the polynomial policies.
        total_steps: GD steps over which the polynomial policies decay (T; None: the GD steps
            the run takes, filled by ExperimentConfig.resolved).
        knots: (step, lr) pairs of ``geometric_knots``, log-linear in between.
    """

    name: PolicyName = "geometric_knots"
    lr0: float = 0.1
    lr_min: float = 1e-3
    total_steps: int | None = None
    knots: tuple[tuple[int, float], ...] = _RELEASE_KNOTS

    def validate(self) -> None:
        check(is_number(self.lr0) and self.lr0 > 0, "lr0", self.lr0, "a finite learning rate > 0")
        check(
            0 <= self.lr_min <= self.lr0, "lr_min", self.lr_min, f"0 <= lr_min <= lr0 = {self.lr0}"
        )
        check(
            self.total_steps is None or self.total_steps >= 1,
            "total_steps",
            self.total_steps,
            "None (the GD steps the run takes) or an integer >= 1",
        )
        steps = [k for k, _ in self.knots]
        check(
            bool(self.knots)
            and steps == sorted(set(steps))
            and steps[0] == 0
            and all(lr > 0 for _, lr in self.knots),
            "knots",
            self.knots,
            "((0, lr), (t1, lr1), ...) with increasing steps and lr > 0",
        )

    def lr(self, step: int) -> float:
        if self.name == "constant":
            return self.lr0
        if self.name == "geometric_knots":
            for (t0, lr0), (t1, lr1) in zip(self.knots, self.knots[1:]):
                if step < t1:
                    frac = (step - t0) / (t1 - t0)
                    return math.exp((1 - frac) * math.log(lr0) + frac * math.log(lr1))
            return self.knots[-1][1]
        if self.total_steps is None:
            raise ConfigError(
                "prior.gd.policy.total_steps",
                None,
                f"the number of GD steps of the run for policy {self.name!r}: resolve the "
                "experiment config (ExperimentConfig.resolved()) or set it",
            )
        frac = 1.0 - min(step, self.total_steps - 1) / max(self.total_steps - 1, 1)
        return self.lr_min + (self.lr0 - self.lr_min) * frac ** POLICY_POWERS[self.name]


@dataclass(frozen=True)
class GDConfig(Config):
    """How the gradient-descent baseline runs (what it minimises is the :class:`Objective`,
    the same one the FPI solves).

    ``form``: ``objective`` (Adam on the gradient of the objective: the fair comparison with
    the FPI) or ``released`` (the release's GD step, method notes section 10, its
    ``my_grad_utils.py``): the gradient of the summed (not class-averaged) NLL, divided by the
    range of the per-sample NLLs of the statistics pass (widened by 20 % of each end) times the
    number of samples, plus ``lambda`` times the gradient of the plain repulsion
    sum_{y, y'} -KL_yy' (no exp(-KL / (pi alpha))), divided by the range of the per-class
    repulsions (row + column sums over K - 1, widened likewise) times K d; ``lambda`` is the
    objective's lambda taken as is (the release's 50 -> 25, not divided by K (K - 1)); the Adam
    state is reset after the first step (``reset_adam_after_first_iteration``). It needs
    statistics that carry ``nll_range`` (the training loop gathers it for this form).

    Attributes:
        update: what moves: ``both``, ``mean`` or ``variance``.
        policy: the learning-rate policy over GD steps.
        betas: Adam's betas.
        eps: Adam's epsilon.
        sigmoid: (a, b, c) of the variance reparametrisation v = a sigmoid(b theta) + c.
        steps_per_solve: Adam steps on the prior at the end of every epoch.
        lam_end: final lambda of a linear lambda schedule (None: lambda fixed; the release's GD
            weights go 50 -> 25).
        lam_steps: GD steps over which lambda goes linearly to ``lam_end``.
        form: ``objective`` (Adam on the objective's gradient) or ``released`` (the release's
            normalised step, above).
    """

    update: Literal["both", "mean", "variance"] = "both"
    policy: LRPolicy = field(default_factory=LRPolicy)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    sigmoid: tuple[float, float, float] = (1.0, 1.0, 0.25)  # (a, b, c): v = a sigmoid(b theta) + c
    steps_per_solve: int = 100
    lam_end: float | None = None
    lam_steps: int = 100
    form: Literal["objective", "released"] = "objective"

    def validate(self) -> None:
        check(
            self.lam_end is None or (is_number(self.lam_end) and self.lam_end >= 0),
            "lam_end",
            self.lam_end,
            "None (lambda fixed) or the final lambda >= 0 of the linear weight schedule",
        )
        check(self.lam_steps >= 1, "lam_steps", self.lam_steps, "an integer >= 1")
        a, b, c = self.sigmoid
        check(
            a > 0 and b > 0 and c > 0,
            "sigmoid",
            self.sigmoid,
            "(a, b, c) all > 0 so that v lies in (c, a + c)",
        )
        check(
            0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1,
            "betas",
            self.betas,
            "Adam betas in [0, 1)",
        )
        check(self.steps_per_solve >= 1, "steps_per_solve", self.steps_per_solve, "an integer >= 1")

    def lam_at(self, lam: float, step: int) -> float:
        """lambda of GD step ``step`` (0-based) when the objective's is ``lam``."""
        if self.lam_end is None:
            return lam
        frac = min(step, self.lam_steps) / self.lam_steps
        return lam + (self.lam_end - lam) * frac

    @property
    def var_range(self) -> tuple[float, float]:
        a, _, c = self.sigmoid
        return c, a + c


@dataclass
class GDReport:
    """One call of :meth:`GDSolver.run`: merit before/after and the learning rates used.

    The merit is the function the detached-pi gradient descends: the log-KL barrier
    :func:`~nfpi.prior.objective.pairwise_potential` for ``pi="pairwise"`` (whose objective value
    is constant in the repulsion), the objective itself for ``pi="mean"``.
    """

    steps: int = 0
    first_step: int = 0
    merit_before: float = float("nan")
    merit_after: float = float("nan")
    lrs: list[float] = field(default_factory=list)
    lams: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return f"{self.steps} steps, merit {self.merit_before:.6g} -> {self.merit_after:.6g}"


class GDSolver:
    """Adam on (mu, theta) of the sigmoid-reparametrised prior; stateful across calls.

    Example:
        >>> z, y = torch.randn(300, 3, dtype=torch.float64), torch.arange(300) % 3
        >>> stats = ClassStatistics.from_batch(z, y, 3)
        >>> solver = GDSolver(GaussianPrior.from_statistics(stats), Objective(lam=10.0))
        >>> prior, report = solver.run(stats, steps=20)
        >>> report.steps
        20
    """

    def __init__(
        self, init: GaussianPrior, objective: Objective, config: GDConfig | None = None
    ) -> None:
        if init.covariance != "diag":
            raise ShapeError("the GD baseline supports diagonal covariances only")
        config = config or GDConfig()
        self.objective, self.config = objective, config
        self.mu = init.means.detach().clone().requires_grad_(config.update != "variance")
        self.theta = self._theta_of(init.var).requires_grad_(config.update != "mean")
        params = [p for p in (self.mu, self.theta) if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            params, lr=config.policy.lr(0), betas=config.betas, eps=config.eps
        )
        self.step_count = 0

    def _theta_of(self, var: Tensor) -> Tensor:
        a, b, c = self.config.sigmoid
        # Start variances outside (c, a + c) are pulled just inside the representable range.
        frac = ((var.detach() - c) / a).clamp(1e-6, 1 - 1e-6)
        return torch.logit(frac) / b

    def variances(self) -> Tensor:
        a, b, c = self.config.sigmoid
        return a * torch.sigmoid(b * self.theta) + c

    def prior(self) -> GaussianPrior:
        return GaussianPrior(self.mu.detach(), var=self.variances().detach())

    def objective_at(self, step: int) -> Objective:
        """The objective GD step ``step`` minimises (lambda from the weight schedule)."""
        lam = self.config.lam_at(self.objective.lam, step)
        return self.objective if lam == self.objective.lam else self.objective.replace(lam=lam)

    def _objective(self, m: Tensor, s: Tensor) -> Tensor:
        objective = self.objective_at(self.step_count)
        return prior_objective(self.mu, self.variances(), m, s, **objective.to_dict())

    @torch.no_grad()
    def merit(self, stats: ClassStatistics) -> float:
        """The value GD steps decrease (see :class:`GDReport`), at the current parameters (with
        the current step's lambda)."""
        obj = self.objective_at(self.step_count)
        m, s = stats.mean().to(self.mu), stats.var().to(self.mu)
        if obj.pi == "pairwise":
            value = pairwise_potential(
                self.mu, self.variances(), m, s, lam=obj.lam, alpha=obj.alpha
            )
        else:
            value = self._objective(m, s)
        return float(value)

    def _released_grads(self, stats: ClassStatistics, lam: float) -> tuple[Tensor, Tensor]:
        """The release's step direction for (mu, v): see :class:`GDConfig` ``form``."""
        if stats.nll_range is None:
            raise ConfigError(
                "prior.gd.form",
                "released",
                "statistics that carry the per-sample NLL range (nll_range): the training "
                "loop's statistics pass gathers it for this form; statistics gathered during "
                "the training pass (prior.stats_from_training) do not",
            )
        mu, v = self.mu.detach(), self.variances().detach()
        n = stats.count.to(mu)[:, None]
        m, s_unbiased = stats.mean().to(mu), stats.var().to(mu)
        second = s_unbiased * (n - 1) / n + (m - mu) ** 2  # mean of (z - mu)^2 per class
        g_nf_mu = -n * (m - mu) / v
        g_nf_v = -0.5 * n * (second / v**2 - 1 / v)
        # The plain repulsion sum_{y, y'} -KL(y || y') and its gradient (autograd, float64).
        mu_r, v_r = mu.clone().requires_grad_(True), v.clone().requires_grad_(True)
        neg_kl = -pairwise_kl_diag(mu_r, v_r)
        g_kl_mu, g_kl_v = torch.autograd.grad(neg_kl.sum(), (mu_r, v_r))
        k, d = mu.shape
        per_class = (neg_kl.detach().sum(1) + neg_kl.detach().sum(0)) / max(k - 1, 1)

        def spread(lo: Tensor, hi: Tensor, scale: float) -> Tensor:
            if float(lo) == float(hi) == 0.0:  # nothing to normalise (the release returns g)
                return torch.ones((), dtype=mu.dtype)
            return ((hi + 0.2 * hi.abs()) - (lo - 0.2 * lo.abs())) * scale

        r_nf = spread(*stats.nll_range.to(mu), float(stats.count.sum()))
        r_kl = spread(per_class.min(), per_class.max(), float(k * d))
        return g_nf_mu / r_nf + lam * g_kl_mu / r_kl, g_nf_v / r_nf + lam * g_kl_v / r_kl

    def _released_step(self, stats: ClassStatistics) -> None:
        g_mu, g_v = self._released_grads(stats, self.objective_at(self.step_count).lam)
        a, b, _ = self.config.sigmoid
        sig = torch.sigmoid(b * self.theta.detach())
        if self.mu.requires_grad:
            self.mu.grad = g_mu.to(self.mu)
        if self.theta.requires_grad:
            self.theta.grad = (g_v * a * b * sig * (1 - sig)).to(self.theta)
        self.optimizer.step()
        if self.step_count == 0:  # the release resets its Adam after the first step
            self.optimizer.state.clear()

    def run(
        self, stats: ClassStatistics, steps: int | None = None
    ) -> tuple[GaussianPrior, GDReport]:
        """``steps`` (default ``config.steps_per_solve``) Adam steps on the objective of ``stats``."""
        steps = self.config.steps_per_solve if steps is None else steps
        m, s = stats.mean().to(self.mu), stats.var().to(self.mu)
        if m.shape != self.mu.shape:
            raise ShapeError(
                f"statistics of shape {tuple(m.shape)} do not match the prior {tuple(self.mu.shape)}"
            )
        report = GDReport(first_step=self.step_count, merit_before=self.merit(stats))
        for _ in range(steps):
            lr = self.config.policy.lr(self.step_count)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.zero_grad(set_to_none=True)
            if self.config.form == "released":
                self._released_step(stats)
            else:
                loss = self._objective(m, s)
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"GD objective is {float(loss)} at step {self.step_count}")
                loss.backward()
                self.optimizer.step()
            if not (torch.isfinite(self.mu).all() and torch.isfinite(self.theta).all()):
                raise NonFiniteError(f"GD produced a non-finite prior at step {self.step_count}")
            self.step_count += 1
            report.steps += 1
            report.lrs.append(lr)
            report.lams.append(self.config.lam_at(self.objective.lam, self.step_count - 1))
        report.merit_after = self.merit(stats)
        return self.prior(), report

    def state_dict(self) -> dict[str, Any]:
        return {
            "mu": self.mu.detach().clone(),
            "theta": self.theta.detach().clone(),
            # deepcopy: optimizer.state_dict() aliases the live Adam moments.
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "step_count": self.step_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.mu.copy_(state["mu"])
            self.theta.copy_(state["theta"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.step_count = int(state["step_count"])
