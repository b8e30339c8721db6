"""Pairwise KL divergences between the class gaussians, as matrix products.

KL_yy' = KL(N_y || N_y'). Memory is O(K d + K^2) for diagonal covariances (O(K d^2) for full
ones): the K x K x d difference tensor of a broadcast implementation is never formed, which is
what makes K = 1000, d = 3072 fit in a few hundred MB.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nfpi.errors import ShapeError

__all__ = ["pairwise_kl", "pairwise_kl_diag", "pairwise_kl_full", "zero_diagonal"]


def zero_diagonal(mat: Tensor) -> Tensor:
    """``mat`` with an exact-zero diagonal (a fresh tensor)."""
    eye = torch.eye(mat.shape[0], dtype=torch.bool, device=mat.device)
    return mat.masked_fill(eye, 0.0)


def pairwise_kl_diag(means: Tensor, var: Tensor) -> Tensor:
    """KL between diagonal gaussians: means, var [K, d] -> [K, K], exact zero diagonal.

    KL_yy' = 1/2 sum_d [ v_y / v_y' + (mu_y' - mu_y)^2 / v_y' - 1 + log v_y' - log v_y ]
    with the squared difference expanded into three GEMMs against the precisions 1 / v_y'.
    """
    if means.ndim != 2 or var.shape != means.shape:
        raise ShapeError(
            f"means and var must both be [K, d], got {tuple(means.shape)}, {tuple(var.shape)}"
        )
    prec = 1.0 / var  # [K, d]
    trace = var @ prec.T  # sum_d v_y / v_y'
    maha = (
        (means * means) @ prec.T
        - 2.0 * (means @ (means * prec).T)
        + (means * means * prec).sum(1)[None, :]
    )
    logdet = var.log().sum(dim=1)
    kl = 0.5 * (trace + maha - means.shape[1] + logdet[None, :] - logdet[:, None])
    # Round-off can leave tiny negative values off the diagonal; KL >= 0 holds exactly.
    return zero_diagonal(kl).clamp_min(0.0)


def pairwise_kl_full(means: Tensor, cov: Tensor) -> Tensor:
    """KL between full-covariance gaussians: means [K, d], cov [K, d, d] -> [K, K].

    KL_yy' = 1/2 [ tr(P_y' S_y) + D^T P_y' D - d + logdet S_y' - logdet S_y ], P = S^{-1},
    D = mu_y - mu_y', each term a GEMM over flattened d x d matrices.
    """
    k, d = means.shape
    if cov.shape != (k, d, d):
        raise ShapeError(f"cov must be [K, d, d] = {(k, d, d)}, got {tuple(cov.shape)}")
    chol = torch.linalg.cholesky(cov)
    prec = torch.cholesky_inverse(chol)
    prec = 0.5 * (prec + prec.transpose(1, 2))
    trace = cov.reshape(k, d * d) @ prec.reshape(k, d * d).T  # tr(P_y' S_y), both symmetric
    outer = (means[:, :, None] * means[:, None, :]).reshape(k, d * d)
    pm = torch.einsum("kij,kj->ki", prec, means)  # P_y' mu_y'
    quad_self = (pm * means).sum(dim=1)  # mu_y'^T P_y' mu_y'
    maha = outer @ prec.reshape(k, d * d).T - 2.0 * (means @ pm.T) + quad_self[None, :]
    logdet = 2.0 * torch.diagonal(chol, dim1=1, dim2=2).log().sum(dim=1)
    kl = 0.5 * (trace + maha - d + logdet[None, :] - logdet[:, None])
    return zero_diagonal(kl).clamp_min(0.0)


def pairwise_kl(means: Tensor, scale: Tensor) -> Tensor:
    """Dispatch on the covariance parameter: ``var`` [K, d] or ``cov`` [K, d, d]."""
    return pairwise_kl_diag(means, scale) if scale.ndim == 2 else pairwise_kl_full(means, scale)
