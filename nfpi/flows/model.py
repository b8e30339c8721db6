"""Glow's multi-scale skeleton, its validated spec and the named presets.

A level is ``Squeeze -> steps x (ActNorm -> invertible 1x1 conv -> coupling) -> Split`` (the last
level ends in ``Flatten`` instead). Every split-off half is kept, so the latent is the full
``d = C H W`` vector on which the class gaussians live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from nfpi.errors import ConfigError, ShapeError
from nfpi.flows.actnorm import ActNorm
from nfpi.flows.attention import AttentionAffineCoupling, AttentionMatrixExpCoupling
from nfpi.flows.base import Compose, InvertibleLayer, check_image, data_init, register_layer
from nfpi.flows.conv1x1 import InvConv1x1Exp, InvConv1x1LU
from nfpi.flows.coupling import AffineCoupling, MatrixExpCoupling
from nfpi.flows.reshape import Flatten, Split, Squeeze
from nfpi.schema import Config, check

__all__ = ["PRESETS", "FlowModel", "FlowSpec", "build_flow"]

CouplingKind = Literal["affine", "matrixexp"]
Conv1x1Kind = Literal["lu", "matrixexp"]
ActNormKind = Literal["channel", "element"]


def _per_level(
    name: str, value: int | tuple[int, ...], levels: int, minimum: int
) -> tuple[int, ...]:
    vals = (value,) * levels if isinstance(value, int) else tuple(value)
    check(
        len(vals) == levels,
        name,
        value,
        f"an int or a sequence of {levels} ints, one per level (levels={levels})",
    )
    check(all(v >= minimum for v in vals), name, value, f"ints >= {minimum}")
    return vals


@dataclass(frozen=True)
class FlowSpec(Config):
    """Architecture of a :class:`FlowModel`. Frozen; validated at construction.

    Attributes:
        levels: number of squeeze levels (input H and W must be divisible by 2**levels).
        steps: flow steps per level (an int is used for every level).
        blocks: residual blocks of each coupling net, per level (int: every level).
        hidden: hidden width of the coupling nets.
        coupling: ``"affine"`` (Glow) or ``"matrixexp"`` (MEF).
        conv1x1: ``"lu"`` (Glow) or ``"matrixexp"`` (MEF).
        actnorm: ``"channel"`` (Glow) or ``"element"`` (MEF).
        seed: seed of the generator that draws every initial weight.
        attention: the release's attention layers: self-attention over the pixels at the end of
            every coupling net (:mod:`nfpi.flows.attention`; the release's
            ``use_attention_after``).
        attention_heads: heads of that attention (the release: 6); must divide the channels of
            every coupling net's output (``c (c + 1)`` for matrixexp, ``2 c`` for affine, c = the
            transformed half's channels).
    """

    levels: int
    steps: tuple[int, ...] | int
    blocks: tuple[int, ...] | int
    hidden: int
    coupling: CouplingKind = "matrixexp"
    conv1x1: Conv1x1Kind = "matrixexp"
    actnorm: ActNormKind = "element"
    seed: int = 0
    attention: bool = False
    attention_heads: int = 6

    def validate(self) -> None:
        check(self.levels >= 1, "levels", self.levels, "an int >= 1")
        object.__setattr__(self, "steps", _per_level("steps", self.steps, self.levels, 1))
        object.__setattr__(self, "blocks", _per_level("blocks", self.blocks, self.levels, 0))
        check(self.hidden >= 1, "hidden", self.hidden, "an int >= 1")
        check(self.attention_heads >= 1, "attention_heads", self.attention_heads, "an int >= 1")


# MEF on Glow's skeleton as used by the paper (method notes section 7); 42.9 M parameters on
# 3x32x32 like the reference implementation.
_MEF_CIFAR = FlowSpec(
    levels=3,
    steps=8,
    blocks=(8, 4, 2),
    hidden=128,
    coupling="matrixexp",
    conv1x1="matrixexp",
    actnorm="element",
)

PRESETS: dict[str, FlowSpec] = {
    "mef-cifar": _MEF_CIFAR,
    # A smaller, faster Glow.
    "glow-small": FlowSpec(
        levels=3, steps=4, blocks=1, hidden=128, coupling="affine", conv1x1="lu", actnorm="channel"
    ),
    # mef-cifar with the release's attention layers (nfpi.flows.attention): the flow of its
    # ImageNet-32-pretrained, CIFAR-fine-tuned checkpoints (its README: ++use_attention_after=1).
    "mef-cifar-attn": _MEF_CIFAR.replace(attention=True, attention_heads=6),
    # Tests, scikit-learn digits (1x8x8) and quick runs: the MEF layer types at toy size.
    "tiny": FlowSpec(
        levels=2,
        steps=2,
        blocks=1,
        hidden=16,
        coupling="matrixexp",
        conv1x1="matrixexp",
        actnorm="element",
    ),
    # tiny with attention (2 heads: they divide the nets' 6 and 20 output channels on 1x8x8
    # and 42 and 156 on 3-channel images).
    "tiny-attn": FlowSpec(
        levels=2,
        steps=2,
        blocks=1,
        hidden=16,
        coupling="matrixexp",
        conv1x1="matrixexp",
        actnorm="element",
        attention=True,
        attention_heads=2,
    ),
}


def _check_in_shape(spec: FlowSpec, in_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(in_shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in in_shape):
        raise ShapeError(f"in_shape must be (C, H, W) with positive ints, got {in_shape!r}")
    c, h, w = in_shape
    k = 2**spec.levels
    if h % k or w % k:
        fits = 0
        while h % 2 ** (fits + 1) == 0 and w % 2 ** (fits + 1) == 0:
            fits += 1
        raise ShapeError(
            f"in_shape {tuple(in_shape)} does not fit flow {name!r}: its {spec.levels} levels "
            f"halve H and W {spec.levels} times, so both must be divisible by {k}. Use an input "
            f"of size e.g. ({c}, {math.ceil(h / k) * k}, {math.ceil(w / k) * k}) (pad/crop), or "
            + (f"levels={fits} (steps/blocks with {fits} entries)." if fits else "a larger input.")
        )
    return c, h, w


@register_layer("flow")
class FlowModel(InvertibleLayer):
    """Multi-scale normalizing flow: images [B, C, H, W] <-> latents [B, d], d = C H W.

    ``forward(x) -> (z, logdet)`` (data -> latent, ``logdet = log|det dz/dx|``, shape (B,)),
    ``inverse(z) -> (x, logdet)``. The latent is the concatenation of the split-off halves,
    level by level, then the last level's output, each flattened in (C, H, W) order; their
    shapes are ``latent_layout``.

    Build it with :func:`build_flow`; call :meth:`data_init` once on a fresh model.
    ``invertible_backward = True`` makes training passes keep no activations: backward rebuilds
    them from the layers' outputs (:mod:`nfpi.flows.reversible`; memory flat in depth, about
    one extra forward pass per step), each coupling in pieces of ``rebuild_chunk`` samples.

    Example::

        >>> flow = build_flow("tiny", in_shape=(1, 8, 8))
        >>> flow.data_init(torch.randn(32, 1, 8, 8))
        >>> z, logdet = flow(torch.randn(4, 1, 8, 8))    # z: [4, 64]
        >>> x, _ = flow.inverse(z)
    """

    def __init__(
        self, spec: FlowSpec, in_shape: tuple[int, int, int], name: str = "custom"
    ) -> None:
        super().__init__()
        self.spec = spec
        self.name = name
        self.in_shape = _check_in_shape(spec, tuple(in_shape), name)
        self.latent_dim = self.in_shape[0] * self.in_shape[1] * self.in_shape[2]
        gen = torch.Generator().manual_seed(spec.seed)
        layout: list[tuple[int, int, int]] = []
        self.flow = self._level(0, self.in_shape, gen, layout)
        self.latent_layout = tuple(layout)
        # Training option (not architecture): rebuild activations in backward from the layers'
        # outputs instead of keeping them (nfpi.flows.reversible); same values and gradients.
        self.invertible_backward = False
        # Its backward rebuilds each coupling in pieces of at most this many samples (None:
        # the whole batch): the transient of a coupling's rebuild shrinks with it.
        self.rebuild_chunk: int | None = 16

    def _level(
        self,
        i: int,
        shape: tuple[int, int, int],
        gen: torch.Generator,
        layout: list[tuple[int, int, int]],
    ) -> InvertibleLayer:
        s = self.spec
        c, h, w = shape
        shape = (4 * c, h // 2, w // 2)
        conv = InvConv1x1Exp if s.conv1x1 == "matrixexp" else InvConv1x1LU
        coupling: Any = MatrixExpCoupling if s.coupling == "matrixexp" else AffineCoupling
        extra: dict[str, Any] = {}
        if s.attention:
            coupling = (
                AttentionMatrixExpCoupling if s.coupling == "matrixexp" else AttentionAffineCoupling
            )
            extra["heads"] = s.attention_heads
        layers: list[InvertibleLayer] = [Squeeze()]
        for _ in range(s.steps[i]):
            layers.append(
                Compose(
                    [
                        ActNorm(shape, mode=s.actnorm),
                        conv(shape[0], generator=gen),
                        coupling(
                            shape, hidden=s.hidden, blocks=s.blocks[i], generator=gen, **extra
                        ),
                    ]
                )
            )
        if i == s.levels - 1:
            layout.append(shape)
            layers.append(Flatten(shape))
        else:
            keep = shape[0] - shape[0] // 2
            layout.append((shape[0] // 2, shape[1], shape[2]))
            inner = self._level(i + 1, (keep, shape[1], shape[2]), gen, layout)
            layers.append(Split(shape, inner))
        return Compose(layers)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, in_shape={self.in_shape}, latent_dim={self.latent_dim}"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, H, W] -> (z [B, d], log|det dz/dx| [B])."""
        check_image(x, self.in_shape, f"FlowModel {self.name!r}")
        if self.invertible_backward and torch.is_grad_enabled():
            from nfpi.flows.reversible import invertible_forward  # imports the layers' modules

            return invertible_forward(self.flow, x, self.rebuild_chunk)
        return self.flow(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, d] -> (x [B, C, H, W], log|det dx/dz| [B])."""
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ShapeError(
                f"FlowModel {self.name!r} inverse expects latents [B, {self.latent_dim}], "
                f"got {tuple(z.shape)}"
            )
        return self.flow.inverse(z)

    def data_init(self, x: Tensor) -> None:
        """Data-dependent initialisation from batch ``x`` [B, C, H, W] (B >= 2; a few hundred
        images is typical). Raises :class:`~nfpi.flows.base.DataInitError` if called twice or
        after loading a checkpoint."""
        check_image(x, self.in_shape, f"FlowModel {self.name!r} data_init")
        if x.shape[0] < 2:
            raise ShapeError(
                f"data_init needs a batch of at least 2 images for its statistics, got "
                f"{tuple(x.shape)}; a few hundred images is typical"
            )
        data_init(self.flow, x)


def build_flow(
    preset: str, in_shape: tuple[int, int, int] = (3, 32, 32), **overrides: Any
) -> FlowModel:
    """Build a :class:`FlowModel` from a named preset (``PRESETS``) and spec overrides.

    Raises:
        ConfigError: unknown preset, unknown override key, or invalid value (names the field).
        ShapeError: ``in_shape`` the architecture cannot take (says what would work).

    Example::

        >>> flow = build_flow("mef-cifar")                      # 3x32x32, 42.9 M parameters
        >>> flow = build_flow("tiny", in_shape=(1, 8, 8), hidden=32)
    """
    if preset not in PRESETS:
        raise ConfigError("preset", preset, f"one of {sorted(PRESETS)}")
    spec = PRESETS[preset].replace(**overrides) if overrides else PRESETS[preset]
    return FlowModel(spec, in_shape, name=preset)
