"""The release's attention layers: self-attention over pixels at the end of every coupling net.

The authors' release (github.com/vic-ene/NFPI, ``models/flows.py``: ``ConvBlock`` with
``use_attention_after``) appends one attention block to the conditioning network of every
coupling when the config says ``use_attention_after=1`` (its README: the ImageNet-32-pretrained,
CIFAR-fine-tuned checkpoints "use attention", about 94.60 / 73.79 NF-Acc). The block is
guided-diffusion's ``AttentionBlock`` as copied into the release
(``models/torchcfm_attention/torchcfm_attention.py``), applied to the net's *output* (the
coupling parameters, after the zero-initialised output convolution), with 6 heads:

.. math:: h \\leftarrow h + P\\,\\mathrm{MHA}(Q, K, V),\\qquad (Q, K, V) = W\\,\\mathrm{GN}(h) + b

* ``GN``: ``GroupNorm(C, C)`` (each channel standardised over the pixels of its own image, with
  a learned scale and shift; the release's ``normalization(channels)``);
* ``W, b``: a 1x1 projection to 3C; heads split *before* q/k/v (the release's
  ``QKVAttentionLegacy``: channel ``i`` of the projection is head ``i // (3C/heads)``, then q, k,
  v blocks of ``C/heads`` channels each); softmax of ``q.k / sqrt(C/heads)`` over the pixels;
* ``P``: a zero-initialised 1x1 projection (so the block starts as the identity, and with the
  zero output convolution every coupling still starts as the identity map).

Invertibility and the log-determinant are unchanged: the net (attention included) sees only the
untouched half ``x1``, so the coupling's Jacobian stays block-triangular; attention mixes pixels
of one image, never images of a batch.

Differences from the release, none of which changes the function computed: the block works on
the NHWC view of the net output (no copy); the 1x1 projections are stored as ``[out, in]``
matrices (the release's ``Conv1d`` weights are ``[out, in, 1]``); the normalisation computes in
the input's dtype when that is float32 or float64 (the release always casts to float32) and in
float32 for half types; the release recomputes the block in backward (gradient checkpointing, a
memory saving) where we use ``F.scaled_dot_product_attention`` (fused kernels on GPU, no stored
attention matrix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfpi.errors import ConfigError
from nfpi.flows.base import check_image, register_layer
from nfpi.flows.coupling import AffineCoupling, MatrixExpCoupling

__all__ = [
    "RELEASED_HEADS",
    "AttentionAffineCoupling",
    "AttentionMatrixExpCoupling",
    "PixelAttention",
    "check_heads",
]

#: The release's head count (``ConvBlock``: ``num_heads = 6``).
RELEASED_HEADS = 6
_GN_EPS = 1e-5  # torch.nn.GroupNorm's default, as in the release


def check_heads(channels: int, heads: int, where: str = "") -> None:
    """Raise :class:`ConfigError` (field ``attention_heads``) unless ``heads`` divides
    ``channels``, naming the head counts that would."""
    if heads < 1 or channels % heads:
        fits = [h for h in range(1, min(channels, 12) + 1) if channels % h == 0]
        raise ConfigError(
            "attention_heads",
            heads,
            f"a divisor of the {channels} channels the attention sees{where} (e.g. one of {fits})",
        )


class PixelAttention(nn.Module):
    """The release's ``AttentionBlock`` on a [B, C, H, W] tensor (any memory format; fastest
    channels_last, the coupling nets' format): residual multi-head self-attention over the
    H*W pixels of each image. Starts as the identity (zero output projection).

    Example::

        >>> block = PixelAttention(42, heads=6)
        >>> block(torch.randn(2, 42, 16, 16)).shape
        torch.Size([2, 42, 16, 16])
    """

    def __init__(
        self, channels: int, heads: int = RELEASED_HEADS, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        check_heads(channels, heads)
        self.channels, self.heads = int(channels), int(heads)
        self.norm_weight = nn.Parameter(torch.ones(channels))
        self.norm_bias = nn.Parameter(torch.zeros(channels))
        # nn.Conv1d's default initialisation (kaiming uniform, a = sqrt(5); bias U(+-1/sqrt(C))),
        # drawn from the flow's generator so that a seed gives the same weights everywhere.
        bound = 1.0 / math.sqrt(channels)
        self.qkv_weight = nn.Parameter(
            torch.empty(3 * channels, channels).uniform_(-bound, bound, generator=generator)
        )
        self.qkv_bias = nn.Parameter(
            torch.empty(3 * channels).uniform_(-bound, bound, generator=generator)
        )
        self.proj_weight = nn.Parameter(torch.zeros(channels, channels))
        self.proj_bias = nn.Parameter(torch.zeros(channels))

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}"

    def forward(self, h: Tensor) -> Tensor:
        check_image(h, None, "PixelAttention", channels=self.channels)
        b, c, height, width = h.shape
        t = h.permute(0, 2, 3, 1).reshape(b, height * width, c)  # a view for channels_last
        # GroupNorm(C, C): per image and channel over the pixels (biased variance).
        x = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
        x = (x - mean) * torch.rsqrt(var + _GN_EPS) * self.norm_weight + self.norm_bias
        qkv = F.linear(x.to(t.dtype), self.qkv_weight, self.qkv_bias)
        # Legacy order: [heads][q, k, v][C / heads] along the projection's channels.
        qkv = qkv.view(b, height * width, self.heads, 3, c // self.heads).permute(3, 0, 2, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, heads, T, C/heads]
        a = a.transpose(1, 2).reshape(b, height * width, c)  # channel = head * C/heads + i
        out = t + F.linear(a, self.proj_weight, self.proj_bias)
        return out.view(b, height, width, c).permute(0, 3, 1, 2)


class _AttentionNetMixin:
    """A coupling whose net output passes through :class:`PixelAttention` (module
    ``attention``) before it parameterises the transform."""

    in_shape: tuple[int, ...]
    c1: int
    net: nn.Module
    attention: PixelAttention

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        hidden: int = 128,
        blocks: int = 1,
        heads: int = RELEASED_HEADS,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(in_shape, hidden=hidden, blocks=blocks, generator=generator)
        self._setup_attention(heads, generator)

    def _setup_attention(self, heads: int, generator: torch.Generator | None) -> None:
        channels = self.net.out_bias.numel()
        check_heads(channels, heads, f" in {type(self).__name__}{self.in_shape}")
        self.attention = PixelAttention(channels, heads, generator)

    def _net_nhwc(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        xh = x.permute(0, 2, 3, 1)
        h = self.attention(self.net(x[:, : self.c1])).permute(0, 2, 3, 1)
        return xh[..., : self.c1], xh[..., self.c1 :], h


@register_layer("matrixexp_coupling_attention")
class AttentionMatrixExpCoupling(_AttentionNetMixin, MatrixExpCoupling):
    """:class:`~nfpi.flows.coupling.MatrixExpCoupling` with the release's attention after its
    net (``flow.attention=true`` with ``coupling=matrixexp``; preset ``mef-cifar-attn``).

    Example::

        >>> layer = AttentionMatrixExpCoupling((4, 8, 8), hidden=16, blocks=1, heads=2)
        >>> y, logdet = layer(torch.randn(2, 4, 8, 8))
    """


@register_layer("affine_coupling_attention")
class AttentionAffineCoupling(_AttentionNetMixin, AffineCoupling):
    """:class:`~nfpi.flows.coupling.AffineCoupling` with the release's attention after its net
    (``flow.attention=true`` with ``coupling=affine``).

    Example::

        >>> layer = AttentionAffineCoupling((4, 8, 8), hidden=16, blocks=1, heads=2)
        >>> y, logdet = layer(torch.randn(2, 4, 8, 8))
    """
