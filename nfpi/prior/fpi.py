"""Fixed-point iteration (FPI) for the class gaussians (paper Prop. 1, Eqs. 5-10).

Everything runs in float64 and every pairwise sum is a K x K by K x d matrix product, so one
iteration costs O(K^2 d) time and O(K d + K^2) memory (K = 1000, d = 3072 fits in well under 2 GB).

Two forms are offered:

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
The default damping is safeguarded Anderson mixing (each step combines the last few iterates to
cancel the residual, on the coordinates (mu, log v); a step that would not reduce the residual
is replaced by the plain one). With both means and variances free and a large lambda the paper
form has no finite fixed point: the variances grow without bound. The solver detects this and
raises :class:`FPIDivergenceError` with its report; variance bounds (projection after every
update) make it converge.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from nfpi.errors import (
    ConfigError,
    FPIDivergenceError,
    FPINotConvergedError,
    NonFiniteError,
    ShapeError,
)
from nfpi.prior.gaussian import Covariance, GaussianPrior
from nfpi.prior.kl import pairwise_kl
from nfpi.prior.objective import PiMode, kappa, prior_objective, repulsion_weights
from nfpi.prior.stats import ClassStatistics
from nfpi.validation import config_kwargs

__all__ = ["FPIConfig", "FPIReport", "fpi_step", "initial_prior", "solve_fpi"]

Update = Literal["both", "mean", "variance"]
Form = Literal["paper", "reference"]


@dataclass(frozen=True)
class FPIConfig:
    """Settings of the fixed-point solver; validated at construction.

    Attributes:
        lam: lambda >= 0, weight of the KLD repulsion (divided by K (K-1) internally).
        alpha: alpha > 0 in exp(-KL / (pi alpha)).
        pi: ``pairwise`` (Eq. 9) or ``mean`` (Eq. 10).
        update: what moves: ``both``, ``mean`` (variances fixed at the start) or ``variance``.
        form: ``paper`` (true stationary point) or ``reference`` (released code).
        variance_init: start variances at the class variances (``data``) or at 1 (``identity``,
            Table 3 setting #2).
        covariance: ``diag`` or ``full`` (paper form only).
        summed_q, isotropic_mean: the reference form's options.
        tol: stop when max over classes of the L2 change of mu and of v are both <= tol.
        max_iter: iteration cap.
        damping: ``anderson`` (adaptive damping by safeguarded Anderson mixing: each step
            combines the last iterates so as to cancel the residual, and falls back to the plain
            step whenever that would not reduce it) or ``none`` (plain x <- F(x), the release).
        anderson_memory: number of past iterates the Anderson mixing combines (>= 1).
        var_bounds: (v_min, v_max) projection of the variances (eigenvalues for full
            covariances) after each update, or None.
        round_float32: round the state to float32 after each iteration (the release does).
        require_convergence: raise FPINotConvergedError when max_iter is hit unconverged.
        divergence_factor: growth of means/variances (relative to the data scale) that, with a
            residual no longer decreasing, counts as unbounded.
    """

    lam: float = 100.0
    alpha: float = 10.0
    pi: PiMode = "pairwise"
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

    def __post_init__(self) -> None:
        choices = {
            "pi": ("pairwise", "mean"),
            "update": ("both", "mean", "variance"),
            "form": ("paper", "reference"),
            "variance_init": ("data", "identity"),
            "covariance": ("diag", "full"),
            "damping": ("anderson", "none"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"fpi.{name}", getattr(self, name), f"one of {allowed}")
        for name in ("lam", "alpha", "tol", "divergence_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"fpi.{name}", value, "a finite number")
        if self.lam < 0:
            raise ConfigError("fpi.lam", self.lam, "lambda must be >= 0")
        if self.alpha <= 0:
            raise ConfigError(
                "fpi.alpha", self.alpha, "alpha must be > 0 (the paper uses 0.1 to 10)"
            )
        if self.tol <= 0:
            raise ConfigError("fpi.tol", self.tol, "a tolerance > 0")
        if self.divergence_factor <= 1:
            raise ConfigError(
                "fpi.divergence_factor", self.divergence_factor, "a growth factor > 1"
            )
        for name, low in (("max_iter", 1), ("anderson_memory", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"fpi.{name}", value, f"an integer >= {low}")
        if self.var_bounds is not None:
            lo, hi = self.var_bounds
            if not (0 < lo < hi and math.isfinite(hi)):
                raise ConfigError(
                    "fpi.var_bounds", self.var_bounds, "(v_min, v_max) with 0 < v_min < v_max < inf"
                )
        if self.form == "paper" and (self.summed_q or self.isotropic_mean):
            raise ConfigError(
                "fpi.form",
                self.form,
                "summed_q and isotropic_mean are options of form='reference' only",
            )
        if self.form == "reference" and self.covariance == "full":
            raise ConfigError(
                "fpi.covariance", "full", "the reference form exists for diagonal covariances only"
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
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FPIConfig:
        """Build from a plain dict (e.g. a sweep sample); unknown keys are rejected."""
        values = config_kwargs(cls, values, "fpi")
        if values.get("var_bounds") is not None:
            values["var_bounds"] = tuple(float(b) for b in values["var_bounds"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    mu: Tensor, scale: Tensor, m: Tensor, s: Tensor, config: FPIConfig
) -> tuple[Tensor, Tensor]:
    """One undamped application F(mu, scale) of the fixed-point map (no bounds for diag).

    Shapes: mu, m [K, d]; scale, s [K, d] (diag) or [K, d, d] (full). Float64 in and out.
    """
    k = mu.shape[0]
    kap = kappa(config.lam, k)
    if kap > 0:
        w = repulsion_weights(pairwise_kl(mu, scale), config.alpha, config.pi)
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


def _objective(mu: Tensor, scale: Tensor, m: Tensor, s: Tensor, config: FPIConfig) -> float:
    """The objective of Prop. 1 at (mu, scale), pi frozen there (for the report)."""
    value = prior_objective(mu, scale, m, s, lam=config.lam, alpha=config.alpha, pi=config.pi)
    return float(value)


class _Anderson:
    """Anderson mixing (type II) with a fixed-size history in preallocated buffers.

    Given the current point u and its fixed-point residual g = G(u) - u, the next point is
    u + g - (dU + dG) gamma, gamma the least-squares fit of g by the last ``memory`` residual
    differences dG (weighted by ``weight``): an adaptive damping that extrapolates through
    period-2 oscillations and slow drifts alike. Memory: 2 x memory x len(u) floats.
    """

    def __init__(self, memory: int, weight: Tensor) -> None:
        n = weight.numel()
        self.memory, self.weight = memory, weight
        self.du = weight.new_zeros(memory, n)
        self.dg = weight.new_zeros(memory, n)  # weighted differences
        self.count = 0
        self.prev: tuple[Tensor, Tensor] | None = None

    def reset(self) -> None:
        self.count, self.prev = 0, None

    def step(self, u: Tensor, g: Tensor) -> Tensor:
        gw = g * self.weight
        if self.prev is not None:
            slot = self.count % self.memory
            self.du[slot] = u - self.prev[0]
            self.dg[slot] = gw - self.prev[1]
            self.count += 1
        self.prev = (u, gw)
        used = min(self.count, self.memory)
        if used == 0:
            return u + g
        du, dg = self.du[:used], self.dg[:used]
        gram = dg @ dg.T
        ridge = 1e-10 * float(gram.diagonal().max()) + 1e-300
        gamma = torch.linalg.solve(
            gram + ridge * torch.eye(used, dtype=gram.dtype, device=gram.device), dg @ gw
        )
        # Two small products instead of materialising (du + dg / w): no [memory, n] temporaries.
        return u + g - gamma @ du - (gamma @ dg) / self.weight


def solve_fpi(
    stats: ClassStatistics,
    config: FPIConfig,
    init: GaussianPrior | None = None,
) -> tuple[GaussianPrior, FPIReport]:
    """Solve the FPI from class statistics.

    Args:
        stats: class statistics of the latents (K classes, d dims; >= 2 samples per class).
        config: solver settings.
        init: starting prior (default :func:`initial_prior`: class means and variances).

    Returns:
        The new prior and the :class:`FPIReport`.

    Raises:
        FPIDivergenceError: a mean or variance grows without bound (no finite fixed point).
        FPINotConvergedError: ``max_iter`` reached while ``require_convergence``.
        NonFiniteError: NaN/inf appeared in the iteration.

    Example:
        >>> z, y = torch.randn(200, 4, dtype=torch.float64), torch.arange(200) % 4
        >>> stats = ClassStatistics.from_batch(z, y, 4)
        >>> prior, report = solve_fpi(stats, FPIConfig(lam=10.0, update="mean"))
        >>> report.converged
        True
    """
    m = stats.mean()
    diag = config.covariance == "diag"
    s = stats.var() if diag else stats.cov()
    init = initial_prior(stats, config) if init is None else init
    if init.covariance != config.covariance or tuple(init.means.shape) != tuple(m.shape):
        raise ShapeError(
            f"initial prior ({init.covariance}, {tuple(init.means.shape)}) does not match the "
            f"statistics/config ({config.covariance}, {tuple(m.shape)})"
        )
    mu = init.means.to(m).clone()
    scale = init.scale_param.to(m).clone()
    bounds = config.var_bounds
    if bounds is not None and diag and config.update != "mean":
        scale = scale.clamp(*bounds)
    report = FPIReport()
    report.kl_min_before, report.kl_mean_before = _kl_summary(mu, scale)
    report.objective_before = _objective(mu, scale, m, s, config)

    # The mixing runs on u = (mu, log v): positivity of diagonal variances is then automatic.
    # Full covariances mix linearly and fall back to a plain damped step if SPD is lost.
    move_mu, move_var = config.update != "variance", config.update != "mean"
    data_var = s if diag else stats.var()  # no second K x d copy for diagonal priors
    k, d = m.shape

    def pack(mu_: Tensor, scale_: Tensor) -> Tensor:
        parts = [mu_.flatten()] if move_mu else []
        if move_var:
            parts.append(scale_.log().flatten() if diag else scale_.flatten())
        return torch.cat(parts)

    def unpack(u: Tensor) -> tuple[Tensor, Tensor]:
        mu_, rest = (u[: k * d].view(k, d), u[k * d :]) if move_mu else (mu, u)
        if not move_var:
            return mu_, scale
        return mu_, (rest.view(k, d).exp() if diag else rest.view(k, d, d))

    weights = []
    if move_mu:
        weights.append((1.0 / data_var.sqrt()).flatten())  # mean residuals in data std units
    if move_var:
        weights.append(
            torch.ones(k * d, dtype=m.dtype, device=m.device)
            if diag
            else (1.0 / data_var.mean(1))[:, None].expand(k, d * d).flatten()
        )
    mixer_weight = torch.cat(weights)
    mixer = (
        _Anderson(config.anderson_memory, mixer_weight) if config.damping == "anderson" else None
    )

    # Reference scales for divergence detection: data spread and variance magnitude.
    ref_var = float(
        torch.maximum(
            data_var.max(), torch.diagonal(scale, dim1=1, dim2=2).max() if not diag else scale.max()
        )
    )
    ref_mu = math.sqrt(ref_var) + float((m - m.mean(0)).norm(dim=1).max())

    def evaluate(mu_: Tensor, scale_: Tensor, it: int) -> tuple[Tensor, Tensor, float, float]:
        """F at (mu_, scale_), projected/rounded and checked, with its two residuals."""
        mu_f, scale_f = fpi_step(mu_, scale_, m, s, config)
        if diag and move_var:
            if bounds is not None:
                scale_f = scale_f.clamp(*bounds)
            elif torch.isinf(scale_f).any():
                report.stop_reason = "diverged"
                raise FPIDivergenceError(
                    f"iteration {it}: the variance update has no positive solution for "
                    f"{int(torch.isinf(scale_f).sum())} coordinates (A <= 0: the repulsion "
                    "outweighs the likelihood); set var_bounds, lower lam, or update the means only",
                    report,
                )
        if config.round_float32:
            mu_f, scale_f = mu_f.float().double(), scale_f.float().double()
        if not (torch.isfinite(mu_f).all() and torch.isfinite(scale_f).all()):
            report.stop_reason = "non-finite"
            raise NonFiniteError(f"FPI iteration {it} produced NaN/inf ({report.summary()})")
        return mu_f, scale_f, _class_l2(mu_f - mu_), _class_l2(scale_f - scale_)

    def project(u_: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if diag and move_var and bounds is not None:
            u_[-k * d :] = u_[-k * d :].clamp(math.log(bounds[0]), math.log(bounds[1]))
        mu_, scale_ = unpack(u_)
        if config.round_float32:
            mu_, scale_ = mu_.float().double(), scale_.float().double()
            u_ = pack(mu_, scale_)
        return u_, mu_, scale_

    def weighted_norm(g_: Tensor) -> float:
        return float((g_ * mixer_weight).norm())

    it = 1
    u = pack(mu, scale)
    mu_f, scale_f, r_mu, r_v = evaluate(mu, scale, it)
    while True:
        res = max(r_mu, r_v)
        report.iterations = it
        report.residuals.append(res)
        report.residuals_mean.append(r_mu)
        report.residuals_var.append(r_v)
        if res <= config.tol:
            mu, scale = mu_f, scale_f
            report.converged, report.stop_reason = True, "converged"
            break

        # Divergence: the state keeps growing far beyond the data's own scale.
        var_now = scale if diag else torch.diagonal(scale, dim1=1, dim2=2)
        growth = max(float(var_now.max()) / ref_var, _class_l2(mu - m) / ref_mu)
        if growth > config.divergence_factor and res >= min(report.residuals[-10:]):
            report.stop_reason = "diverged"
            report.kl_min_after, report.kl_mean_after = _kl_summary(mu, scale)
            raise FPIDivergenceError(
                f"FPI diverges at iteration {it}: means/variances grew to {growth:.3g}x the data "
                f"scale ({report.summary()}); with both means and variances free this lambda has "
                "no finite fixed point: set var_bounds, lower lam, or update the means only",
                report,
            )
        if it >= config.max_iter:
            report.stop_reason = "max_iter"
            break
        it += 1

        if config.damping == "none":
            mu, scale = mu_f, scale_f
            mu_f, scale_f, r_mu, r_v = evaluate(mu, scale, it)
            continue

        g = pack(mu_f, scale_f) - u
        # Safeguarded Anderson step: taken only if its residual beats the current one; otherwise
        # the local secant model is stale: restart it and take a plain step.
        assert mixer is not None
        cand, mu_c, scale_c = project(mixer.step(u, g))
        if diag or not move_var or bool((torch.linalg.cholesky_ex(scale_c)[1] == 0).all()):
            cand_f = evaluate(mu_c, scale_c, it)
            if weighted_norm(pack(cand_f[0], cand_f[1]) - cand) < weighted_norm(g):
                report.anderson_accepted += 1
                u, mu, scale = cand, mu_c, scale_c
                mu_f, scale_f, r_mu, r_v = cand_f
                continue
            if it >= config.max_iter:
                report.iterations, report.stop_reason = it, "max_iter"
                break
            it += 1
        report.anderson_rejected += 1
        mixer.reset()
        u, mu, scale = project(u + g)
        mu_f, scale_f, r_mu, r_v = evaluate(mu, scale, it)

    report.kl_min_after, report.kl_mean_after = _kl_summary(mu, scale)
    report.objective_after = _objective(mu, scale, m, s, config)
    if bounds is not None:
        lo, hi = bounds
        var_now = scale if diag else torch.linalg.eigvalsh(scale)
        report.at_lower_bound = int((var_now <= lo * (1 + 1e-12)).sum())
        report.at_upper_bound = int((var_now >= hi * (1 - 1e-12)).sum())
    if not report.converged and config.require_convergence:
        raise FPINotConvergedError(
            f"FPI did not reach tol={config.tol:g} within max_iter={config.max_iter} "
            f"({report.summary()}); raise max_iter/tol or pass require_convergence=False",
            report,
        )
    prior = GaussianPrior(mu, var=scale) if diag else GaussianPrior(mu, cov=scale)
    return prior, report
