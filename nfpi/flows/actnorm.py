"""Activation normalisation (Glow, Kingma & Dhariwal 2018), per channel or per element."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from nfpi.errors import ConfigError, ShapeError
from nfpi.flows.base import DataInitModule, InvertibleLayer, check_image, register_layer

__all__ = ["ActNorm"]

_EPS = 1e-6


@register_layer("actnorm")
class ActNorm(DataInitModule, InvertibleLayer):
    r"""Affine map with data-dependent initialisation.

    .. math:: y = x \odot e^{\log s} + b, \qquad \log|\det J| = \textstyle\sum \log s
              \;(\times H W \text{ per channel})

    Args:
        in_shape: (C, H, W) of the input.
        mode: ``"channel"``: one scale/shift per channel (Glow);
            ``"element"``: one per element of (C, H, W) (the MEF reference).

    Before :func:`~nfpi.flows.base.data_init` the layer is the identity; data_init sets
    ``b``, ``log s`` so that the output of the init batch has zero mean and unit (unbiased)
    standard deviation per channel (over batch and pixels) or per element (over the batch).

    Example::

        >>> layer = ActNorm((3, 4, 4), mode="channel")
        >>> layer.data_init(torch.randn(16, 3, 4, 4) * 5 + 2)
        >>> y, logdet = layer(torch.randn(2, 3, 4, 4))
    """

    def __init__(
        self, in_shape: tuple[int, int, int], mode: Literal["channel", "element"] = "channel"
    ) -> None:
        super().__init__()
        if mode not in ("channel", "element"):
            raise ConfigError("actnorm", mode, "one of 'channel', 'element'")
        self.in_shape = tuple(int(s) for s in in_shape)
        self.mode = mode
        c, h, w = self.in_shape
        pshape = (c, 1, 1) if mode == "channel" else (c, h, w)
        # Repeated per pixel in the log-det when the parameters are shared over pixels.
        self._pixels = h * w if mode == "channel" else 1
        self.log_scale = nn.Parameter(torch.zeros(pshape))
        self.shift = nn.Parameter(torch.zeros(pshape))
        self._setup_data_init()

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, mode={self.mode!r}"

    def _init_from_batch(self, x: Tensor) -> None:
        dims = (0, 2, 3) if self.mode == "channel" else (0,)
        n = x.numel() // (self.log_scale.numel())
        if n < 2:
            raise ShapeError(
                f"ActNorm(mode={self.mode!r}) data_init needs at least 2 values per statistic, "
                f"got a batch of shape {tuple(x.shape)}; use a larger init batch"
            )
        std, mean = torch.std_mean(x, dim=dims, keepdim=True)
        inv = 1.0 / (std[0] + _EPS)
        self.log_scale.copy_(inv.log())
        self.shift.copy_(-mean[0] * inv)

    def _logdet(self, x: Tensor) -> Tensor:
        return (self.log_scale.sum() * self._pixels).expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_image(x, self.in_shape, "ActNorm.forward")
        self._maybe_data_init(x)
        y = torch.addcmul(self.shift, x, self.log_scale.exp())
        return y, self._logdet(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_image(y, self.in_shape, "ActNorm.inverse")
        x = (y - self.shift) * torch.exp(-self.log_scale)
        return x, -self._logdet(y)
