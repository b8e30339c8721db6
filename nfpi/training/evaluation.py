"""What the loop measures: per-sample NLL, class statistics of the latents, NF-Acc and bits/dim.

Every pass sums over this rank's shard and all-reduces, so a data-parallel pass gives the
numbers of a single process. Randomness (dequantisation noise, augmentation) is keyed by
(seed, sample index): the same image gets the same noise however the data is sharded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from nfpi.data import BatchAugment, dequantization_offset, dequantize
from nfpi.data.sharding import per_sample_uniform
from nfpi.errors import ConfigError
from nfpi.prior import ClassStatistics, GaussianPrior
from nfpi.training.distributed import all_reduce_, all_reduce_max_, world

__all__ = ["collect_statistics", "evaluate", "keyed_inputs", "nll_nats"]


def nll_nats(
    flow: nn.Module, prior: GaussianPrior, x: Tensor, y: Tensor, levels: int
) -> tuple[Tensor, Tensor]:
    """Per-sample discrete NLL in nats (continuous NLL + d log(levels / 2)) [B] and the latents
    [B, d], for data with ``levels`` grey levels per channel."""
    z, logdet = flow(x)
    nll = -(prior.log_prob(z, y) + logdet) + dequantization_offset(z.shape[1], levels)
    return nll, z


def keyed_inputs(
    x: Tensor,
    index: Tensor,
    seed: int,
    augment: BatchAugment | None,
    device: torch.device,
    levels: int,
) -> Tensor:
    """Dequantised (and augmented) images whose randomness is keyed by sample index: the same
    image gets the same noise however the data is sharded or batched."""
    extra = BatchAugment.NUM_UNIFORMS if augment is not None else 0
    u = per_sample_uniform(seed, index, extra + x[0].numel()).to(device)
    x = x.to(device)
    if augment is not None:
        x = augment(x, uniforms=u[:, :extra])
    return dequantize(x, noise=u[:, extra:].reshape(x.shape), levels=levels)


@torch.no_grad()
def collect_statistics(
    flow: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor, Tensor]],
    num_classes: int,
    device: torch.device,
    *,
    seed: int,
    shift: Tensor | None = None,
    full: bool = False,
    augment: BatchAugment | None = None,
    levels: int,
    nll_prior: GaussianPrior | None = None,
) -> ClassStatistics:
    """Class statistics of ``flow``'s latents over ``loader`` (``(x, y, index)`` batches of this
    rank's shard), summed over all ranks. With ``nll_prior`` they also carry the smallest and
    largest per-sample NLL under that prior (``nll_range``: the release's GD form reads it).

    The dequantisation noise and augmentation (the release computes the statistics under
    training augmentation) are drawn per sample from ``(seed, index)``, so the all-reduced
    statistics of a data-parallel pass equal those of a single process. ``shift`` ([K, d],
    identical on every rank: e.g. the current prior means) keeps the float64 sums free of
    cancellation and the buffers all-reducible.
    """
    stats: ClassStatistics | None = None
    # [-min, max] of the per-sample NLL, so that one max-reduction gives both extremes.
    extremes = torch.full((2,), -math.inf, dtype=torch.float64, device=device)
    for x, y, index in loader:
        z, logdet = flow(keyed_inputs(x, index, seed, augment, device, levels))
        if stats is None:
            stats = ClassStatistics.empty(
                num_classes, z.shape[1], shift=shift, full=full, device=device
            )
        stats.update_(z, y.to(device))
        if nll_prior is not None:
            nll = -(nll_prior.log_prob(z, y.to(device)) + logdet)
            nll = nll.double() + dequantization_offset(z.shape[1], levels)
            extremes = torch.maximum(extremes, torch.stack([-nll.min(), nll.max()]))
    if stats is None:
        raise ConfigError("data", "empty", "a non-empty dataset shard for the statistics pass")
    if world()[1] > 1:
        stats = stats.with_flat(all_reduce_(stats.flat()))
    if nll_prior is not None:
        extremes = all_reduce_max_(extremes)
        stats.nll_range = torch.stack([-extremes[0], extremes[1]])
    return stats


@torch.no_grad()
def evaluate(
    flow: nn.Module,
    prior: GaussianPrior,
    loader: Iterable[tuple[Tensor, Tensor]],
    device: torch.device,
    seed: int,
    levels: int,
) -> dict[str, float]:
    """Test bits/dim (for data of ``levels`` grey levels) and NF-Acc (argmax_y log N(z; mu_y, Sigma_y), one [B, d] x [d, K] product per
    batch) over ``loader``, summed over ranks. Dequantisation noise is seeded: every evaluation
    of a run sees the same noise."""
    gen = torch.Generator(device=device).manual_seed(seed)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll sum, correct, count
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        nll, z = nll_nats(flow, prior, dequantize(x, gen, levels=levels), y, levels)
        totals += torch.stack(
            [
                nll.double().sum(),
                (prior.classify(z) == y).double().sum(),
                torch.tensor(float(len(y)), device=device),
            ]
        )
    all_reduce_(totals)
    n = float(totals[2])
    return {
        "test_bpd": float(totals[0]) / n / (prior.dim * math.log(2)),
        "nf_acc": float(totals[1]) / n,
    }
