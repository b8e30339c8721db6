"""A run's data: the datasets, the augmentation and the loaders one rank trains and tests on.

The training set (augmented per batch on the device, as the paper does) feeds both the training
steps and the statistics passes of the prior, as in the release; the test set is never
augmented. Under ``torch.distributed`` each rank loads its shard: every epoch's permutation is
split across ranks (:class:`~nfpi.data.sharding.EpochShardSampler`), the statistics and test
passes take fixed shards (:class:`~nfpi.data.sharding.ShardSampler`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch.utils.data import DataLoader

from nfpi.config import ExperimentConfig
from nfpi.data import (
    BatchAugment,
    DecodedCache,
    ImageDataset,
    ImageFileDataset,
    cache_root,
    load_dataset,
)
from nfpi.data.load import NO_FLIP
from nfpi.data.sharding import EpochShardSampler, IndexedDataset, ShardSampler
from nfpi.errors import ConfigError
from nfpi.training.distributed import barrier, broadcast_object

__all__ = ["RunData"]


class RunData:
    """The datasets and loaders of one rank of a run of ``config``.

    Attributes:
        train_set, test_set: the datasets (backed by the decoded cache when
            ``data.decode_cache``).
        info: the dataset's :class:`~nfpi.data.DatasetInfo`.
        num_classes, dim: K and the number of dimensions of an image.
        augment: the paper's augmentation (``None`` when ``data.augment`` is off).
        train_sampler: this rank's share of every epoch's permutation (``set_epoch`` it).
        train_loader: batches of ``optim.batch_size // world`` images, the last partial dropped.
        stats_loader: the training set's shard, items keyed by index (the statistics passes).
        test_loader: the test set's shard.

    Raises:
        ConfigError: ``optim.batch_size`` exceeds the training set.
    """

    def __init__(
        self, config: ExperimentConfig, device: torch.device, rank: int = 0, world: int = 1
    ) -> None:
        c = config
        self.config, self.rank, self.world = config, rank, world
        self.train_set, self.info = load_dataset(
            c.data.name, "train", seed=c.seed, **c.data.split_kwargs("train")
        )
        self.test_set, _ = load_dataset(
            c.data.name, "test", seed=c.seed, **c.data.split_kwargs("test")
        )
        if c.data.decode_cache:
            self.train_set = self._decoded(self.train_set)
            self.test_set = self._decoded(self.test_set)
        if len(self.train_set) < c.optim.batch_size:
            raise ConfigError(
                "optim.batch_size",
                c.optim.batch_size,
                f"<= the training set size ({len(self.train_set)})",
            )
        self.num_classes, self.dim = self.info.num_classes, math.prod(self.info.shape)
        # The paper's augmentation, drawn per image but applied per batch on the device.
        self.augment = (
            BatchAugment(self.info.shape, flip=c.data.name not in NO_FLIP)
            if c.data.augment
            else None
        )
        self.train_sampler = EpochShardSampler(
            len(self.train_set), seed=c.seed, rank=rank, world=world
        )
        loader_kw = {"num_workers": c.data.num_workers, "pin_memory": device.type == "cuda"}
        self.train_loader = DataLoader(
            self.train_set,
            c.optim.batch_size // world,
            sampler=self.train_sampler,
            drop_last=True,
            **loader_kw,
        )

        def shard(ds: Any) -> ShardSampler:
            return ShardSampler(len(ds), rank=rank, world=world)

        self.stats_loader = DataLoader(
            IndexedDataset(self.train_set),
            c.eval.batch_size,
            sampler=shard(self.train_set),
            **loader_kw,
        )
        self.test_loader = DataLoader(
            self.test_set, c.eval.batch_size, sampler=shard(self.test_set), **loader_kw
        )

    def _decoded(self, dataset: ImageDataset) -> ImageDataset:
        """``dataset`` backed by its decoded cache (:mod:`nfpi.data.cache`), built together by
        all ranks when missing: each decodes one block, rank 0 publishes the file."""
        if not isinstance(dataset, ImageFileDataset):
            return dataset
        main = self.rank == 0
        cache = DecodedCache(cache_root(self.config.data.cache_dir), dataset)
        # Rank 0 holds the build lock (other runs wanting this cache wait, then find it ready)
        # and decides for all ranks: their disks may differ.
        with cache.lock() if main else contextlib.nullcontext():
            state = broadcast_object(cache.state() if main else None)
            if state == "build":
                if main:
                    cache.prepare()
                barrier()
                cache.fill(self.rank, self.world, num_workers=self.config.data.num_workers)
                barrier()
                if main:
                    cache.finish(self.world)
                barrier()
        return dataset if state == "skip" else cache.open()
