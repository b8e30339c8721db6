"""Decode an image-file dataset once into a uint8 file that every later epoch, rank and run
memory-maps: ``N x C x H x W`` bytes, the images as the model sees them before augmentation.

Decoding JPEGs is the data path's cost (a few thousand 32 x 32 images per second per core,
far less for ImageNet-sized files); reading a decoded row from the page cache costs almost
nothing. ``decoded_dataset`` builds the cache in one process; data-parallel runs build it
together, each rank decoding one contiguous block (``fill``), synchronised by the caller
(:class:`nfpi.training.Trainer`, which owns the process group)::

    cache = DecodedCache(cache_root(None), dataset)
    with cache.lock() if rank == 0 else nullcontext():  # one build at a time per cache
        state = broadcast(cache.state() if rank == 0 else None)
        if state == "build":
            if rank == 0: cache.prepare()
            barrier(); cache.fill(rank, world); barrier()
            if rank == 0: cache.finish(world)
            barrier()
    dataset = cache.open() if state != "skip" else dataset

Layout: ``<root>/<key>/images.u8`` (complete, read-only) and ``meta.json``; while building,
``images.u8.partial`` and one ``done-<rank>-of-<world>`` marker per block. The key digests the
file list, the image shape and ``image_size``, and the size and mtime of every 1000th file:
a dataset re-listed from the same files finds its cache, a different subset or size gets its
own, and a file replaced in place is caught when sampled (delete the folder to force a
rebuild). On a multi-node run ``root`` must be storage every node reaches (the shared file
system); a node-local root fails loudly in :meth:`DecodedCache.open`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset

from nfpi.data.archive import CACHE_ENV
from nfpi.data.datasets import ImageDataset, ImageFileDataset, TensorImageDataset
from nfpi.errors import ConfigError, DatasetNotFoundError

__all__ = ["DecodedCache", "block", "cache_root", "decoded_dataset"]

logger = logging.getLogger(__name__)

IMAGES = "images.u8"
META = "meta.json"
STAT_EVERY = 1000  # files whose size and mtime enter the key (every file: 1.28 M stats on NFS)
HEADROOM = 1.05  # free space needed, relative to the cache's size


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir`` > ``$NFPI_DATA_CACHE/decoded`` > ``~/.cache/nfpi/decoded``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "decoded"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "nfpi" / "decoded"


def block(n: int, rank: int, world: int) -> range:
    """Indices rank ``rank`` of ``world`` decodes: contiguous, disjoint, together ``range(n)``,
    sizes differing by at most one."""
    if not 0 <= rank < world:
        raise ConfigError("rank", rank, f"0 <= rank < world = {world}")
    return range(rank * n // world, (rank + 1) * n // world)


class _Raw(Dataset):
    """The untransformed uint8 images of ``indices`` (augmentation happens after the cache)."""

    def __init__(self, dataset: ImageFileDataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.load(self.indices[i])


class DecodedCache:
    """The decoded-uint8 cache of one :class:`ImageFileDataset` under ``root``.

    Args:
        root: the caches' folder (:func:`cache_root`).
        dataset: the file dataset to decode (after any subsampling).
    """

    def __init__(self, root: str | os.PathLike[str], dataset: ImageFileDataset) -> None:
        self.dataset = dataset
        self.shape = tuple(int(s) for s in dataset.shape)
        self.n = len(dataset)
        self.key = self._key()
        self.folder = Path(root).expanduser() / self.key
        self.images = self.folder / IMAGES
        self.partial = self.folder / (IMAGES + ".partial")

    def _key(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.shape, self.dataset.image_size, self.n]).encode())
        for i, path in enumerate(self.dataset.paths):
            h.update(str(path).encode() + b"\0")
            if i % STAT_EVERY == 0:
                st = path.stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}\0".encode())
        return h.hexdigest()[:24]

    def lock(self) -> FileLock:
        """The build lock (held by one process of a run from :meth:`state` to :meth:`finish`):
        runs that want the same cache at once build it once; the others then find it ready."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.folder.parent / f"{self.key}.lock"))

    @property
    def nbytes(self) -> int:
        return self.n * int(np.prod(self.shape))

    def state(self) -> Literal["ready", "build", "skip"]:
        """``ready`` (complete), ``build`` (missing and it fits on disk) or ``skip`` (it does
        not fit: read the files). Decide on one rank and share it: disks differ across nodes."""
        if self.images.exists() and self.images.stat().st_size == self.nbytes:
            return "ready"
        self.folder.mkdir(parents=True, exist_ok=True)
        have = self.partial.stat().st_size if self.partial.exists() else 0
        free = shutil.disk_usage(self.folder).free
        if free + have < HEADROOM * self.nbytes:
            logger.warning(
                "decoded cache of %d images (%.2f GB) does not fit in %s (%.2f GB free): "
                "decoding the files every epoch",
                self.n,
                self.nbytes / 1e9,
                self.folder,
                free / 1e9,
            )
            return "skip"
        return "build"

    def prepare(self) -> None:
        """Create the full-size partial file (one process, before any :meth:`fill`); an
        existing one is kept (an interrupted build's finished blocks are overwritten with the
        same bytes)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "ab") as f:
            if f.tell() != self.nbytes:
                f.truncate(self.nbytes)
        for marker in self.folder.glob("done-*"):
            marker.unlink(missing_ok=True)

    def fill(
        self, rank: int = 0, world: int = 1, *, num_workers: int = 0, batch_size: int = 256
    ) -> None:
        """Decode block ``rank`` of ``world`` (:func:`block`) into the partial file with a
        DataLoader of ``num_workers`` processes, flush it, and mark it done."""
        rows = block(self.n, rank, world)
        if len(rows):
            out = np.memmap(self.partial, np.uint8, "r+", shape=(self.n, *self.shape))
            loader = DataLoader(
                _Raw(self.dataset, rows), batch_size=batch_size, num_workers=num_workers
            )
            at = rows.start
            for x in loader:
                out[at : at + len(x)] = x.numpy()
                at += len(x)
            out.flush()
            del out
        (self.folder / f"done-{rank}-of-{world}").write_text(f"{rows.start} {rows.stop}\n")

    def finish(self, world: int = 1) -> None:
        """Check every block's marker, then publish the file (one process, after all fills)."""
        missing = [r for r in range(world) if not (self.folder / f"done-{r}-of-{world}").exists()]
        if missing:
            raise DatasetNotFoundError(
                f"decoded cache {self.folder}: blocks of ranks {missing} were never written. "
                "On a multi-node run data.cache_dir (or $NFPI_DATA_CACHE) must be a folder "
                "every node reaches (the shared file system)"
            )
        os.replace(self.partial, self.images)
        (self.folder / META).write_text(
            json.dumps(
                {"n": self.n, "shape": self.shape, "image_size": self.dataset.image_size},
                indent=1,
            )
            + "\n"
        )
        for marker in self.folder.glob("done-*"):
            marker.unlink(missing_ok=True)
        logger.info("decoded cache written: %s (%.1f MB)", self.images, self.nbytes / 1e6)

    def open(self) -> TensorImageDataset:
        """The dataset backed by the memory-mapped cache (copy-on-write pages, shared by every
        process of the machine through the page cache), same targets and transform."""
        if not (self.images.exists() and self.images.stat().st_size == self.nbytes):
            raise DatasetNotFoundError(
                f"decoded cache {self.images} is missing or incomplete. On a multi-node run "
                "data.cache_dir (or $NFPI_DATA_CACHE) must be a folder every node reaches"
            )
        images = np.memmap(self.images, np.uint8, "c", shape=(self.n, *self.shape))
        return TensorImageDataset(
            torch.from_numpy(images), self.dataset.targets.clone(), self.dataset.transform
        )


def decoded_dataset(
    dataset: ImageDataset,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    num_workers: int = 0,
) -> ImageDataset:
    """``dataset`` backed by its decoded cache (built now if missing and it fits), in one
    process; any other kind of dataset is returned as it is. Data-parallel runs build the cache
    together instead (see the module docstring)."""
    if not isinstance(dataset, ImageFileDataset):
        return dataset
    cache = DecodedCache(cache_root(cache_dir), dataset)
    with cache.lock():
        state = cache.state()
        if state == "skip":
            return dataset
        if state == "build":
            cache.prepare()
            cache.fill(num_workers=num_workers)
            cache.finish()
    return cache.open()
