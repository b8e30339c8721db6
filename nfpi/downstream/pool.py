"""NF augmentation as a dataset: precomputed pools of NF-augmented training images.

On-the-fly NF augmentation (:class:`~nfpi.downstream.nf_augment.NFAugment`) runs the flow
forward twice and backward once per augmented image inside the classifier's loop: on a CPU it
costs 1000-2000x a standard augmentation. A **pool** moves that work out of the loop: every
training image gets ``variants`` NF-augmented versions (each mixed with a random same-class
partner, exactly as ``NFAugment`` with ``p = 1`` would), written once to disk in shards; the
classifier then reads them like any other image.

**Refresh policy.** A pool is made of *rounds*. Epoch ``e`` is served by round
``(e // refresh_every) % rounds`` (``rounds=None``: no cycling, round ``e // refresh_every``),
so a new set of variants arrives every ``refresh_every`` epochs. Within the round, epoch ``e``
serves item ``i`` from the pool with probability ``probability`` (else the original image), and
picks variant ``v`` uniformly; both draws are a function of ``(seed, e, i)`` only, so an epoch is
the same whatever the loader order, the workers or a resume. The amortised flow work per epoch is
``variants / refresh_every`` augmentations per image, against ``probability`` for the online
transform, and none of it is on the classifier's critical path.

**Keys and reuse.** A pool lives in ``root/<key>/`` where ``key`` digests what its contents
depend on (:func:`pool_key`): the SHA-256 of the flow's checkpoint file, the augmentation config
(its mixing settings; not its checkpoint path), the dataset's fingerprint
(:func:`dataset_fingerprint`) and the pool's build settings (variants, seed, shard and batch
sizes). Trials with the same flow and settings share a pool; a retrained flow gets a new one.

On-disk layout (format version 1)::

    root/<key>/
      pool.json                 what the key stands for (written once)
      round-0000/
        shard-00000.npy         uint8 [n, variants, C, H, W], items [start, start + n)
        shard-00001.npy         ...
        manifest.json           the shards with their ranges and SHA-256 (written last)

Shards are written atomically as they are produced (streamed: no builder holds more than one
shard); a round exists once its manifest does. :class:`PoolRound` checks every shard's size
and SHA-256 before serving it. ``ray_jobs/augment_pool.py`` builds the shards of a round as
parallel Ray tasks; :func:`ensure_round` builds them in this process (same bytes).

Example::

    data, build_s = pooled_dataset(checkpoint, train_set, aug_config, pool_config, epochs)
    data.set_epoch(epoch)                    # each epoch, before iterating it

    # or step by step, with a flow and class PCA already at hand:
    store = PoolStore.for_flow(root, state_file, train_set, aug_config, pool_config)
    augment = pool_augmenter(flow, pca, aug_config, train_set, levels=info.levels)  # DatasetInfo
    for r in pool_config.rounds_for(epochs):
        ensure_round(store, r, augment, train_set, pool_config)
    data = PooledNFDataset(train_set, store, pool_config)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor
from torch.utils.data import Dataset

from nfpi.checkpoint import find_checkpoint
from nfpi.data import epoch_seed
from nfpi.downstream.nf_augment import NFAugment, NFAugmentConfig
from nfpi.downstream.pca import ClassPCA, dataset_targets
from nfpi.errors import CheckpointError, ConfigError, ShapeError
from nfpi.schema import Config, check

__all__ = [
    "PoolConfig",
    "PoolRound",
    "PoolStore",
    "PooledNFDataset",
    "ShardRecord",
    "build_shard",
    "dataset_fingerprint",
    "default_root",
    "ensure_round",
    "file_sha256",
    "pool_augmenter",
    "pool_key",
    "pooled_dataset",
]

log = logging.getLogger(__name__)

FORMAT = "nfpi-nf-pool"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
POOL_INFO = "pool.json"


@dataclass(frozen=True)
class PoolConfig(Config):
    """How a pool is built and served (see the module docstring for the policy).

    Attributes:
        variants: NF-augmented versions of every training image per round (>= 1).
        refresh_every: epochs served by one round (>= 1).
        rounds: distinct rounds before the schedule cycles (``None``: one per refresh period,
            never reused).
        probability: p, chance that an epoch serves an item from the pool (else the original).
        shard_size: images per shard (one Ray task builds one shard).
        batch_size: images per flow call while building.
        seed: seed of the build (partners, mixing weights) and of the per-epoch draws.
    """

    variants: int = 2
    refresh_every: int = 5
    rounds: int | None = None
    probability: float = 0.5
    shard_size: int = 2000
    batch_size: int = 250
    seed: int = 0

    def validate(self) -> None:
        for name in ("variants", "refresh_every", "shard_size", "batch_size"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        check(self.rounds is None or self.rounds >= 1, "rounds", self.rounds, "None or >= 1")
        p = self.probability
        check(0 <= p <= 1, "probability", p, "a number in [0, 1]")
        check(self.seed >= 0, "seed", self.seed, "an int >= 0")

    def round_of(self, epoch: int) -> int:
        """The round that serves ``epoch``."""
        r = epoch // self.refresh_every
        return r % self.rounds if self.rounds is not None else r

    def rounds_for(self, epochs: int) -> list[int]:
        """The rounds a run of ``epochs`` epochs reads, in order of first use."""
        return list(dict.fromkeys(self.round_of(e) for e in range(epochs)))

    def build_settings(self) -> dict[str, int]:
        """The settings the pool's bytes depend on (part of its key)."""
        return {
            "variants": self.variants,
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def dataset_fingerprint(dataset: Any, samples: int = 256) -> str:
    """A digest of a map-style uint8 dataset: its length, all its labels, and ``samples``
    images at evenly spaced indices (first and last included). Cheap for 50 000 images; two
    datasets that differ only in images between the sampled ones collide, so name the dataset
    in the pool's root when that can happen."""
    n = len(dataset)
    h = hashlib.sha256(f"{n}".encode())
    h.update(dataset_targets(dataset).numpy().tobytes())
    for i in sorted({int(j) for j in np.linspace(0, n - 1, min(samples, n))} if n else ()):
        h.update(np.ascontiguousarray(dataset[i][0].numpy()).tobytes())
    return h.hexdigest()[:16]


def pool_key(
    flow_digest: str, augment: NFAugmentConfig, pool: PoolConfig, data_fingerprint: str
) -> tuple[str, dict[str, Any]]:
    """(key, the values it digests). The augmentation's ``checkpoint`` path is left out (the
    flow's digest stands for it) and so is its ``probability`` (a pool holds only augmented
    images; the serving probability is the pool config's)."""
    aug = {k: v for k, v in augment.to_dict().items() if k not in ("checkpoint", "probability")}
    values = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "flow_sha256": flow_digest,
        "augment": aug,
        "build": pool.build_settings(),
        "dataset": data_fingerprint,
    }
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], values


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class ShardRecord:
    """One written shard: items ``[start, end)``, its file name, size and SHA-256."""

    index: int
    start: int
    end: int
    file: str
    bytes: int
    sha256: str


def _shard_seed(seed: int, round_: int, index: int, variant: int) -> int:
    state = np.random.SeedSequence([seed, round_, index, variant]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def pool_augmenter(
    flow: torch.nn.Module,
    pca: ClassPCA,
    config: NFAugmentConfig,
    dataset: Any,
    levels: int = 256,
) -> NFAugment:
    """The transform that fills pools: ``config`` with every image augmented (p = 1), on images
    of ``levels`` grey levels (the flow's ``DatasetInfo.levels``: its pixels encode and decode
    at that quantisation, so pooled images hold level indices like the dataset's)."""
    return NFAugment(flow, pca, config.replace(probability=1.0), dataset, levels=levels)


@torch.no_grad()
def build_shard(
    augment: NFAugment,
    dataset: Any,
    start: int,
    end: int,
    config: PoolConfig,
    round_: int,
    index: int,
) -> np.ndarray:
    """uint8 ``[end - start, variants, C, H, W]``: the NF variants of items ``[start, end)``.

    Variant ``v`` of the shard comes from ``augment`` (p = 1, see :func:`pool_augmenter`) over
    consecutive batches of ``config.batch_size`` items, with a generator seeded from
    ``(config.seed, round_, index, v)``: the bytes depend on nothing else (not on which process
    or task builds the shard).
    """
    if not 0 <= start < end <= len(dataset):
        raise ShapeError(f"shard range [{start}, {end}) outside the dataset of {len(dataset)}")
    items = [dataset[i] for i in range(start, end)]
    x = torch.stack([img for img, _ in items])
    y = torch.as_tensor([int(label) for _, label in items], dtype=torch.int64)
    out = np.empty((end - start, config.variants, *x.shape[1:]), dtype=np.uint8)
    for v in range(config.variants):
        gen = torch.Generator().manual_seed(_shard_seed(config.seed, round_, index, v))
        for b in range(0, end - start, config.batch_size):
            sl = slice(b, b + config.batch_size)
            out[sl, v] = augment(x[sl], y[sl], gen).cpu().numpy()
    return out


class PoolStore:
    """The folder of one pool (``root/key``): writes shards and manifests, opens rounds.

    Args:
        root: the folder of all pools (shared storage when several nodes build or read).
        key: the pool's key (:func:`pool_key`).
        values: what the key stands for (written to ``pool.json`` on first use).
        num_items: the dataset's length.
        shard_size: items per shard.
    """

    def __init__(
        self,
        root: str | Path,
        key: str,
        values: dict[str, Any],
        num_items: int,
        shard_size: int,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        self.key, self.values = key, values
        self.dir = self.root / key
        self.num_items, self.shard_size = int(num_items), int(shard_size)

    @classmethod
    def for_flow(
        cls,
        root: str | Path,
        checkpoint_file: str | Path,
        dataset: Any,
        augment: NFAugmentConfig,
        pool: PoolConfig,
    ) -> PoolStore:
        """The store of the pool of ``checkpoint_file`` (a ``state.pt``; its SHA-256 is the
        flow's digest) on ``dataset`` with these settings."""
        key, values = pool_key(
            file_sha256(checkpoint_file), augment, pool, dataset_fingerprint(dataset)
        )
        return cls(root, key, values, len(dataset), pool.shard_size)

    # --------------------------------------------------------------------------------- layout
    def shard_ranges(self) -> list[tuple[int, int]]:
        n, s = self.num_items, self.shard_size
        return [(a, min(a + s, n)) for a in range(0, n, s)]

    def round_dir(self, round_: int) -> Path:
        return self.dir / f"round-{round_:04d}"

    def complete(self, round_: int) -> bool:
        """Whether the round's manifest exists (it is written after every shard)."""
        return (self.round_dir(round_) / MANIFEST).is_file()

    def lock(self, round_: int) -> FileLock:
        """An inter-process lock on building the round (builders take it; readers need not)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / f"round-{round_:04d}.lock"))

    # -------------------------------------------------------------------------------- writing
    def write_shard(self, round_: int, index: int, start: int, images: np.ndarray) -> ShardRecord:
        """Write one shard atomically (any process; no lock needed: its bytes are fixed)."""
        if images.dtype != np.uint8 or images.ndim != 5:
            raise ShapeError(f"a shard is uint8 [n, variants, C, H, W], got {images.dtype} "
                             f"{images.shape}")  # fmt: skip
        folder = self.round_dir(round_)
        folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{index:05d}.npy"
        data = _npy_bytes(images)
        _write_atomic(folder / name, data)
        sha = hashlib.sha256(data).hexdigest()
        return ShardRecord(index, start, start + images.shape[0], name, len(data), sha)

    def finish_round(self, round_: int, shards: list[ShardRecord], seconds: float) -> Path:
        """Write the round's manifest (last, atomically): the round then exists."""
        shards = sorted(shards, key=lambda s: s.index)
        covered = [(s.start, s.end) for s in shards]
        if covered != self.shard_ranges():
            raise CheckpointError(
                f"pool {self.dir} round {round_}: shards cover {covered[:3]}..., expected "
                f"{self.shard_ranges()[:3]}... ({self.num_items} items); rebuild the round"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / POOL_INFO
        if not info.exists():
            _write_atomic(info, json.dumps(self.values, indent=1, sort_keys=True).encode())
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "key": self.key,
            "round": round_,
            "num_items": self.num_items,
            "build_seconds": round(seconds, 3),
            "shards": [s.__dict__ for s in shards],
        }
        path = self.round_dir(round_) / MANIFEST
        _write_atomic(path, json.dumps(manifest, indent=1).encode())
        return path

    # -------------------------------------------------------------------------------- reading
    def open_round(self, round_: int, verify: bool = True) -> PoolRound:
        """The round's shards, checked (size, and SHA-256 unless ``verify=False``) and
        memory-mapped."""
        path = self.round_dir(round_) / MANIFEST
        if not path.is_file():
            raise CheckpointError(
                f"pool {self.dir} has no round {round_} (no {path.name}); build it first "
                "(nfpi.downstream.pool.ensure_round or ray_jobs.augment_pool.build_pool)"
            )
        manifest = json.loads(path.read_text())
        return PoolRound(self.round_dir(round_), manifest, self.num_items, verify)


class PoolRound:
    """One built round: ``get(i, v)`` is variant ``v`` of item ``i``, uint8 ``[C, H, W]``.

    Every shard is checked when the round is opened (file size and SHA-256 against the
    manifest; the hash can be skipped where the same files were checked already); a mismatch
    raises :class:`~nfpi.errors.CheckpointError` naming the shard.
    """

    def __init__(
        self, folder: Path, manifest: dict[str, Any], num_items: int, verify: bool = True
    ) -> None:
        if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{folder / MANIFEST} is not a {FORMAT} v{FORMAT_VERSION} file")
        if manifest["num_items"] != num_items:
            raise CheckpointError(
                f"pool round {folder} holds {manifest['num_items']} items, the dataset has "
                f"{num_items}: the pool belongs to another dataset"
            )
        self.folder, self.round = folder, int(manifest["round"])
        self.starts: list[int] = []
        self.shards: list[np.ndarray] = []
        for s in manifest["shards"]:
            path = folder / s["file"]
            fix = f"delete {folder} and rebuild the round"
            if not path.is_file() or path.stat().st_size != s["bytes"]:
                raise CheckpointError(f"pool shard {path} is missing or truncated; {fix}")
            if verify and file_sha256(path) != s["sha256"]:
                raise CheckpointError(f"pool shard {path} fails its SHA-256 check; {fix}")
            self.starts.append(int(s["start"]))
            self.shards.append(np.load(path, mmap_mode="r", allow_pickle=False))
        self.variants = int(self.shards[0].shape[1]) if self.shards else 0

    def get(self, index: int, variant: int) -> Tensor:
        j = int(np.searchsorted(self.starts, index, side="right")) - 1
        return torch.from_numpy(np.array(self.shards[j][index - self.starts[j], variant]))


def ensure_round(
    store: PoolStore, round_: int, augment: NFAugment, dataset: Any, config: PoolConfig
) -> float:
    """Build round ``round_`` in this process unless it exists (under the round's lock, so a
    concurrent builder's work is waited for, not repeated); returns the seconds spent building
    (0 when it existed)."""
    with store.lock(round_):
        if store.complete(round_):
            return 0.0
        t0 = time.perf_counter()
        records = [
            store.write_shard(round_, i, a, build_shard(augment, dataset, a, b, config, round_, i))
            for i, (a, b) in enumerate(store.shard_ranges())
        ]
        seconds = time.perf_counter() - t0
        store.finish_round(round_, records, seconds)
    log.info("NF pool %s round %d: %d shards in %.1f s", store.key, round_, len(records), seconds)
    return seconds


class PooledNFDataset(Dataset):
    """``base`` with NF-augmented variants served from pool rounds, per the refresh policy.

    Items are ``(uint8 [C, H, W], label)`` like ``base``'s. Call :meth:`set_epoch` before
    iterating an epoch (:func:`~nfpi.downstream.classifier.train_classifier` does); until the
    first call it serves ``base`` unchanged (so dataset statistics see the real images).

    Args:
        base: the un-augmented training set.
        store: the pool (its rounds must be built: :func:`ensure_round`).
        config: the serving policy (``probability``, ``refresh_every``, ``rounds``, ``seed``).

    Attributes:
        served: bool ``[N]``, the items the current epoch serves from the pool.
        variant: int64 ``[N]``, which variant each of them gets.
    """

    def __init__(self, base: Any, store: PoolStore, config: PoolConfig) -> None:
        if len(base) != store.num_items:
            raise ShapeError(f"the pool holds {store.num_items} items, the dataset {len(base)}")
        self.base, self.store, self.config = base, store, config
        self.targets = dataset_targets(base)
        self.shape = getattr(base, "shape", None)
        self._round: PoolRound | None = None
        self.epoch: int | None = None
        self.served = torch.zeros(len(base), dtype=torch.bool)
        self.variant = torch.zeros(len(base), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        """Select the round of ``epoch`` (opened and checked on a change) and draw which items
        the epoch serves from it and which variant each gets."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError("epoch", epoch, "an int >= 0")
        r = self.config.round_of(epoch)
        if self._round is None or self._round.round != r:
            self._round = self.store.open_round(r)
        gen = torch.Generator().manual_seed(epoch_seed(self.config.seed, epoch))
        n = len(self.base)
        self.served = torch.rand(n, generator=gen) < self.config.probability
        self.variant = torch.randint(self._round.variants, (n,), generator=gen)
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self._round is not None and self.served[index]:
            return self._round.get(index, int(self.variant[index])), int(self.targets[index])
        return self.base[index]

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get the epoch's draws and reopen the memory maps (checked once,
        # in the process that called set_epoch).
        state = dict(self.__dict__)
        state["_round"] = None if self._round is None else self._round.round
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        r = state.pop("_round")
        self.__dict__.update(state)
        self._round = None if r is None else self.store.open_round(r, verify=False)


def default_root(checkpoint_file: str | Path) -> Path:
    """Where a flow's pools live by default: ``<run dir>/nf_pools`` next to its
    ``checkpoints/`` folder (so every trial that uses the flow finds them), else beside the
    checkpoint file."""
    file = Path(checkpoint_file).resolve()
    if file.parent.parent.name == "checkpoints":
        return file.parents[2] / "nf_pools"
    return file.parent / "nf_pools"


def pooled_dataset(
    checkpoint: str | Path,
    dataset: Any,
    augment: NFAugmentConfig,
    pool: PoolConfig,
    epochs: int,
    *,
    root: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[PooledNFDataset, float]:
    """The training set with NF variants from the pool of ``checkpoint``'s flow, building in
    this process the rounds that ``epochs`` epochs need and that do not exist yet (another
    builder, e.g. ``ray_jobs.augment_pool``, may have made them). Returns the dataset and the
    seconds spent building (0 when every round was there: no flow is even loaded)."""
    file = find_checkpoint(checkpoint)
    if file is None:
        raise CheckpointError(f"no checkpoint at {checkpoint} to build an NF pool from")
    store = PoolStore.for_flow(root or default_root(file), file, dataset, augment, pool)
    missing = [r for r in pool.rounds_for(epochs) if not store.complete(r)]
    seconds = 0.0
    if missing:
        online = NFAugment.from_checkpoint(
            augment.replace(checkpoint=str(file)), dataset, device=device
        )
        builder = pool_augmenter(online.flow, online.pca, online.config, dataset, online.levels)
        for r in missing:
            seconds += ensure_round(store, r, builder, dataset, pool)
    return PooledNFDataset(dataset, store, pool), seconds
