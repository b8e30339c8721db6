"""Straightforward broadcast (K x K x d) forms of the pairwise quantities.

They transcribe the equations literally, pair by pair, and need O(K^2 d) memory (more than
100 GB at K = 1000, d = 3072). They exist as the independent reference that the GEMM forms in
:mod:`nfpi.prior.kl` and :mod:`nfpi.prior.fpi` are tested and benchmarked against; never use
them in training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nfpi.prior.fpi import FPIConfig
from nfpi.prior.objective import Objective, kappa, repulsion_weights

__all__ = ["fpi_step_broadcast", "pairwise_kl_broadcast"]


def pairwise_kl_broadcast(means: Tensor, var: Tensor) -> Tensor:
    """KL(N_y || N_y') for diagonal gaussians via a [K, K, d] tensor."""
    v_y, v_o = var[:, None, :], var[None, :, :]
    diff = means[None, :, :] - means[:, None, :]
    kl = 0.5 * (v_y / v_o + diff**2 / v_o - 1.0 + v_o.log() - v_y.log()).sum(-1)
    kl.fill_diagonal_(0.0)
    return kl


def fpi_step_broadcast(
    mu: Tensor, v: Tensor, m: Tensor, s: Tensor, objective: Objective, config: FPIConfig
) -> tuple[Tensor, Tensor]:
    """One undamped FPI map for diagonal covariances, written pair by pair with [K, K, d] tensors."""
    k = mu.shape[0]
    kap = kappa(objective.lam, k)
    w = repulsion_weights(pairwise_kl_broadcast(mu, v), objective.alpha, objective.pi)[
        :, :, None
    ]  # W_yy'
    wt = w.transpose(0, 1)  # W_y'y at [y, y']
    diff = mu[:, None, :] - mu[None, :, :]  # D_yy' = mu_y - mu_y'
    v_y, v_o = v[:, None, :], v[None, :, :]
    mu_new, v_new = mu, v
    if config.update != "variance":
        if config.isotropic_mean:
            p_o = (1.0 / v).mean(1)[None, :, None]
            p_y = (1.0 / v).mean(1)[:, None, None]
            lead = v.mean(1, keepdim=True)
        else:
            p_o, p_y, lead = 1.0 / v_o, 1.0 / v_y, v
        mu_new = m + kap * lead * ((w * p_o + wt * p_y) * diff).sum(1)
    if config.update != "mean":
        if config.summed_q:
            q = ((mu[:, None, :] - mu[None, :, :]) ** 2).sum(1)  # sum_l (mu_y' - mu_l)^2, by y'
            sq = q[None, :, :].expand(k, k, -1)
        else:
            sq = diff**2
        balance = 1.0 + kap * (w - wt).sum(1)
        spread = (wt * (sq + v_o)).sum(1)
        attract = kap * v * v * (w / v_o).sum(1)
        if config.form == "paper":
            a = balance / v + kap * spread / v**2
            b = s + (m - mu) ** 2 + attract
        else:
            a = balance * v + kap * spread
            b = s + attract
        v_new = torch.where(a > 0, torch.sqrt(b / a.where(a > 0, torch.ones_like(a))), torch.inf)
    return mu_new, v_new
