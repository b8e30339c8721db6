"""Samplers for data-parallel training and exact (unpadded) evaluation passes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from nfpi.data.loader import epoch_seed
from nfpi.errors import ConfigError

__all__ = ["EpochShardSampler", "ShardSampler"]


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
