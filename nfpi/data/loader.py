"""Reproducible, resumable data loaders."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from nfpi.errors import ConfigError

__all__ = ["epoch_seed", "make_loader", "set_loader_epoch"]


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends on ``(seed, epoch)`` only (numpy ``SeedSequence`` mixing, so
    nearby pairs give unrelated streams)."""
    for field, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(field, value, "an int >= 0")
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    num_workers: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A DataLoader whose order (and worker augmentation) is a function of ``(seed, epoch)``.

    The loader's ``torch.Generator`` is seeded with :func:`epoch_seed`\\ ``(seed, epoch)``. It
    drives the shuffling and, with ``num_workers > 0``, the seed of every worker (PyTorch seeds
    worker ``i`` with ``base_seed + i``, ``base_seed`` drawn from that generator), hence the
    augmentations drawn in the workers.

    Reproducible epochs / resuming: call :func:`set_loader_epoch`\\ ``(loader, seed, epoch)``
    before iterating epoch ``epoch`` (or build the loader with ``epoch=``). Epoch ``e`` then
    yields the same batches whether the run went through epochs ``0..e-1`` or resumed at ``e``
    from a checkpoint. Without it, the generator simply advances from epoch to epoch
    (still deterministic from the start, but not resumable mid-run). With ``num_workers = 0``
    the augmentation runs in the main process on torch's global RNG: seed that too
    (``torch.manual_seed(epoch_seed(seed, epoch))``) for a bit-exact resume. Workers are not
    persistent, so each epoch's workers get that epoch's seeds.

    Args:
        dataset: a map-style dataset, e.g. from :func:`nfpi.data.load_dataset`.
        batch_size: items per batch (>= 1).
        shuffle: reshuffle each epoch (training) or keep the dataset order (evaluation).
        seed: run seed.
        epoch: epoch whose seed the generator starts from.
        num_workers: worker processes (0 = main process).
        drop_last: drop the last incomplete batch; default ``shuffle`` (training batches of
            equal size, every item evaluated).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        collate_fn: optional batch collation; the default stacks ``x`` to uint8
            ``[B, C, H, W]`` and ``y`` to int64 ``[B]``.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.arange(10))
        >>> a = [b[0].tolist() for b in make_loader(ds, 4, shuffle=True, seed=1, epoch=3)]
        >>> b = [b[0].tolist() for b in make_loader(ds, 4, shuffle=True, seed=1, epoch=3)]
        >>> a == b
        True
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError("batch_size", batch_size, "an int >= 1")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError("num_workers", num_workers, "an int >= 0")
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=shuffle if drop_last is None else drop_last,
        pin_memory=pin_memory,
        generator=generator,
        collate_fn=collate_fn,
        persistent_workers=False,
    )


def set_loader_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Reseed ``loader``'s generator for ``epoch`` (see :func:`make_loader`); call before
    iterating that epoch."""
    if loader.generator is None:
        raise ConfigError(
            "loader.generator", None, "a loader with a torch.Generator, e.g. from make_loader"
        )
    loader.generator.manual_seed(epoch_seed(seed, epoch))
