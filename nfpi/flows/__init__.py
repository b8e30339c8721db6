"""Invertible flows: one layer contract, a registry of layers, and Glow/MEF multi-scale models.

Every layer is an :class:`InvertibleLayer` with ``forward(x) -> (y, logdet)`` (data -> latent)
and ``inverse(y) -> (x, logdet)``, log-dets per sample of shape (B,). Build a model with
:func:`build_flow`::

    from nfpi.flows import build_flow
    flow = build_flow("mef-cifar", in_shape=(3, 32, 32))
    flow.data_init(first_batch)          # once, on a fresh model
    z, logdet = flow(x)                  # z: [B, 3072]
    x, _ = flow.inverse(z)
"""

from nfpi.flows.actnorm import ActNorm
from nfpi.flows.attention import AttentionAffineCoupling, AttentionMatrixExpCoupling, PixelAttention
from nfpi.flows.base import (
    Compose,
    DataInitError,
    DataInitModule,
    InvertibleLayer,
    data_init,
    register_layer,
    registered_layers,
)
from nfpi.flows.conv1x1 import InvConv1x1Exp, InvConv1x1LU
from nfpi.flows.coupling import (
    AffineCoupling,
    ConvNorm,
    CouplingNet,
    MatrixExpCoupling,
    ResidualBlock,
)
from nfpi.flows.expm import expm, expm_frechet
from nfpi.flows.model import PRESETS, FlowModel, FlowSpec, build_flow
from nfpi.flows.reshape import Flatten, Split, Squeeze

__all__ = [
    "PRESETS",
    "ActNorm",
    "AffineCoupling",
    "AttentionAffineCoupling",
    "AttentionMatrixExpCoupling",
    "Compose",
    "ConvNorm",
    "CouplingNet",
    "DataInitError",
    "DataInitModule",
    "Flatten",
    "FlowModel",
    "FlowSpec",
    "InvConv1x1Exp",
    "InvConv1x1LU",
    "InvertibleLayer",
    "MatrixExpCoupling",
    "PixelAttention",
    "ResidualBlock",
    "Split",
    "Squeeze",
    "build_flow",
    "data_init",
    "expm",
    "expm_frechet",
    "register_layer",
    "registered_layers",
]
