"""Fixed-point iteration (FPI) for the class gaussians (paper Prop. 1, Eqs. 5-10).

Everything runs in float64 and every pairwise sum is a K x K by K x d matrix product, so one
iteration costs O(K^2 d) time and O(K d + K^2) memory (K = 1000, d = 3072 fits in well under 2 GB).

Two forms are offered:

Both solve for the stationary point of an :class:`~nfpi.prior.objective.Objective` (lambda,
alpha, pi: the same object the GD baseline minimises); :class:`FPIConfig` holds only how.

``paper`` (default) -- the stationary point of :func:`~nfpi.prior.objective.prior_objective`.
    With D_yy' = mu_y - mu_y' and kappa = lambda / (K (K-1)), all right-hand sides at the
    previous iterate (Jacobi)::

        mu_y <- m_y + kappa v_y sum_y' (W_yy' / v_y' + W_y'y / v_y) D_yy'                  (Eq. 5)
        A_y  = (1 + kappa sum_y' (W_yy' - W_y'y)) / v_y + kappa / v_y^2 sum_y' W_y'y (D_yy'^2 + v_y')
        B_y  = s_y + (m_y - mu_y)^2 + kappa v_y^2 sum_y' W_yy' / v_y'
        v_y  <- A_y^{-1} # B_y = sqrt(B_y / A_y)                                             (Eq. 6)

    The full-covariance version solves Sigma A Sigma = B with the matrix geometric mean
    A^{-1/2} (A^{1/2} B A^{1/2})^{1/2} A^{-1/2}, through symmetric eigendecompositions.

``reference`` -- the released code's variant, kept to reproduce published numbers: A in
    variance units (A' = v^2 A), B without the (m - mu)^2 term, optional ``summed_q`` (D^2 in A
    replaced by sum_l (mu_y' - mu_l)^2) and ``isotropic_mean`` (per-class means over dimensions
    of v and 1/v in Eq. 5), stopping at max-class L2 changes <= 0.1 with the state rounded to
    float32 after each iteration.

The undamped map can oscillate with period 2 and crawls along flat directions at large lambda.
The default damping is safeguarded Anderson mixing (:mod:`nfpi.prior.anderson`, on the
coordinates (mu, log v)); a mixed step that would not reduce the residual is replaced by the
plain one. With both means and variances free and a large lambda the paper
form has no finite fixed point: the variances grow without bound. The solver detects this and
raises :class:`FPIDivergenceError` with its report; variance bounds (projection after every
update) make it converge.

Automatic variance bounds (``auto_bounds``, what the ``paper`` variants of :mod:`nfpi.presets`
use): the solve is first tried unbounded; if it diverges or does not converge, it is repeated
with the boxes (v_lo / f, v_hi * f) for the factors f of ``auto_bounds`` in the given order
(widest first), where [v_lo, v_hi] is the range of the class variances of the statistics. The
first box whose projected iteration converges is kept: the least restrictive box of the ladder
that yields a fixed point. The report says which (``bound_factor``, ``var_bounds``,
``bound_attempts``) and how many variances sit at each bound.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from nfpi.errors import (
    FPIDivergenceError,
    FPINotConvergedError,
    NonFiniteError,
    ShapeError,
    SolverError,
)
from nfpi.prior.anderson import AndersonMixer
from nfpi.prior.gaussian import Covariance, GaussianPrior
from nfpi.prior.kl import pairwise_kl
from nfpi.prior.objective import Objective, kappa, prior_objective, repulsion_weights
from nfpi.prior.stats import ClassStatistics
from nfpi.schema import Config, check, is_number

__all__ = [
    "DEFAULT_BOUND_FACTORS",
    "FPIConfig",
    "FPIReport",
    "fpi_step",
    "initial_prior",
    "solve_fpi",
]

log = logging.getLogger(__name__)

Update = Literal["both", "mean", "variance"]
Form = Literal["paper", "reference"]

# The ladder of automatic variance bounds: growth factors of the data's variance range, widest
# box first (see the module docstring).
DEFAULT_BOUND_FACTORS: tuple[float, ...] = (1e4, 1e3, 1e2, 10.0, 4.0, 2.0)


@dataclass(frozen=True)
class FPIConfig(Config):
    """How the fixed-point solver runs (what it solves is the :class:`Objective`).

    Attributes:
        update: what moves: ``both``, ``mean`` (variances fixed at the start) or ``variance``.
        form: ``paper`` (true stationary point) or ``reference`` (released code).
        variance_init: start variances at the class variances (``data``) or at 1 (``identity``,
            Table 3 setting #2).
        covariance: ``diag`` or ``full`` (paper form only).
        summed_q, isotropic_mean: the reference form's options.
        tol: stop when max over classes of the L2 change of mu and of v are both <= tol.
        max_iter: iteration cap.
        damping: ``anderson`` (safeguarded Anderson mixing, :mod:`nfpi.prior.anderson`) or
            ``none`` (plain x <- F(x), the release).
        anderson_memory: number of past iterates the Anderson mixing combines (>= 1).
        var_bounds: (v_min, v_max) projection of the variances (eigenvalues for full
            covariances) after each update, or None.
        round_float32: round the state to float32 after each iteration (the release does).
        require_convergence: raise FPINotConvergedError when max_iter is hit unconverged.
        divergence_factor: growth of means/variances (relative to the data scale) that, with a
            residual no longer decreasing, counts as unbounded.
        start: where an in-training solve starts (:class:`~nfpi.prior.PriorService`):
            ``statistics`` (the class moments of the statistics it solves for; identity
            variances with ``variance_init="identity"``) or ``current`` (the gaussians the run
            holds now: the release, whose first solve starts from the untrained flow's data-init,
            so that a variances-only solve keeps the untrained flow's class means).
        auto_bounds: factors f of the automatic variance bounds (see the module docstring;
            ``()`` = off). Tried only when ``var_bounds`` is None and the variances move, each
            box (v_lo / f, v_hi * f) in the order given, after an unbounded attempt fails;
            :data:`DEFAULT_BOUND_FACTORS` is the ladder the presets use.
    """

    update: Update = "both"
    form: Form = "paper"
    variance_init: Literal["data", "identity"] = "data"
    covariance: Covariance = "diag"
    summed_q: bool = False
    isotropic_mean: bool = False
    tol: float = 1e-6
    max_iter: int = 1000
    damping: Literal["anderson", "none"] = "anderson"
    anderson_memory: int = 5
    var_bounds: tuple[float, float] | None = None
    round_float32: bool = False
    require_convergence: bool = True
    divergence_factor: float = 1e6
    auto_bounds: tuple[float, ...] = ()
    start: Literal["statistics", "current"] = "statistics"

    def validate(self) -> None:
        check(is_number(self.tol) and self.tol > 0, "tol", self.tol, "a tolerance > 0")
        check(
            is_number(self.divergence_factor) and self.divergence_factor > 1,
            "divergence_factor",
            self.divergence_factor,
            "a growth factor > 1",
        )
        check(self.max_iter >= 1, "max_iter", self.max_iter, "an integer >= 1")
        check(self.anderson_memory >= 1, "anderson_memory", self.anderson_memory, "an integer >= 1")
        if self.var_bounds is not None:
            lo, hi = self.var_bounds
            check(
                0 < lo < hi and math.isfinite(hi),
                "var_bounds",
                self.var_bounds,
                "(v_min, v_max) with 0 < v_min < v_max < inf",
            )
        check(
            all(is_number(f) and f > 1 for f in self.auto_bounds)
            and all(a > b for a, b in zip(self.auto_bounds, self.auto_bounds[1:])),
            "auto_bounds",
            self.auto_bounds,
            "growth factors > 1, strictly decreasing (widest box first), or () for off",
        )
        check(
            self.form == "reference" or not (self.summed_q or self.isotropic_mean),
            "form",
            self.form,
            "'reference' when summed_q or isotropic_mean is on (they are its options only)",
        )
        check(
            not (self.form == "reference" and self.covariance == "full"),
            "covariance",
            self.covariance,
            "'diag': the reference form exists for diagonal covariances only",
        )

    @classmethod
    def reference(cls, **overrides: Any) -> FPIConfig:
        """The released code's settings (method notes section 3), with overrides."""
        base = {
            "form": "reference",
            "summed_q": True,
            "isotropic_mean": True,
            "tol": 0.1,
            "max_iter": 1000,
            "damping": "none",
            "round_float32": True,
        }
        return cls(**{**base, **overrides})


@dataclass
class FPIReport:
    """What the solver did. ``residuals[t]`` is max(res_mean[t], res_var[t]) of iteration t+1,
    each the max over classes of the L2 norm (over d) of F(x) - x."""

    iterations: int = 0
    converged: bool = False
    stop_reason: str = ""
    residuals: list[float] = field(default_factory=list)
    residuals_mean: list[float] = field(default_factory=list)
    residuals_var: list[float] = field(default_factory=list)
    anderson_accepted: int = 0
    anderson_rejected: int = 0
    kl_min_before: float = float("nan")
    kl_mean_before: float = float("nan")
    kl_min_after: float = float("nan")
    kl_mean_after: float = float("nan")
    objective_before: float = float("nan")
    objective_after: float = float("nan")
    at_lower_bound: int = 0
    at_upper_bound: int = 0
    var_bounds: tuple[float, float] | None = None
    bound_factor: float = 0.0
    bound_attempts: int = 0

    @property
    def final_residual(self) -> float:
        return self.residuals[-1] if self.residuals else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.stop_reason} after {self.iterations} iterations, residual {self.final_residual:.3g}, "
            f"KL min/mean {self.kl_min_before:.3g}/{self.kl_mean_before:.3g} -> "
            f"{self.kl_min_after:.3g}/{self.kl_mean_after:.3g}, variances at bounds "
            f"{self.at_lower_bound} low / {self.at_upper_bound} high"
            + (
                f" (automatic bounds ({self.var_bounds[0]:.3g}, {self.var_bounds[1]:.3g}): factor "
                f"{self.bound_factor:g} after {self.bound_attempts} failed attempts)"
                if self.bound_factor and self.var_bounds is not None
                else ""
            )
        )


def initial_prior(stats: ClassStatistics, config: FPIConfig) -> GaussianPrior:
    """The FPI's start: class means with class (co)variances or unit variances."""
    return GaussianPrior.from_statistics(stats, config.covariance, config.variance_init)


# ------------------------------------------------------------------------------------ the maps
def _mean_update(
    mu: Tensor, v: Tensor, m: Tensor, w: Tensor, kap: float, isotropic: bool
) -> Tensor:
    """Eq. 5, diagonal: m + kappa v * sum_y' (W_yy' P_y' + W_y'y P_y) (mu_y - mu_y'), as GEMMs."""
    if isotropic:
        prec = (1.0 / v).mean(dim=1, keepdim=True).expand_as(v)
        lead = v.mean(dim=1, keepdim=True)
    else:
        prec, lead = 1.0 / v, v
    wt = w.T
    forward = mu * (w @ prec) - w @ (mu * prec)  # sum_y' W_yy' P_y' (mu_y - mu_y')
    backward = prec * (
        mu * wt.sum(dim=1, keepdim=True) - wt @ mu
    )  # P_y sum_y' W_y'y (mu_y - mu_y')
    return m + kap * lead * (forward + backward)


def _variance_update(
    mu: Tensor, v: Tensor, m: Tensor, s: Tensor, w: Tensor, kap: float, config: FPIConfig
) -> Tensor:
    """Eq. 6 for diagonal covariances (paper or reference form); +inf where A <= 0."""
    wt = w.T
    col = wt.sum(dim=1, keepdim=True)  # sum_y' W_y'y
    balance = 1.0 + kap * (w.sum(dim=1, keepdim=True) - col)  # 1 + kappa sum (W_yy' - W_y'y)
    if config.summed_q:
        # sum_l (mu_y' - mu_l)^2 per dimension, a function of y' alone.
        q = mu.shape[0] * mu * mu - 2.0 * mu * mu.sum(0) + (mu * mu).sum(0)
        spread = wt @ q
    else:
        spread = mu * mu * col - 2.0 * mu * (wt @ mu) + wt @ (mu * mu)  # sum W_y'y D^2
    spread = spread + wt @ v  # + sum W_y'y v_y'
    attract = kap * v * v * (w @ (1.0 / v))  # kappa v^2 sum W_yy' / v_y'
    if config.form == "paper":
        a = balance / v + kap * spread / (v * v)
        b = s + (m - mu) ** 2 + attract
    else:
        a = balance * v + kap * spread
        b = s + attract
    # A <= 0: the stationarity equation has no positive root for this coordinate (the repulsion
    # outweighs the likelihood); +inf marks it, to be projected onto v_max or reported.
    positive = a > 0
    return torch.where(positive, torch.sqrt(b / torch.where(positive, a, 1.0)), torch.inf)


def _sym_sqrt(mat: Tensor) -> tuple[Tensor, Tensor]:
    """Square root and inverse square root of symmetric positive definite matrices."""
    evals, evecs = torch.linalg.eigh(mat)
    if not (evals > 0).all():
        raise FPIDivergenceError(
            "the covariance update's A matrix is not positive definite: the repulsion outweighs the "
            "likelihood and Eq. 6 has no SPD solution; lower lam or update the means only"
        )
    root = evals.sqrt()
    return (evecs * root[..., None, :]) @ evecs.mT, (evecs / root[..., None, :]) @ evecs.mT


def _full_step(
    mu: Tensor, cov: Tensor, m: Tensor, s: Tensor, w: Tensor, kap: float, config: FPIConfig
) -> tuple[Tensor, Tensor]:
    """Eqs. 5-7 with full covariances; every pairwise sum a GEMM over flattened d x d blocks."""
    k, d = mu.shape
    prec = torch.cholesky_inverse(torch.linalg.cholesky(cov))
    prec = 0.5 * (prec + prec.mT)
    wt = w.T
    col = wt.sum(dim=1)  # sum_y' W_y'y
    flat = lambda t: t.reshape(k, d * d)
    wprec = (w @ flat(prec)).reshape(k, d, d)  # sum_y' W_yy' P_y'
    mu_new, cov_new = mu, cov
    if config.update in ("both", "mean"):
        pm = torch.einsum("kij,kj->ki", prec, mu)
        forward = torch.einsum("kij,kj->ki", wprec, mu) - w @ pm
        backward = torch.einsum("kij,kj->ki", prec, mu * col[:, None] - wt @ mu)
        mu_new = m + kap * torch.einsum("kij,kj->ki", cov, forward + backward)
    if config.update in ("both", "variance"):
        wmu = wt @ mu  # sum_y' W_y'y mu_y'
        outer = lambda a, b: a[:, :, None] * b[:, None, :]
        dd = (
            col[:, None, None] * outer(mu, mu)
            - outer(mu, wmu)
            - outer(wmu, mu)
            + (wt @ flat(outer(mu, mu))).reshape(k, d, d)
        )  # sum W_y'y D D^T
        q = dd + (wt @ flat(cov)).reshape(k, d, d)  # + sum W_y'y Sigma_y'
        balance = 1.0 + kap * (w.sum(dim=1) - col)
        a = balance[:, None, None] * prec + kap * prec @ q @ prec
        delta = m - mu
        b = s + outer(delta, delta) + kap * cov @ wprec @ cov
        a, b = 0.5 * (a + a.mT), 0.5 * (b + b.mT)
        a_half, a_inv_half = _sym_sqrt(a)
        inner, _ = _sym_sqrt(a_half @ b @ a_half)
        cov_new = a_inv_half @ inner @ a_inv_half
        cov_new = 0.5 * (cov_new + cov_new.mT)
        if config.var_bounds is not None:
            evals, evecs = torch.linalg.eigh(cov_new)
            evals = evals.clamp(*config.var_bounds)
            cov_new = (evecs * evals[..., None, :]) @ evecs.mT
    return mu_new, cov_new


def fpi_step(
    mu: Tensor, scale: Tensor, m: Tensor, s: Tensor, objective: Objective, config: FPIConfig
) -> tuple[Tensor, Tensor]:
    """One undamped application F(mu, scale) of the fixed-point map (no bounds for diag).

    Shapes: mu, m [K, d]; scale, s [K, d] (diag) or [K, d, d] (full). Float64 in and out.
    """
    k = mu.shape[0]
    kap = kappa(objective.lam, k)
    if kap > 0:
        w = repulsion_weights(pairwise_kl(mu, scale), objective.alpha, objective.pi)
    else:
        w = torch.zeros(k, k, dtype=mu.dtype, device=mu.device)
    if scale.ndim == 3:
        return _full_step(mu, scale, m, s, w, kap, config)
    mu_new = (
        _mean_update(mu, scale, m, w, kap, config.isotropic_mean)
        if config.update != "variance"
        else mu
    )
    v_new = _variance_update(mu, scale, m, s, w, kap, config) if config.update != "mean" else scale
    return mu_new, v_new


# ---------------------------------------------------------------------------------- the solver
def _class_l2(delta: Tensor) -> float:
    """max over classes of the L2 norm over the remaining dimensions."""
    return float(delta.flatten(1).norm(dim=1).max())


def _kl_summary(mu: Tensor, scale: Tensor) -> tuple[float, float]:
    k = mu.shape[0]
    if k < 2:
        return float("nan"), float("nan")
    kl = pairwise_kl(mu, scale)
    off = kl[~torch.eye(k, dtype=torch.bool, device=kl.device)]
    return float(off.min()), float(off.mean())


@dataclass
class _Point:
    """An iterate x = (mu, scale) with its packed coordinates u, its image F(x), and the two
    residuals |F(x) - x|."""

    u: Tensor
    mu: Tensor
    scale: Tensor
    mu_f: Tensor
    scale_f: Tensor
    r_mu: float
    r_var: float

    @property
    def residual(self) -> float:
        return max(self.r_mu, self.r_var)


class _FixedPointMap:
    """The FPI map of one solve, with everything the solver needs around it: the projection
    onto the variance bounds, float32 rounding, finiteness and divergence checks, and the
    packing of the moving coordinates into one vector u = (mu, log v) for Anderson mixing
    (log v keeps diagonal variances positive; full covariances are mixed linearly)."""

    def __init__(
        self, stats: ClassStatistics, objective: Objective, config: FPIConfig, report: FPIReport
    ) -> None:
        self.objective, self.config, self.report = objective, config, report
        self.diag = config.covariance == "diag"
        self.m = stats.mean()
        self.s = stats.var() if self.diag else stats.cov()
        self.k, self.d = self.m.shape
        self.move_mu, self.move_var = config.update != "variance", config.update != "mean"
        self.bounds = config.var_bounds if self.diag and self.move_var else None
        self.data_var = self.s if self.diag else stats.var()  # no 2nd K x d copy when diagonal
        self.fixed: tuple[Tensor, Tensor] | None = None  # the coordinates that do not move

    def start(self, init: GaussianPrior) -> tuple[Tensor, Tensor]:
        mu = init.means.to(self.m).clone()
        scale = init.scale_param.to(self.m).clone()
        if self.bounds is not None:
            scale = scale.clamp(*self.bounds)
        self.fixed = (mu, scale)
        # Reference scales of the divergence test: the data's spread and the variances' size.
        var_now = scale if self.diag else torch.diagonal(scale, dim1=1, dim2=2)
        self.ref_var = float(torch.maximum(self.data_var.max(), var_now.max()))
        self.ref_mu = math.sqrt(self.ref_var) + float((self.m - self.m.mean(0)).norm(dim=1).max())
        return mu, scale

    # ---------------------------------------------------------------------------- evaluation
    def point(self, u: Tensor, mu: Tensor, scale: Tensor, it: int) -> _Point:
        """F at x = (mu, scale) (packed: u), projected and rounded, checked finite, with its
        residuals."""
        mu_f, scale_f = fpi_step(mu, scale, self.m, self.s, self.objective, self.config)
        if self.diag and self.move_var:
            if self.bounds is not None:
                scale_f = scale_f.clamp(*self.bounds)
            elif torch.isinf(scale_f).any():
                self.report.stop_reason = "diverged"
                raise FPIDivergenceError(
                    f"iteration {it}: the variance update has no positive solution for "
                    f"{int(torch.isinf(scale_f).sum())} coordinates (A <= 0: the repulsion "
                    "outweighs the likelihood); set var_bounds, lower lam, or update the means only",
                    self.report,
                )
        if self.config.round_float32:
            mu_f, scale_f = mu_f.float().double(), scale_f.float().double()
        if not (torch.isfinite(mu_f).all() and torch.isfinite(scale_f).all()):
            self.report.stop_reason = "non-finite"
            raise NonFiniteError(f"FPI iteration {it} produced NaN/inf ({self.report.summary()})")
        return _Point(u, mu, scale, mu_f, scale_f, _class_l2(mu_f - mu), _class_l2(scale_f - scale))

    def check_divergence(self, x: _Point, it: int) -> None:
        """Raise FPIDivergenceError when the state has grown far beyond the data's own scale
        while the residual stopped decreasing: no finite fixed point is being approached."""
        var_now = x.scale if self.diag else torch.diagonal(x.scale, dim1=1, dim2=2)
        mean_growth = _class_l2(x.mu - self.m) / self.ref_mu
        growth = max(float(var_now.max()) / self.ref_var, mean_growth)
        residuals = self.report.residuals
        if growth > self.config.divergence_factor and x.residual >= min(residuals[-10:]):
            self.report.stop_reason = "diverged"
            self.report.kl_min_after, self.report.kl_mean_after = _kl_summary(x.mu, x.scale)
            if mean_growth > self.config.divergence_factor:
                # Variance bounds and a means-only update cannot hold means that run away.
                advice = (
                    f"the means run away: the repulsion outweighs the likelihood at lambda = "
                    f"{self.objective.lam:g}, whatever the variances do; lower lam"
                )
            else:
                advice = (
                    "the variances grow without bound: with them free this lambda has no "
                    "finite fixed point: set var_bounds, lower lam, or update the means only"
                )
            raise FPIDivergenceError(
                f"FPI diverges at iteration {it}: means/variances grew to {growth:.3g}x the data "
                f"scale ({self.report.summary()}); {advice}",
                self.report,
            )

    # ------------------------------------------------------------------------------- packing
    def pack(self, mu: Tensor, scale: Tensor) -> Tensor:
        parts = [mu.flatten()] if self.move_mu else []
        if self.move_var:
            parts.append(scale.log().flatten() if self.diag else scale.flatten())
        return torch.cat(parts)

    def project(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u -> (u, mu, scale) with the log-variances clamped to the bounds (in place) and the
        state rounded like an iterate (then u is re-packed from the rounded values)."""
        assert self.fixed is not None
        kd = self.k * self.d
        if self.bounds is not None:
            u[-kd:] = u[-kd:].clamp(math.log(self.bounds[0]), math.log(self.bounds[1]))
        mu, rest = (u[:kd].view(self.k, self.d), u[kd:]) if self.move_mu else (self.fixed[0], u)
        if not self.move_var:
            scale = self.fixed[1]
        elif self.diag:
            scale = rest.view(self.k, self.d).exp()
        else:
            scale = rest.view(self.k, self.d, self.d)
        if self.config.round_float32:
            mu, scale = mu.float().double(), scale.float().double()
            u = self.pack(mu, scale)
        return u, mu, scale

    def residual_weight(self) -> Tensor:
        """Units of the residual for the mixing: means in data standard deviations, log
        variances as they are (full covariances in the class's mean variance)."""
        parts = []
        if self.move_mu:
            parts.append((1.0 / self.data_var.sqrt()).flatten())
        if self.move_var:
            kd = self.k * self.d
            parts.append(
                torch.ones(kd, dtype=self.m.dtype, device=self.m.device)
                if self.diag
                else (1.0 / self.data_var.mean(1))[:, None]
                .expand(self.k, self.d * self.d)
                .flatten()
            )
        return torch.cat(parts)

    def admissible(self, scale: Tensor) -> bool:
        """Whether a mixed full covariance is still SPD (diagonal ones are by construction)."""
        if self.diag or not self.move_var:
            return True
        return bool((torch.linalg.cholesky_ex(scale)[1] == 0).all())

    def finish(self, mu: Tensor, scale: Tensor) -> GaussianPrior:
        """The prior at the solver's result, with the report's closing numbers filled in."""
        report, bounds = self.report, self.config.var_bounds
        report.kl_min_after, report.kl_mean_after = _kl_summary(mu, scale)
        report.objective_after = _objective_value(mu, scale, self.m, self.s, self.objective)
        if bounds is not None:
            lo, hi = bounds
            report.var_bounds = (float(lo), float(hi))
            var_now = scale if self.diag else torch.linalg.eigvalsh(scale)
            report.at_lower_bound = int((var_now <= lo * (1 + 1e-12)).sum())
            report.at_upper_bound = int((var_now >= hi * (1 - 1e-12)).sum())
        return GaussianPrior(mu, var=scale) if self.diag else GaussianPrior(mu, cov=scale)


def _objective_value(
    mu: Tensor, scale: Tensor, m: Tensor, s: Tensor, objective: Objective
) -> float:
    """The objective of Prop. 1 at (mu, scale), pi frozen there (for the report)."""
    return float(prior_objective(mu, scale, m, s, **objective.to_dict()))


def solve_fpi(
    stats: ClassStatistics,
    objective: Objective,
    config: FPIConfig | None = None,
    init: GaussianPrior | None = None,
) -> tuple[GaussianPrior, FPIReport]:
    """Solve the FPI from class statistics.

    Args:
        stats: class statistics of the latents (K classes, d dims; >= 2 samples per class).
        objective: lambda, alpha and pi of the objective (shared with the GD baseline).
        config: how to solve (default :class:`FPIConfig()`).
        init: starting prior (default :func:`initial_prior`: class means and variances).

    Returns:
        The new prior and the :class:`FPIReport`.

    Raises:
        FPIDivergenceError: a mean or variance grows without bound (no finite fixed point).
        FPINotConvergedError: ``max_iter`` reached while ``require_convergence`` (with
            ``auto_bounds``: no box of the ladder made the iteration converge either).
        NonFiniteError: NaN/inf appeared in the iteration.

    Example:
        >>> z, y = torch.randn(200, 4, dtype=torch.float64), torch.arange(200) % 4
        >>> stats = ClassStatistics.from_batch(z, y, 4)
        >>> prior, report = solve_fpi(stats, Objective(lam=10.0), FPIConfig(update="mean"))
        >>> report.converged
        True
    """
    config = config or FPIConfig()
    init = initial_prior(stats, config) if init is None else init
    if init.covariance != config.covariance or tuple(init.means.shape) != (
        stats.num_classes,
        stats.dim,
    ):
        raise ShapeError(
            f"initial prior ({init.covariance}, {tuple(init.means.shape)}) does not match the "
            f"statistics/config ({config.covariance}, {(stats.num_classes, stats.dim)})"
        )
    searching = bool(config.auto_bounds) and config.var_bounds is None and config.update != "mean"
    try:
        prior, report = _solve(stats, objective, config, init)
        if report.converged or not searching:
            return _checked(prior, report, config)
        failure: SolverError = FPINotConvergedError(report.summary(), report)
    except FPIDivergenceError as err:
        if not searching:
            raise
        failure = err
    return _solve_with_auto_bounds(stats, objective, config, init, failure)


def _checked(
    prior: GaussianPrior, report: FPIReport, config: FPIConfig
) -> tuple[GaussianPrior, FPIReport]:
    if not report.converged and config.require_convergence:
        raise FPINotConvergedError(
            f"FPI did not reach tol={config.tol:g} within max_iter={config.max_iter} "
            f"({report.summary()}); raise max_iter/tol or pass require_convergence=False",
            report,
        )
    return prior, report


def _variance_range(stats: ClassStatistics, config: FPIConfig) -> tuple[float, float]:
    """[v_lo, v_hi]: the smallest and largest class variance (covariance eigenvalue)."""
    var = stats.var() if config.covariance == "diag" else torch.linalg.eigvalsh(stats.cov())
    return float(var.min()), float(var.max())


def _solve_with_auto_bounds(
    stats: ClassStatistics,
    objective: Objective,
    config: FPIConfig,
    init: GaussianPrior,
    failure: SolverError,
) -> tuple[GaussianPrior, FPIReport]:
    """The ladder of :attr:`FPIConfig.auto_bounds` after the unbounded solve failed: the first
    (least restrictive) box whose projected iteration converges."""
    lo, hi = _variance_range(stats, config)
    log.info("FPI without bounds: %s; trying automatic variance bounds", failure)
    attempts = 1
    last: tuple[GaussianPrior, FPIReport] | None = None
    for factor in config.auto_bounds:
        bounded = config.replace(var_bounds=(lo / factor, hi * factor))
        try:
            prior, report = _solve(stats, objective, bounded, init)
        except FPIDivergenceError as err:
            failure = err
            attempts += 1
            continue
        report.bound_factor, report.bound_attempts = float(factor), attempts
        if report.converged:
            log.info("FPI with automatic bounds: %s", report.summary())
            return prior, report
        last, failure = (prior, report), FPINotConvergedError(report.summary(), report)
        attempts += 1
    message = (
        f"FPI found no fixed point unbounded nor within any of the automatic variance bounds "
        f"(v_lo / f, v_hi * f) for f in {config.auto_bounds}, v_lo = {lo:.3g}, v_hi = {hi:.3g} "
        f"(last attempt: {failure}); raise max_iter, add tighter factors, lower lam, or update "
        "the means only"
    )
    if last is not None and not config.require_convergence:
        log.warning(message)
        return last
    if isinstance(failure, FPIDivergenceError):
        raise FPIDivergenceError(message, failure.report)
    raise FPINotConvergedError(message, failure.report)


def _solve(
    stats: ClassStatistics, objective: Objective, config: FPIConfig, init: GaussianPrior
) -> tuple[GaussianPrior, FPIReport]:
    """One solve with ``config`` as it is: the prior at the last iterate and its report
    (converged or stopped at ``max_iter``); raises FPIDivergenceError / NonFiniteError."""
    report = FPIReport()
    fmap = _FixedPointMap(stats, objective, config, report)
    mu, scale = fmap.start(init)
    report.kl_min_before, report.kl_mean_before = _kl_summary(mu, scale)
    report.objective_before = _objective_value(mu, scale, fmap.m, fmap.s, objective)
    mixer = (
        AndersonMixer(config.anderson_memory, fmap.residual_weight())
        if config.damping == "anderson"
        else None
    )

    it = 1
    x = fmap.point(fmap.pack(mu, scale), mu, scale, it)
    while True:
        report.iterations = it
        report.residuals.append(x.residual)
        report.residuals_mean.append(x.r_mu)
        report.residuals_var.append(x.r_var)
        if x.residual <= config.tol:
            report.converged, report.stop_reason = True, "converged"
            mu, scale = x.mu_f, x.scale_f  # the last image F(x) is the solution
            break
        fmap.check_divergence(x, it)
        if it >= config.max_iter:
            report.stop_reason, mu, scale = "max_iter", x.mu, x.scale
            break
        it += 1
        step = _next_point(fmap, mixer, x, it)
        if step is None:  # a rejected mixing step used up the last iteration
            report.iterations, report.stop_reason, mu, scale = it, "max_iter", x.mu, x.scale
            break
        x, it = step
    return fmap.finish(mu, scale), report


def _next_point(
    fmap: _FixedPointMap, mixer: AndersonMixer | None, x: _Point, it: int
) -> tuple[_Point, int] | None:
    """The next iterate, evaluated: the plain step x <- F(x), or a safeguarded Anderson step
    taken only if its residual beats the current one; otherwise the mixer restarts and the plain
    step is taken, which costs one more iteration (``None`` when none is left)."""
    if mixer is None:
        return fmap.point(fmap.pack(x.mu_f, x.scale_f), x.mu_f, x.scale_f, it), it
    g = fmap.pack(x.mu_f, x.scale_f) - x.u
    u_c, mu_c, scale_c = fmap.project(mixer.step(x.u, g))
    if fmap.admissible(scale_c):
        cand = fmap.point(u_c, mu_c, scale_c, it)
        g_cand = fmap.pack(cand.mu_f, cand.scale_f) - cand.u
        if float((g_cand * mixer.weight).norm()) < float((g * mixer.weight).norm()):
            fmap.report.anderson_accepted += 1
            return cand, it
        if it >= fmap.config.max_iter:
            return None
        it += 1
    fmap.report.anderson_rejected += 1
    mixer.reset()
    u_p, mu_p, scale_p = fmap.project(x.u + g)
    return fmap.point(u_p, mu_p, scale_p, it), it
