"""The objective behind Proposition 1 (paper Eqs. 3-4), shared by the FPI and GD solvers.

    L(Psi) = sum_y NLL_y(mu_y, Sigma_y)  +  kappa * sum_{y != y'} exp(-KL_yy' / (pi_yy' alpha)),
    kappa  = lambda / (K (K - 1)),

where NLL_y is the class-averaged negative log-likelihood written with the class's sufficient
statistics (mean m_y and unbiased covariance S_y):

    NLL_y = 1/2 [ d log 2 pi + log det Sigma_y + tr(Sigma_y^{-1} (S_y + (m_y - mu_y)(m_y - mu_y)^T)) ].

The data term counts one unit per class (not per sample), which is what gives the paper's lambda
values their meaning. pi is a constant of each iteration (stop-gradient), evaluated from the
current KLs: ``pairwise`` (Eq. 9, pi_yy' = KL_yy') or ``mean`` (Eq. 10, the mean off-diagonal KL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from nfpi.errors import DegenerateGaussiansError
from nfpi.prior.kl import pairwise_kl
from nfpi.schema import Config, check, is_number

__all__ = [
    "Objective",
    "PiMode",
    "class_nll",
    "kappa",
    "kld_repulsion",
    "pairwise_potential",
    "prior_objective",
    "repulsion_weights",
]

PiMode = Literal["pairwise", "mean"]
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Objective(Config):
    """The objective both prior solvers minimise (FPI and GD read the same one, so a comparison
    is at equal objective by construction).

    Attributes:
        lam: lambda >= 0, weight of the KLD repulsion (divided by K (K-1) internally).
        alpha: alpha > 0 in exp(-KL / (pi alpha)) (the paper's range is 0.1 to 10).
        pi: ``pairwise`` (Eq. 9, pi_yy' = KL_yy') or ``mean`` (Eq. 10).
    """

    lam: float = 100.0
    alpha: float = 10.0
    pi: PiMode = "pairwise"

    def validate(self) -> None:
        check(is_number(self.lam) and self.lam >= 0, "lam", self.lam, "a finite lambda >= 0")
        check(
            is_number(self.alpha) and self.alpha > 0,
            "alpha",
            self.alpha,
            "a finite alpha > 0 (the paper uses 0.1 to 10)",
        )


def kappa(lam: float, num_classes: int) -> float:
    """lambda / (K (K - 1)); zero when there is no pair of classes."""
    return 0.0 if num_classes < 2 else lam / (num_classes * (num_classes - 1))


def _pi_alpha(kl: Tensor, alpha: float, pi: PiMode) -> Tensor:
    """The detached temperature pi * alpha: [K, K] (pairwise) or a scalar (mean); 1 on the diagonal."""
    kl = kl.detach()
    k = kl.shape[0]
    off = ~torch.eye(k, dtype=torch.bool, device=kl.device)
    if pi == "pairwise":
        temp = torch.where(off, kl * alpha, torch.ones_like(kl))
    else:
        temp = (kl[off].mean() * alpha).expand(k, k)
    bad = off & ~(temp > 0)
    if bad.any():
        a, b = (int(i) for i in bad.nonzero()[0])
        raise DegenerateGaussiansError(
            f"the gaussians of classes {a} and {b} coincide (KL = {float(kl[a, b]):.3g}), so the "
            f"{pi!r} repulsion temperature pi * alpha is zero; classes need distinct statistics"
        )
    return temp


def repulsion_weights(kl: Tensor, alpha: float, pi: PiMode) -> Tensor:
    """W_yy' = exp(-KL_yy' / (pi alpha)) / (pi alpha) off the diagonal, exactly 0 on it.

    kl: [K, K] pairwise KLs -> [K, K] weights (pi detached; the diagonal is masked before dividing).
    """
    temp = _pi_alpha(kl, alpha, pi)
    w = torch.exp(-kl / temp) / temp
    return w.masked_fill(torch.eye(kl.shape[0], dtype=torch.bool, device=kl.device), 0.0)


def class_nll(means: Tensor, scale: Tensor, data_mean: Tensor, data_scale: Tensor) -> Tensor:
    """sum_y NLL_y: means [K, d]; scale/data_scale var [K, d] or cov [K, d, d] -> scalar."""
    delta = data_mean - means
    d = means.shape[1]
    if scale.ndim == 2:
        per_class = (scale.log() + (data_scale + delta * delta) / scale).sum(dim=1)
    else:
        chol = torch.linalg.cholesky(scale)
        logdet = 2.0 * torch.diagonal(chol, dim1=1, dim2=2).log().sum(dim=1)
        target = data_scale + delta[:, :, None] * delta[:, None, :]
        trace = torch.diagonal(torch.cholesky_solve(target, chol), dim1=1, dim2=2).sum(dim=1)
        per_class = logdet + trace
    return 0.5 * (per_class.sum() + means.shape[0] * d * _LOG_2PI)


def kld_repulsion(means: Tensor, scale: Tensor, alpha: float, pi: PiMode) -> Tensor:
    """L_KLD (Eq. 3): sum over ordered pairs y != y' of exp(-KL_yy' / (pi alpha)), pi detached."""
    kl = pairwise_kl(means, scale)
    temp = _pi_alpha(kl, alpha, pi)
    terms = torch.exp(-kl / temp)
    return terms.masked_fill(torch.eye(kl.shape[0], dtype=torch.bool, device=kl.device), 0.0).sum()


def prior_objective(
    means: Tensor,
    scale: Tensor,
    data_mean: Tensor,
    data_scale: Tensor,
    *,
    lam: float,
    alpha: float,
    pi: PiMode,
) -> Tensor:
    """L(Psi) = sum_y NLL_y + lambda / (K (K-1)) * L_KLD, differentiable in ``means``/``scale``.

    Args:
        means: [K, d] prior means mu.
        scale: [K, d] variances or [K, d, d] covariances of the prior.
        data_mean: [K, d] class means m (from :class:`~nfpi.prior.stats.ClassStatistics`).
        data_scale: unbiased class variances s [K, d] (or covariances [K, d, d]).
        lam, alpha, pi: the repulsion's lambda, alpha and pi choice.

    With ``pi="pairwise"`` the value of the repulsion is the constant K(K-1) exp(-1/alpha) (pi is
    frozen at the current KLs), while its gradient is that of a log-KL barrier: use the gradient,
    not the value, to judge a fixed point.
    """
    nll = class_nll(means, scale, data_mean, data_scale)
    k = means.shape[0]
    if lam == 0 or k < 2:
        return nll
    return nll + kappa(lam, k) * kld_repulsion(means, scale, alpha, pi)


def pairwise_potential(
    means: Tensor,
    scale: Tensor,
    data_mean: Tensor,
    data_scale: Tensor,
    *,
    lam: float,
    alpha: float,
) -> Tensor:
    """The potential behind ``pi="pairwise"``: sum_y NLL_y - kappa e^{-1/alpha} / alpha sum log KL.

    With pi_yy' = KL_yy' detached, the gradient of :func:`prior_objective` equals the gradient of
    this fixed function (a log-KL barrier, unbounded below when the variances may grow), so it
    decreases along gradient steps and its stationary points are the FPI's fixed points.
    """
    nll = class_nll(means, scale, data_mean, data_scale)
    k = means.shape[0]
    if lam == 0 or k < 2:
        return nll
    kl = pairwise_kl(means, scale)
    off = ~torch.eye(k, dtype=torch.bool, device=kl.device)
    if not (kl[off] > 0).all():
        raise DegenerateGaussiansError(
            "two class gaussians coincide: the log-KL barrier is infinite"
        )
    return nll - kappa(lam, k) * math.exp(-1.0 / alpha) / alpha * kl[off].log().sum()
