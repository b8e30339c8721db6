"""Invertible 1x1 convolutions: a learned c x c channel mixing applied at every pixel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfpi.flows.base import InvertibleLayer, check_image, register_layer
from nfpi.flows.expm import expm

__all__ = ["InvConv1x1Exp", "InvConv1x1LU", "random_rotation", "rotation_log"]


def random_rotation(c: int, generator: torch.Generator | None = None) -> Tensor:
    """A Haar-random rotation (orthogonal, det +1) of size c x c, float64."""
    a = torch.randn(c, c, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    # Sign fix makes Q Haar-distributed; the column flip makes det(Q) = +1 so a real log exists.
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def rotation_log(q: Tensor) -> Tensor:
    """Principal matrix logarithm of a rotation ``q`` (float64): a skew-symmetric ``w`` with
    ``matrix_exp(w) == q`` and eigenvalues in (-i pi, i pi]."""
    # A generic rotation is diagonalisable with eigenvalues on the unit circle, so log acts on
    # the eigenvalues; the skew-symmetric projection removes round-off.
    evals, evecs = torch.linalg.eig(q)
    w = (evecs @ torch.diag_embed(torch.log(evals)) @ torch.linalg.inv(evecs)).real
    return 0.5 * (w - w.T)


@register_layer("conv1x1_lu")
class InvConv1x1LU(InvertibleLayer):
    r"""Glow's LU-parametrised 1x1 convolution.

    .. math:: W = P\,(L + I)\,(U + \operatorname{diag}(\sigma \odot e^{\log|s|})),\qquad
              \log|\det J| = H W \textstyle\sum \log|s|

    ``P`` (permutation) and ``sigma`` (signs of the diagonal) are fixed buffers; ``L`` is
    strictly lower, ``U`` strictly upper triangular, ``log|s|`` a free vector. Initialised at the
    LU factors of a random rotation drawn from ``generator``.

    Example::

        >>> layer = InvConv1x1LU(4)
        >>> y, logdet = layer(torch.randn(2, 4, 3, 3))
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.channels = int(channels)
        q = random_rotation(self.channels, generator)
        p, low, up = torch.linalg.lu(q)
        s = torch.diagonal(up)
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", p.to(dtype))
        self.register_buffer("sign_s", torch.sign(s).to(dtype))
        self.lower = nn.Parameter(torch.tril(low, -1).to(dtype))
        self.upper = nn.Parameter(torch.triu(up, 1).to(dtype))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).to(dtype))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def weight(self) -> Tensor:
        """The c x c mixing matrix W."""
        eye = torch.eye(self.channels, dtype=self.lower.dtype, device=self.lower.device)
        low = torch.tril(self.lower, -1) + eye
        up = torch.triu(self.upper, 1) + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ low @ up

    def _logdet(self, x: Tensor) -> Tensor:
        return (self.log_s.sum() * (x.shape[2] * x.shape[3])).expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_image(x, None, "InvConv1x1LU.forward", self.channels)
        w = self.weight()
        return F.conv2d(x, w[:, :, None, None]), self._logdet(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_image(y, None, "InvConv1x1LU.inverse", self.channels)
        w_inv = torch.linalg.inv(self.weight())
        return F.conv2d(y, w_inv[:, :, None, None]), -self._logdet(y)


@register_layer("conv1x1_exp")
class InvConv1x1Exp(InvertibleLayer):
    r"""Matrix-exponential 1x1 convolution (Xiao & Liu 2020).

    .. math:: W = e^{A},\qquad \log|\det J| = H W \operatorname{tr} A,\qquad W^{-1} = e^{-A}

    ``A`` is a free c x c parameter, initialised at the principal log of a random rotation
    drawn from ``generator`` (so W starts orthogonal and the log-det at 0).

    Example::

        >>> layer = InvConv1x1Exp(4)
        >>> y, logdet = layer(torch.randn(2, 4, 3, 3))
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.channels = int(channels)
        w = rotation_log(random_rotation(self.channels, generator))
        self.log_weight = nn.Parameter(w.to(torch.get_default_dtype()))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def _logdet(self, x: Tensor) -> Tensor:
        return (torch.trace(self.log_weight) * (x.shape[2] * x.shape[3])).expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_image(x, None, "InvConv1x1Exp.forward", self.channels)
        w = expm(self.log_weight)
        return F.conv2d(x, w[:, :, None, None]), self._logdet(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_image(y, None, "InvConv1x1Exp.inverse", self.channels)
        w_inv = expm(-self.log_weight)
        return F.conv2d(y, w_inv[:, :, None, None]), -self._logdet(y)
