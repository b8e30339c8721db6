"""Volume-preserving reshapes: squeeze (space-to-depth), flatten, and the multi-scale split."""

from __future__ import annotations

import torch
from torch import Tensor

from nfpi.errors import ShapeError
from nfpi.flows.base import InvertibleLayer, check_image, register_layer

__all__ = ["Flatten", "Split", "Squeeze"]


def _zeros(x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0])


@register_layer("squeeze")
class Squeeze(InvertibleLayer):
    """Space-to-depth by 2: [B, C, H, W] -> [B, 4C, H/2, W/2], log-det 0.

    Output channel ``4 c + 2 i + j`` holds input pixel ``(2 h + i, 2 w + j)`` of channel ``c``
    (Glow's ordering). The output is laid out channels_last (one copy, which the reshape needs
    anyway), the layout the coupling nets run fastest in.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_image(x, None, "Squeeze.forward")
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ShapeError(f"Squeeze needs even H and W, got input shape {tuple(x.shape)}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        y = y.reshape(b, h // 2, w // 2, 4 * c).permute(0, 3, 1, 2)
        return y, _zeros(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_image(y, None, "Squeeze.inverse")
        b, c4, h, w = y.shape
        if c4 % 4:
            raise ShapeError(
                f"Squeeze.inverse needs channels divisible by 4, got shape {tuple(y.shape)}"
            )
        x = (
            y.reshape(b, c4 // 4, 2, 2, h, w)
            .permute(0, 1, 4, 2, 5, 3)
            .reshape(b, c4 // 4, 2 * h, 2 * w)
        )
        return x, _zeros(y)


@register_layer("flatten")
class Flatten(InvertibleLayer):
    """[B, C, H, W] -> [B, C*H*W] in (C, H, W) order, log-det 0."""

    def __init__(self, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_image(x, self.in_shape, "Flatten.forward")
        return x.reshape(x.shape[0], -1), _zeros(x)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        d = self.in_shape[0] * self.in_shape[1] * self.in_shape[2]
        if y.ndim != 2 or y.shape[1] != d:
            raise ShapeError(f"Flatten.inverse expects [B, {d}], got {tuple(y.shape)}")
        return y.reshape(y.shape[0], *self.in_shape), _zeros(y)


@register_layer("split")
class Split(InvertibleLayer):
    r"""Multi-scale split: half of the channels leave the flow, the rest go on through ``inner``.

    With ``x = (x_1, x_2)`` split along channels (``x_1`` the first ``C - C // 2``):

    .. math:: \mathrm{Split}(x) = \big(\operatorname{vec}(x_2),\; \mathrm{inner}(x_1)\big),
              \qquad \log|\det J| = \log|\det J_{\mathrm{inner}}(x_1)|

    [B, C, H, W] -> [B, C*H*W]. ``inner`` maps [B, C - C // 2, H, W] to a flat
    [B, (C - C // 2) H W] (e.g. the next level, ending in :class:`Flatten` or another
    :class:`Split`); ``None`` means flatten ``x_1``. Nesting splits gives Glow's multi-scale
    latent ``z = (z_level1, z_level2, ..., z_last)``, all kept: the full d = C H W vector.
    """

    def __init__(
        self, in_shape: tuple[int, int, int], inner: InvertibleLayer | None = None
    ) -> None:
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        c, h, w = self.in_shape
        if c < 2:
            raise ShapeError(f"Split needs at least 2 channels, got in_shape {self.in_shape}")
        self.keep = c - c // 2
        self.n_out = (c // 2) * h * w
        self.inner = inner

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, keep={self.keep}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_image(x, self.in_shape, "Split.forward")
        b = x.shape[0]
        x1 = x[:, : self.keep]
        if self.inner is None:
            z1, logdet = x1.reshape(b, -1), _zeros(x)
        else:
            z1, logdet = self.inner(x1)
            if z1.shape != (b, x1[0].numel()):
                raise ShapeError(
                    f"Split's inner layer must return a flat [B, {x1[0].numel()}] tensor, got "
                    f"{tuple(z1.shape)}; end the inner flow with Flatten or another Split"
                )
        return torch.cat([x[:, self.keep :].reshape(b, -1), z1], dim=1), logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        c, h, w = self.in_shape
        if y.ndim != 2 or y.shape[1] != c * h * w:
            raise ShapeError(f"Split.inverse expects [B, {c * h * w}], got {tuple(y.shape)}")
        b = y.shape[0]
        x2 = y[:, : self.n_out].reshape(b, c - self.keep, h, w)
        z1 = y[:, self.n_out :]
        if self.inner is None:
            x1, logdet = z1.reshape(b, self.keep, h, w), _zeros(y)
        else:
            x1, logdet = self.inner.inverse(z1)
        return torch.cat([x1, x2], dim=1), logdet
