"""The class-conditional gaussian prior p(z | y) = N(z; mu_y, Sigma_y), one gaussian per class."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from nfpi.errors import ConfigError, LabelRangeError, NonFiniteError, ShapeError
from nfpi.prior.stats import ClassStatistics

__all__ = ["Covariance", "GaussianPrior"]

Covariance = Literal["diag", "full"]
_LOG_2PI = math.log(2.0 * math.pi)


class GaussianPrior(nn.Module):
    """K gaussians in d dimensions with diagonal (``var`` [K, d]) or full (``cov`` [K, d, d])
    covariances, stored in float64 (the precision the solvers run in).

    Densities are evaluated in the dtype of the latents passed in; the [B, K] log-density matrix
    is a handful of matrix products, never a loop over classes.

    Example:
        >>> prior = GaussianPrior(torch.zeros(3, 2), var=torch.ones(3, 2))
        >>> prior.log_prob_matrix(torch.zeros(4, 2)).shape
        torch.Size([4, 3])
    """

    means: Tensor
    var: Tensor
    cov: Tensor

    def __init__(self, means: Tensor, var: Tensor | None = None, cov: Tensor | None = None) -> None:
        super().__init__()
        if (var is None) == (cov is None):
            raise ShapeError("give exactly one of var (diagonal, [K, d]) or cov (full, [K, d, d])")
        if means.ndim != 2:
            raise ShapeError(f"means must have shape [K, d], got {tuple(means.shape)}")
        k, d = means.shape
        f64 = {"dtype": torch.float64, "device": means.device}
        self.covariance: Covariance = "diag" if cov is None else "full"
        self.register_buffer("means", means.detach().to(**f64).clone())
        if var is not None:
            if tuple(var.shape) != (k, d):
                raise ShapeError(
                    f"var must have shape {(k, d)} like the means, got {tuple(var.shape)}"
                )
            self.register_buffer("var", var.detach().to(**f64).clone())
        else:
            if tuple(cov.shape) != (k, d, d):
                raise ShapeError(f"cov must have shape {(k, d, d)}, got {tuple(cov.shape)}")
            self.register_buffer("cov", cov.detach().to(**f64).clone())
        self.validate()

    # ------------------------------------------------------------------------------ construction
    @classmethod
    def from_statistics(
        cls,
        stats: ClassStatistics,
        covariance: Covariance = "diag",
        variance_init: Literal["data", "identity"] = "data",
    ) -> GaussianPrior:
        """The data-init baseline: class means and unbiased class (co)variances.

        ``variance_init="identity"`` keeps the data means with unit variances (Table 3, #2).
        """
        means = stats.mean()
        if variance_init == "identity":
            ones = torch.ones_like(means)
            return (
                cls(means, var=ones)
                if covariance == "diag"
                else cls(means, cov=torch.diag_embed(ones))
            )
        if covariance == "diag":
            return cls(means, var=stats.var())
        return cls(means, cov=stats.cov())

    @classmethod
    def standard(cls, num_classes: int, dim: int, covariance: Covariance = "diag") -> GaussianPrior:
        """K copies of N(0, I): a neutral placeholder before the first data-init."""
        means = torch.zeros(num_classes, dim, dtype=torch.float64)
        ones = torch.ones_like(means)
        return (
            cls(means, var=ones) if covariance == "diag" else cls(means, cov=torch.diag_embed(ones))
        )

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> GaussianPrior:
        """Rebuild a prior from :meth:`state_dict` (its covariance type is read from the keys)."""
        if "cov" in state:
            return cls(state["means"], cov=state["cov"])
        return cls(state["means"], var=state["var"])

    def clone(self) -> GaussianPrior:
        return GaussianPrior.from_state_dict({k: v.clone() for k, v in self.state_dict().items()})

    @torch.no_grad()
    def copy_(self, other: GaussianPrior) -> GaussianPrior:
        """Overwrite this prior's parameters in place (same K, d and covariance type)."""
        if other.covariance != self.covariance or other.means.shape != self.means.shape:
            raise ShapeError(
                f"cannot copy a {other.covariance} prior of shape {tuple(other.means.shape)} into a "
                f"{self.covariance} prior of shape {tuple(self.means.shape)}"
            )
        self.means.copy_(other.means)
        self.scale_param.copy_(other.scale_param)
        return self

    # ---------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise if a parameter is non-finite or a covariance is not positive definite."""
        if not torch.isfinite(self.means).all():
            raise NonFiniteError("prior means contain NaN or inf")
        if self.covariance == "diag":
            if not torch.isfinite(self.var).all():
                raise NonFiniteError("prior variances contain NaN or inf")
            if not (self.var > 0).all():
                bad = (self.var <= 0).any(dim=1).nonzero().flatten().tolist()
                raise NonFiniteError(f"prior variances must be > 0; classes {bad[:10]} are not")
        else:
            if not torch.isfinite(self.cov).all():
                raise NonFiniteError("prior covariances contain NaN or inf")
            _, info = torch.linalg.cholesky_ex(self.cov)
            if (info != 0).any():
                bad = (info != 0).nonzero().flatten().tolist()
                raise NonFiniteError(
                    f"prior covariances of classes {bad[:10]} are not positive definite"
                )

    # ------------------------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def scale_param(self) -> Tensor:
        """The covariance parameter: ``var`` [K, d] or ``cov`` [K, d, d]."""
        return self.var if self.covariance == "diag" else self.cov

    def diag_var(self) -> Tensor:
        """Per-dimension variances [K, d] (the covariance diagonal for full priors)."""
        return self.var if self.covariance == "diag" else torch.diagonal(self.cov, dim1=1, dim2=2)

    def _check_z(self, z: Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ShapeError(f"latents must have shape [B, {self.dim}], got {tuple(z.shape)}")

    def _check_y(self, y: Tensor, batch: int | None = None) -> None:
        if y.ndim != 1 or (batch is not None and y.shape[0] != batch):
            raise ShapeError(
                f"labels must have shape [{batch if batch is not None else 'B'}], got {tuple(y.shape)}"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise LabelRangeError(
                f"labels must lie in [0, {self.num_classes}), got [{int(y.min())}, {int(y.max())}]"
            )

    # ------------------------------------------------------------------------------- densities
    def log_prob(self, z: Tensor, y: Tensor) -> Tensor:
        """log N(z_i; mu_{y_i}, Sigma_{y_i}) per sample: z [B, d], y [B] -> [B]."""
        self._check_z(z)
        self._check_y(y, z.shape[0])
        y = y.to(z.device)
        mu = self.means.to(z)[y]
        if self.covariance == "diag":
            var = self.var.to(z)
            diff = z - mu
            maha = (diff * diff / var[y]).sum(dim=1)
            logdet = var.log().sum(dim=1)[y]
        else:
            chol = torch.linalg.cholesky(self.cov).to(z)[y]  # [B, d, d]
            sol = torch.linalg.solve_triangular(chol, (z - mu).unsqueeze(-1), upper=False).squeeze(
                -1
            )
            maha = (sol * sol).sum(dim=1)
            logdet = 2.0 * torch.diagonal(chol, dim1=1, dim2=2).log().sum(dim=1)
        return -0.5 * (maha + logdet + self.dim * _LOG_2PI)

    def log_prob_matrix(self, z: Tensor) -> Tensor:
        """log N(z_b; mu_k, Sigma_k) for every sample and class: z [B, d] -> [B, K].

        Diagonal: ``-(z^2 @ P^T - 2 z @ (M P)^T + sum(M^2 P) + logdet + d log 2pi) / 2`` with
        precisions P = 1 / var: three matrix products, O(B K + K d) memory.
        """
        self._check_z(z)
        means = self.means.to(z)
        if self.covariance == "diag":
            prec = 1.0 / self.var.to(z)
            maha = (
                (z * z) @ prec.T - 2.0 * (z @ (means * prec).T) + (means * means * prec).sum(dim=1)
            )
            logdet = self.var.log().sum(dim=1).to(z)
        else:
            # Whitening W_k = L_k^{-1}: ||W_k (z - mu_k)||^2 for all k with one [B, d] x [d, K d] GEMM.
            chol = torch.linalg.cholesky(self.cov)
            eye = torch.eye(self.dim, dtype=chol.dtype, device=chol.device).expand_as(chol)
            white = torch.linalg.solve_triangular(chol, eye, upper=False).to(z)  # [K, d, d]
            k, d = self.num_classes, self.dim
            wz = (z @ white.reshape(k * d, d).T).reshape(-1, k, d)
            wmu = torch.einsum("kij,kj->ki", white, means)
            diff = wz - wmu
            maha = (diff * diff).sum(dim=2)
            logdet = 2.0 * torch.diagonal(chol, dim1=1, dim2=2).log().sum(dim=1).to(z)
        return -0.5 * (maha + logdet + self.dim * _LOG_2PI)

    def classify(self, z: Tensor) -> Tensor:
        """argmax_y log p(z | y) (NF-Acc's prediction): z [B, d] -> labels [B]."""
        return self.log_prob_matrix(z).argmax(dim=1)

    def sample(
        self,
        y: Tensor,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """z ~ N(mu_y, (T sigma_y)^2) for each label in ``y`` [B] -> [B, d] of ``dtype``."""
        self._check_y(y)
        if temperature < 0:
            raise ConfigError("temperature", temperature, "a temperature >= 0")
        y = y.to(self.means.device)
        eps = torch.randn(
            y.shape[0], self.dim, generator=generator, dtype=torch.float64, device=self.means.device
        )
        if self.covariance == "diag":
            z = self.means[y] + temperature * self.var[y].sqrt() * eps
        else:
            chol = torch.linalg.cholesky(self.cov)[y]
            z = self.means[y] + temperature * (chol @ eps.unsqueeze(-1)).squeeze(-1)
        return z.to(dtype)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, covariance={self.covariance}"
