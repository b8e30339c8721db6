"""The benchmarks' peer: normflows' Glow with class-conditional diagonal gaussians.

``peer_glow`` builds it at the parameter count of one of the project's flows;
``class_log_probs`` scores every class in one pass of the flow (NF-Acc); ``bits_per_dim`` is
its NLL in the project's units. Used by ``train_throughput.py --peer`` (images/s) and
``cifar10_cpu.py --methods ...,normflows-glow`` (NF-Acc at equal
budget). Needs the ``bench`` extra
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

NAME = "normflows-glow"


def peer_glow(
    target_params: int, spec: Any, in_shape: tuple[int, int, int], k: int, seed: int = 0
) -> tuple[Any, int, int]:
    """normflows' Glow (``GlowBlock``: affine coupling with a sigmoid scale, LU 1x1 conv,
    ActNorm; ``MultiscaleFlow`` with class-conditional diagonal gaussians, learned by gradient
    descent with the flow) with the levels and steps of ``spec`` and the hidden width whose flow
    parameter count (base distributions excluded, as the project's prior is not a flow
    parameter) is nearest ``target_params``. Returns ``(model, width, flow parameters)``; the
    model's weights are drawn under ``torch.manual_seed(seed)``."""
    import normflows as nf

    levels, steps = spec.levels, spec.steps[0]
    c, h, w = in_shape

    def build(hidden: int):
        q0, merges, flows = [], [], []
        for i in range(levels):
            block = [
                nf.flows.GlowBlock(c * 2 ** (levels + 1 - i), hidden, split_mode="channel")
                for _ in range(steps)
            ]
            flows.append([*block, nf.flows.Squeeze()])
            if i > 0:
                merges.append(nf.flows.Merge())
                s = 2 ** (levels - i)
                latent = (c * s, h // s, w // s)
            else:
                s = 2**levels
                latent = (c * 2 * s, h // s, w // s)
            q0.append(nf.distributions.ClassCondDiagGaussian(latent, k))
        return nf.MultiscaleFlow(q0, flows, merges, class_cond=True)

    def flow_params(model) -> int:
        return sum(p.numel() for p in model.flows.parameters())

    lo, hi = 1, 2048  # flow_params grows with the width: bisect, then take the nearer side
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if flow_params(build(mid)) <= target_params else (lo, mid)
    best = min((lo, hi), key=lambda wd: abs(flow_params(build(wd)) - target_params))
    torch.manual_seed(seed)
    model = build(best)
    return model, best, flow_params(model)


def class_log_probs(model: Any, x: torch.Tensor) -> torch.Tensor:
    """``log p(x | y)`` for every class ``y``, ``(B, K)``, from one pass of the flow
    (``MultiscaleFlow.log_prob`` runs it once per class): the latents of every level are scored
    under each class's gaussian, the log-determinant is shared."""
    num_classes = model.q0[0].num_classes
    log_det_total = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    per_level = []
    z = x
    for i in range(len(model.q0) - 1, -1, -1):
        for j in range(len(model.flows[i]) - 1, -1, -1):
            z, log_det = model.flows[i][j].inverse(z)
            log_det_total = log_det_total + log_det
        if i > 0:
            (z, z_), log_det = model.merges[i - 1].inverse(z)
            log_det_total = log_det_total + log_det
        else:
            z_ = z
        per_level.append((model.q0[i], z_))
    scores = []
    for y in range(num_classes):
        label = torch.full((len(x),), y, dtype=torch.long, device=x.device)
        scores.append(sum(q.log_prob(zl, label) for q, zl in per_level))
    return torch.stack(scores, 1) + log_det_total[:, None]


def bits_per_dim(log_p: torch.Tensor, d: int, offset: float) -> torch.Tensor:
    """bits/dim of dequantised images from the continuous ``log p(x)`` (nats) and the
    dequantisation offset (:func:`nfpi.data.dequantization_offset`)."""
    return (-log_p + offset) / (d * math.log(2))
