"""The reader of generated datasets, and the on-disk format it shares with the writer.

:func:`nfpi.downstream.generate.generate_dataset` writes a labelled set drawn from a trained
flow; :class:`GeneratedDataset` reads the directory back as a map-style dataset yielding
``(uint8 [C, H, W], int)`` like the datasets of :mod:`nfpi.data`.

On-disk layout (format version 1)::

    out_dir/
      manifest.json        what was generated and from what (written last, atomically)
      labels.npy           int64 [N]
      images_00000.npy     uint8 [batch_size, C, H, W]
      images_00001.npy     ...

The manifest records the checkpoint path and epoch, ``T``, the seed, the counts per class, the
shape, the class names, the shard files with their SHA-256, and the number of non-finite pixels
the flow produced.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nfpi.data import DatasetInfo
from nfpi.data.datasets import ImageDataset, Transform
from nfpi.errors import CheckpointError, DatasetNotFoundError

__all__ = ["FORMAT", "FORMAT_VERSION", "LABELS_FILE", "MANIFEST", "SHARD", "GeneratedDataset"]

FORMAT = "nfpi-generated"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LABELS_FILE = "labels.npy"
SHARD = "images_{:05d}.npy"  # shard i's file name


def _corrupt(out: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"generated dataset {out} is corrupt: {what}; regenerate it with "
        "nfpi.downstream.generate_dataset(..., overwrite=True)"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class GeneratedDataset(ImageDataset):
    """A dataset written by :func:`~nfpi.downstream.generate.generate_dataset`: items
    ``(uint8 [C, H, W], int)``.

    Shards are memory-mapped on first access (read-only; an item is copied out), so opening a
    50 000-image set costs the manifest, the labels and, with ``verify``, one hashing pass.
    Works with DataLoader workers (each worker maps the shards it touches).

    Args:
        root: the directory :func:`~nfpi.downstream.generate.generate_dataset` wrote.
        verify: check every file's SHA-256 against the manifest (one read of the set);
            without it only the files' presence, headers and sizes are checked.
        transform: optional callable on one uint8 image ``[C, H, W]``.

    Attributes:
        targets: int64 ``[N]``.
        manifest: the parsed ``manifest.json``.
        info: a :class:`~nfpi.data.DatasetInfo` (name ``"generated/<dataset>"``).

    Raises:
        DatasetNotFoundError: no directory, no manifest (missing or an interrupted generation),
            or a shard/label file is missing.
        CheckpointError: the manifest is unreadable or of another format/version, or a file
            does not match it (shape, dtype, size, checksum, label counts).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        verify: bool = True,
        transform: Transform | None = None,
        _indices: Tensor | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.verify = verify
        path = self.root / MANIFEST
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"no generated dataset at {self.root}: the directory does not exist; create one "
                "with nfpi.downstream.generate_dataset"
            )
        if not path.is_file():
            raise DatasetNotFoundError(
                f"no {MANIFEST} in {self.root}: not a generated dataset, or its generation was "
                "interrupted (the manifest is written last); rerun generate_dataset"
            )
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise _corrupt(self.root, f"{MANIFEST} is not valid JSON ({e})") from e
        self.manifest = manifest
        try:
            self._check_manifest(manifest)
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(self.root, f"{MANIFEST} lacks or garbles a field ({e!r})") from e
        self.info = DatasetInfo(
            name=f"generated/{manifest['dataset']}",
            num_classes=int(manifest["num_classes"]),
            shape=tuple(manifest["shape"]),
            class_names=tuple(manifest["class_names"]),
        )
        all_targets = self._load_labels()
        self._counts = [int(s["count"]) for s in manifest["shards"]]
        self._offsets = np.cumsum([0, *self._counts])
        self._files = [self.root / s["file"] for s in manifest["shards"]]
        self._check_shards()
        self._maps: dict[int, np.ndarray] = {}
        self._indices = _indices
        self.targets = all_targets if _indices is None else all_targets[_indices]

    # ----------------------------------------------------------------------------- checks
    def _check_manifest(self, m: dict[str, Any]) -> None:
        if m.get("format") != FORMAT:
            raise _corrupt(self.root, f"format {m.get('format')!r}, expected {FORMAT!r}")
        if m.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"generated dataset {self.root} has format version {m.get('format_version')}, "
                f"this nfpi reads version {FORMAT_VERSION}; regenerate it"
            )
        k, total = int(m["num_classes"]), int(m["total"])
        if len(m["class_names"]) != k or len(m["counts_per_class"]) != k:
            raise _corrupt(self.root, f"class names/counts do not have num_classes = {k} entries")
        if sum(int(c) for c in m["counts_per_class"]) != total:
            raise _corrupt(self.root, f"counts_per_class do not sum to total = {total}")
        if sum(int(s["count"]) for s in m["shards"]) != total:
            raise _corrupt(self.root, f"shard counts do not sum to total = {total}")
        for s in m["shards"]:
            if not isinstance(s["file"], str) or "/" in s["file"] or "\\" in s["file"]:
                raise _corrupt(self.root, f"shard file name {s['file']!r} is not a plain name")

    def _file(self, name: str, sha256: str) -> Path:
        path = self.root / name
        if not path.is_file():
            raise DatasetNotFoundError(
                f"generated dataset {self.root} is missing {name} (listed in its manifest); "
                "regenerate it with generate_dataset(..., overwrite=True)"
            )
        if self.verify and _sha256(path) != sha256:
            raise _corrupt(self.root, f"{name} does not match its SHA-256 in the manifest")
        return path

    def _open(self, path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise _corrupt(self.root, f"{path.name} is not a readable .npy file ({e})") from e

    def _load_labels(self) -> Tensor:
        m = self.manifest
        arr = self._open(self._file(m["labels"]["file"], m["labels"]["sha256"]))
        if arr.dtype != np.int64 or arr.shape != (int(m["total"]),):
            raise _corrupt(
                self.root, f"labels are {arr.dtype} {arr.shape}, expected int64 ({m['total']},)"
            )
        targets = torch.from_numpy(np.array(arr))
        k = int(m["num_classes"])
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= k):
            raise _corrupt(self.root, f"labels outside [0, {k})")
        if torch.bincount(targets, minlength=k).tolist() != [int(c) for c in m["counts_per_class"]]:
            raise _corrupt(self.root, "label counts differ from the manifest's counts_per_class")
        return targets

    def _check_shards(self) -> None:
        shape = tuple(self.info.shape)
        for s, count in zip(self.manifest["shards"], self._counts, strict=True):
            arr = self._open(self._file(s["file"], s["sha256"]))
            if arr.dtype != np.uint8 or tuple(arr.shape) != (count, *shape):
                raise _corrupt(
                    self.root,
                    f"{s['file']} holds {arr.dtype} {tuple(arr.shape)}, the manifest says uint8 "
                    f"{(count, *shape)}",
                )
            del arr

    # ---------------------------------------------------------------------------- access
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.info.shape

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    def _shard(self, i: int) -> np.ndarray:
        arr = self._maps.get(i)
        if arr is None:
            arr = self._maps[i] = self._open(self._files[i])
        return arr

    def load(self, index: int) -> Tensor:
        if self._indices is not None:
            index = int(self._indices[index])
        if not 0 <= index < int(self._offsets[-1]):
            raise IndexError(f"index {index} out of range for {int(self._offsets[-1])} images")
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        # Copy out of the read-only map: torch tensors must own writable memory.
        return torch.from_numpy(np.array(self._shard(shard)[index - self._offsets[shard]]))

    def subset(self, indices: Sequence[int] | Tensor) -> GeneratedDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if self._indices is not None:
            idx = self._indices[idx]
        return GeneratedDataset(self.root, verify=False, transform=self.transform, _indices=idx)

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are not picklable (DataLoader workers with spawn): reopen lazily.
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
