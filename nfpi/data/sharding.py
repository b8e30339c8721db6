"""Samplers for data-parallel training and exact (unpadded) evaluation passes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from nfpi.data.loader import epoch_seed
from nfpi.errors import ConfigError

__all__ = ["EpochShardSampler", "IndexedDataset", "ShardSampler", "per_sample_uniform"]


class EpochShardSampler(Sampler[int]):
    """Shuffled training indices for one rank: a permutation drawn from ``(seed, epoch)``, dealt
    round-robin to ``world`` ranks and trimmed to equal length, so every rank runs the same
    number of batches. Epoch ``e`` is the same whether a run got there directly or resumed.
    """

    def __init__(self, size: int, *, seed: int, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ConfigError("rank", rank, f"0 <= rank < world = {world}")
        if size < world:
            raise ConfigError("dataset size", size, f">= the number of workers ({world})")
        self.size, self.seed, self.rank, self.world, self.epoch = size, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.size, generator=gen)
        return iter(perm[self.rank :: self.world][: len(self)].tolist())


class ShardSampler(Sampler[int]):
    """Every index exactly once across ranks (rank r takes r, r + world, ...), no padding: the
    statistics and evaluation sums of all ranks add up to those of one process."""

    def __init__(self, size: int, *, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ConfigError("rank", rank, f"0 <= rank < world = {world}")
        self.size, self.rank, self.world = size, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world))


class IndexedDataset(Dataset):
    """``(x, y, index)`` items of a map-style dataset of ``(x, y)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        x, y = self.dataset[index]
        return x, y, index


def per_sample_uniform(seed: int, index: Tensor, n: int) -> Tensor:
    """U[0, 1) numbers [B, n] where row b depends only on ``(seed, index[b])``.

    Randomness keyed by the sample, not by the batch: a pass over a dataset draws the same
    numbers for every image however the data is sharded across workers or batched, so the class
    statistics of a data-parallel pass equal those of one process. One small generator per
    sample (a few microseconds each), used for statistics passes, not for training.
    """
    gen = torch.Generator()
    rows = []
    for i in index.tolist():
        gen.manual_seed(epoch_seed(seed, int(i)))
        rows.append(torch.rand(n, generator=gen))
    return torch.stack(rows) if rows else torch.empty(0, n)
