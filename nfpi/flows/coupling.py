"""Coupling layers and their conditioning network.

Channels are split into ``x1`` (the first ``C - C // 2``, passed through unchanged and fed to the
net) and ``x2`` (the last ``c = C // 2``, transformed). Every coupling starts as the identity
because the net's output convolution is zero-initialised.

The nets run in ``channels_last`` memory format (oneDNN / cuDNN run 3x3 convolutions markedly
faster in NHWC), and the coupling arithmetic works directly on the NHWC view of the net output,
so a per-pixel c x c matrix is a free view, not a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfpi.errors import ShapeError
from nfpi.flows.base import DataInitModule, InvertibleLayer, check_image, register_layer
from nfpi.flows.expm import expm

__all__ = ["AffineCoupling", "ConvNorm", "CouplingNet", "MatrixExpCoupling", "ResidualBlock"]

_EPS = 1e-6


def _scaled_conv_backward(
    grad: Tensor, x: Tensor, w: Tensor, s: Tensor, padding: int, need: tuple[bool, ...]
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (x, w, s, b) of ``conv2d(x, w * s[:, None, None, None], b, padding)``;
    ``need`` = which of them to compute."""
    need_x, need_w, need_s, need_b = need
    s4 = s[:, None, None, None]
    gx, gw_eff, gb = torch.ops.aten.convolution_backward(
        grad,
        x,
        w * s4,
        [w.shape[0]],
        [1, 1],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        1,
        [need_x, need_w or need_s, need_b],
    )
    gw = gw_eff * s4 if need_w else None
    gs = (gw_eff * w).sum(dim=(1, 2, 3)) if need_s else None
    return gx, gw, gs, gb if need_b else None


class _ScaledConv2d(torch.autograd.Function):
    """``conv2d(x, w * s[:, None, None, None], b)`` that saves only (x, w, s) for backward.

    Plain autograd would also keep the folded weight ``w * s`` alive until backward (a
    weight-sized tensor per convolution, ~0.3 GB for ``mef-cifar``); recomputing it in backward
    costs one small elementwise product. Gradients are exact:
    ``dL/dw = s * dL/dw_eff`` and ``dL/ds = sum(dL/dw_eff * w)`` over (in, kh, kw).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, s: Tensor, b: Tensor, padding: int) -> Tensor:
        ctx.padding = padding
        ctx.save_for_backward(x, w, s)
        return F.conv2d(x, w * s[:, None, None, None], b, padding=padding)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, w, s = ctx.saved_tensors
        grads = _scaled_conv_backward(grad_out, x, w, s, ctx.padding, ctx.needs_input_grad[:4])
        return (*grads, None)


class _RecomputedMiddle(torch.autograd.Function):
    """A residual block's ``conv3(elu(conv2(h1)))`` (conv-norms) that keeps only ``h1``.

    Autograd would keep ``h2 = elu(conv2(h1))`` too (conv3's input and the ELU's output): a
    third activation per block, ~0.55 GB of ``mef-cifar``'s 1.9 GB at batch 64. ``conv2`` is
    1x1, so recomputing ``h2`` in backward costs ~1/19 of the block's forward convolutions. The
    recomputation runs the same operations on the same values: gradients are unchanged.
    """

    @staticmethod
    def _h2(h1: Tensor, w2: Tensor, s2: Tensor, b2: Tensor) -> Tensor:
        return elu_(F.conv2d(h1, w2 * s2[:, None, None, None], b2))

    @staticmethod
    def forward(ctx: Any, h1: Tensor, w2, s2, b2, w3, s3, b3, padding3: int) -> Tensor:
        ctx.padding3 = padding3
        ctx.save_for_backward(h1, w2, s2, b2, w3, s3)
        h2 = _RecomputedMiddle._h2(h1, w2, s2, b2)
        return F.conv2d(h2, w3 * s3[:, None, None, None], b3, padding=padding3)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h1, w2, s2, b2, w3, s3 = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.no_grad():
            h2 = _RecomputedMiddle._h2(h1, w2, s2, b2)
            gh2, gw3, gs3, gb3 = _scaled_conv_backward(
                grad, h2, w3, s3, ctx.padding3, (True, *need[4:7])
            )
            gz2 = torch.ops.aten.elu_backward(gh2, 1.0, 1, 1.0, True, h2)
            del h2, gh2
            gh1, gw2, gs2, gb2 = _scaled_conv_backward(gz2, h1, w2, s2, 0, need[:4])
        return gh1, gw2, gs2, gb2, gw3, gs3, gb3, None


_ELU_CHUNK = 1 << 16  # floats per piece of the in-place ELU (a 256 KiB scratch buffer)


class _ELUInplace(torch.autograd.Function):
    """``elu(x + residual)`` written into ``x``, with ELU's backward from its output.

    ``F.elu`` calls ``expm1``, which this CPU build evaluates element by element without SIMD
    (~9 ms per 0.5 M floats, 20x an ``exp``: 14 % of a ``mef-cifar`` step). Here
    ``elu(x) = max(x, exp(min(x, 0)) - 1)`` (``e^x - 1 >= x``): the same value to an absolute
    round-off of one ulp of 1 (the activations are O(1)), vectorised. It runs in pieces of
    ``_ELU_CHUNK`` floats through one small scratch buffer: an activation-sized temporary per
    call would fragment the heap between the activations that autograd keeps (+50 % resident
    memory). The backward is PyTorch's ``elu_backward`` from the output, as for
    ``F.elu(..., inplace=True)``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, residual: Tensor | None) -> Tensor:
        if residual is not None:
            x.add_(residual)
        if x.is_contiguous(memory_format=torch.channels_last) and x.ndim == 4:
            flat = x.permute(0, 2, 3, 1).view(-1)
        else:
            flat = x.view(-1)  # raises for a non-dense x (none reaches here)
        buf = torch.empty(min(_ELU_CHUNK, flat.numel()), dtype=x.dtype, device=x.device)
        for piece in flat.split(_ELU_CHUNK):
            t = torch.clamp(piece, max=0.0, out=buf[: piece.numel()]).exp_().sub_(1.0)
            torch.maximum(piece, t, out=piece)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.residual = residual is not None
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        (out,) = ctx.saved_tensors
        gx = torch.ops.aten.elu_backward(grad, 1.0, 1, 1.0, True, out)
        return gx, gx if ctx.residual else None


def elu_(x: Tensor, residual: Tensor | None = None) -> Tensor:
    """In-place ``elu(x + residual)`` (``x`` must be a fresh activation nobody else reads)."""
    # CUDA's ELU is vectorised: one fused kernel. Under torch.compile the compiler fuses it and
    # plans the memory; the hand-written CPU function below would break the graph at every
    # coupling (Dynamo cannot trace ``ctx.mark_dirty``).
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        if residual is not None:
            x += residual
        return F.elu(x, inplace=True)
    return _ELUInplace.apply(x, residual)


class ConvNorm(DataInitModule):
    r"""Convolution (no bias) followed by a per-channel affine "Norm", folded into one call.

    .. math:: y = \operatorname{conv}(x, W \odot s) + b \;=\; s \odot \operatorname{conv}(x, W) + b

    Folding the per-channel scale ``s`` into the weight at call time keeps the reference's
    parameters (W, s, b) and their gradients exactly, with no extra elementwise pass over the
    activations and no stored intermediate.

    Data init (from the input batch): ``W <- W / std``, ``s <- init_scale``,
    ``b <- -mean / std * init_scale``, where mean/std are per output channel of ``conv(x, W)``:
    the output has zero mean and standard deviation ``init_scale`` (0 for the last conv of a
    residual block, which then starts as the identity).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        init_scale: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.padding = kernel_size // 2
        self.init_scale = float(init_scale)
        weight = torch.empty(out_channels, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(weight, generator=generator)
        # channels_last like the activations, so the convolution needs no weight reorder copy.
        self.weight = nn.Parameter(weight.contiguous(memory_format=torch.channels_last))
        # Before data init the output scale is already init_scale, so a residual block whose
        # last conv has init_scale 0 is the identity map even without data init.
        self.scale = nn.Parameter(torch.full((out_channels,), self.init_scale))
        self.shift = nn.Parameter(torch.zeros(out_channels))
        self._setup_data_init()

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, init_scale={self.init_scale}"

    def _init_from_batch(self, x: Tensor) -> None:
        out = F.conv2d(x, self.weight, padding=self.padding)
        std, mean = torch.std_mean(out, dim=(0, 2, 3))
        inv = 1.0 / (std + _EPS)
        self.weight.mul_(inv[:, None, None, None])
        self.scale.fill_(self.init_scale)
        self.shift.copy_(-mean * inv * self.init_scale)

    def forward(self, x: Tensor) -> Tensor:
        self._maybe_data_init(x)
        return _ScaledConv2d.apply(x, self.weight, self.scale, self.shift, self.padding)


class ResidualBlock(nn.Module):
    """``elu(x + convnorm3x3(elu(convnorm1x1(elu(convnorm3x3(x))))))``, the MEF reference block.

    The last convolution has ``init_scale = 0`` so the block starts at ``elu(x)``. ELUs run in
    place: ELU's backward needs only its output, and no convolution's backward needs its output;
    the inner 1x1 branch is recomputed in backward (:class:`_RecomputedMiddle`), so each block
    stores two activations (the first ELU's output and its own output).
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.conv1 = ConvNorm(channels, channels, 3, generator=generator)
        self.conv2 = ConvNorm(channels, channels, 1, generator=generator)
        self.conv3 = ConvNorm(channels, channels, 3, init_scale=0.0, generator=generator)

    def forward(self, x: Tensor) -> Tensor:
        h = elu_(self.conv1(x))
        c2, c3 = self.conv2, self.conv3
        if torch.is_grad_enabled() and not (c2._init_pending or c3._init_pending):
            h = _RecomputedMiddle.apply(
                h, c2.weight, c2.scale, c2.shift, c3.weight, c3.scale, c3.shift, c3.padding
            )
        else:  # inference and data init: nothing is kept anyway
            h = c3(elu_(c2(h)))
        return elu_(h, x)


class CouplingNet(nn.Module):
    """Conditioning network of a coupling: in conv 3x3 + ELU, ``blocks`` residual blocks,
    then a zero-initialised 3x3 output conv (with bias).

    Shapes: [B, in_channels, H, W] -> [B, out_channels, H, W] (channels_last memory).
    Not invertible and not a registered layer.
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        blocks: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.conv_in = ConvNorm(in_channels, hidden, 3, generator=generator)
        self.blocks = nn.ModuleList(ResidualBlock(hidden, generator) for _ in range(blocks))
        self.out_weight = nn.Parameter(
            torch.zeros(out_channels, hidden, 3, 3).contiguous(memory_format=torch.channels_last)
        )
        self.out_bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        h = elu_(self.conv_in(x.contiguous(memory_format=torch.channels_last)))
        for block in self.blocks:
            h = block(h)
        return F.conv2d(h, self.out_weight, self.out_bias, padding=1)


class _CouplingMixin:
    """Split logic shared by the couplings (a mixin, so only concrete layers are
    InvertibleLayer subclasses). Call :meth:`_setup_coupling` after ``nn.Module.__init__``."""

    in_shape: tuple[int, ...]
    c1: int
    c2: int
    net: CouplingNet

    def _setup_coupling(
        self,
        in_shape: tuple[int, int, int],
        net_out: Callable[[int], int],
        hidden: int,
        blocks: int,
        generator: torch.Generator | None,
    ) -> None:
        self.in_shape = tuple(int(s) for s in in_shape)
        channels = self.in_shape[0]
        if channels < 2:
            raise ShapeError(
                f"{type(self).__name__} needs at least 2 channels to split, got in_shape "
                f"{self.in_shape}; squeeze the input first"
            )
        self.c2 = channels // 2
        self.c1 = channels - self.c2
        self.net = CouplingNet(self.c1, hidden, net_out(self.c2), blocks, generator)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, x1={self.c1}, x2={self.c2}"

    def _net_nhwc(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(x1 NHWC view, x2 NHWC view, net output NHWC view)."""
        xh = x.permute(0, 2, 3, 1)
        h = self.net(x[:, : self.c1]).permute(0, 2, 3, 1)
        return xh[..., : self.c1], xh[..., self.c1 :], h


@register_layer("affine_coupling")
class AffineCoupling(_CouplingMixin, InvertibleLayer):
    r"""Glow's affine coupling with a sigmoid-bounded scale.

    .. math:: (t, r) = \mathrm{NN}(x_1),\quad s = \sigma(r + 2),\quad
              y_2 = s \odot x_2 + t,\quad \log|\det J| = \textstyle\sum \log s

    Example::

        >>> layer = AffineCoupling((4, 8, 8), hidden=16, blocks=1)
        >>> y, logdet = layer(torch.randn(2, 4, 8, 8))
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        hidden: int = 128,
        blocks: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self._setup_coupling(in_shape, lambda c: 2 * c, hidden, blocks, generator)

    def _params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        raw = h[..., self.c2 :] + 2.0
        return h[..., : self.c2], raw

    @staticmethod
    def _couple(params: tuple[Tensor, Tensor], x2: Tensor) -> tuple[Tensor, Tensor]:
        """(y2, log-det) from the net's (shift, raw) and x2, all NHWC."""
        shift, raw = params
        return torch.addcmul(shift, x2, torch.sigmoid(raw)), F.logsigmoid(raw).sum(dim=(1, 2, 3))

    @staticmethod
    def _uncouple(params: tuple[Tensor, Tensor], y2: Tensor) -> tuple[Tensor, Tensor]:
        """(x2, log-det of the inverse) from the net's (shift, raw) and y2, all NHWC."""
        shift, raw = params
        return (y2 - shift) / torch.sigmoid(raw), -F.logsigmoid(raw).sum(dim=(1, 2, 3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_image(x, self.in_shape, "AffineCoupling.forward")
        x1, x2, h = self._net_nhwc(x)
        y2, logdet = self._couple(self._params(h), x2)
        return torch.cat([x1, y2], dim=-1).permute(0, 3, 1, 2), logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_image(y, self.in_shape, "AffineCoupling.inverse")
        y1, y2, h = self._net_nhwc(y)
        x2, logdet = self._uncouple(self._params(h), y2)
        return torch.cat([y1, x2], dim=-1).permute(0, 3, 1, 2), logdet


@register_layer("matrixexp_coupling")
class MatrixExpCoupling(_CouplingMixin, InvertibleLayer):
    r"""Matrix-exponential coupling (MEF, Xiao & Liu 2020).

    At every pixel the net predicts a shift ``t`` (c values) and a raw c x c matrix ``R``;

    .. math:: M = \rho \tanh(\alpha R + \beta) + \gamma,\qquad y_2 = e^{M} x_2 + t,\qquad
              \log|\det J| = \textstyle\sum_{\text{pixels}} \operatorname{tr} M

    (``det e^M = e^{tr M}``), inverse ``x_2 = e^{-M}(y_2 - t)``. The learnable scalars start at
    ``alpha = 1/8``, ``rho = 1/c``, ``beta = gamma = 0`` as in the reference code. ``e^M`` is
    :func:`~nfpi.flows.expm.expm` on the batched [B, H, W, c, c] tensor (equal to
    ``torch.linalg.matrix_exp`` to round-off, with a Fréchet-derivative backward at size c; one
    host read of the batch's norm per call, not one per series term).

    Example::

        >>> layer = MatrixExpCoupling((4, 8, 8), hidden=16, blocks=1)
        >>> y, logdet = layer(torch.randn(2, 4, 8, 8))
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        hidden: int = 128,
        blocks: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self._setup_coupling(in_shape, lambda c: c * (c + 1), hidden, blocks, generator)
        self.scale = nn.Parameter(torch.full((1,), 1.0 / 8))
        self.shift = nn.Parameter(torch.zeros(1))
        self.rescale = nn.Parameter(torch.full((1,), 1.0 / self.c2))
        self.reshift = nn.Parameter(torch.zeros(1))

    def _params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Split the NHWC net output into the shift [B,H,W,c] and M [B,H,W,c,c]."""
        c = self.c2
        raw = h[..., c:].unflatten(-1, (c, c))
        m = torch.addcmul(
            self.reshift, torch.tanh(torch.addcmul(self.shift, raw, self.scale)), self.rescale
        )
        return h[..., :c], m

    @staticmethod
    def _logdet(m: Tensor) -> Tensor:
        return torch.diagonal(m, dim1=-2, dim2=-1).sum(dim=(1, 2, 3))

    def _couple(self, params: tuple[Tensor, Tensor], x2: Tensor) -> tuple[Tensor, Tensor]:
        """(y2, log-det) from the net's (shift, M) and x2, all NHWC."""
        shift, m = params
        y2 = torch.matmul(expm(m), x2.unsqueeze(-1)).squeeze(-1) + shift
        return y2, self._logdet(m)

    def _uncouple(self, params: tuple[Tensor, Tensor], y2: Tensor) -> tuple[Tensor, Tensor]:
        """(x2, log-det of the inverse) from the net's (shift, M) and y2, all NHWC."""
        shift, m = params
        x2 = torch.matmul(expm(-m), (y2 - shift).unsqueeze(-1)).squeeze(-1)
        return x2, -self._logdet(m)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_image(x, self.in_shape, "MatrixExpCoupling.forward")
        x1, x2, h = self._net_nhwc(x)
        y2, logdet = self._couple(self._params(h), x2)
        return torch.cat([x1, y2], dim=-1).permute(0, 3, 1, 2), logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_image(y, self.in_shape, "MatrixExpCoupling.inverse")
        y1, y2, h = self._net_nhwc(y)
        x2, logdet = self._uncouple(self._params(h), y2)
        return torch.cat([y1, x2], dim=-1).permute(0, 3, 1, 2), logdet
