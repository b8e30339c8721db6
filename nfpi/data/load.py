"""One entry point for every dataset: :func:`load_dataset`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from nfpi.data.augment import paper_augmentation
from nfpi.data.datasets import (
    DatasetInfo,
    ImageDataset,
    ImageFileDataset,
    TensorImageDataset,
    check_dataset,
    subsample_per_class,
)
from nfpi.data.imagefolder import load_imagefolder
from nfpi.data.synthetic import make_synthetic
from nfpi.errors import ConfigError, DatasetNotFoundError

__all__ = [
    "DATA_ROOT_ENV",
    "DIGITS_SPLIT_SEED",
    "DIGITS_TEST_FRACTION",
    "DatasetName",
    "Split",
    "default_data_root",
    "digits_split_indices",
    "load_dataset",
]

logger = logging.getLogger(__name__)

DatasetName = Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"]
Split = Literal["train", "test"]
DATASET_NAMES: tuple[str, ...] = get_args(DatasetName)
SPLITS: tuple[str, ...] = get_args(Split)

DATA_ROOT_ENV = "NFPI_DATA_ROOT"
# The digits split is fixed (not tied to `seed`) so that test sets are comparable across runs.
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_LEVELS = 17  # pixel values 0..16

# Datasets whose classes are not mirror-symmetric: a flipped digit is another glyph (or none),
# and a flipped synthetic plane wave is the pattern of another orientation, i.e. another class.
NO_FLIP = frozenset({"digits", "synthetic"})


def default_data_root() -> Path:
    """``$NFPI_DATA_ROOT``, else ``~/.cache/nfpi/datasets``: where CIFAR is looked for."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nfpi" / "datasets"


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices into scikit-learn's ``load_digits()`` of the train and test splits:
    stratified, test fraction :data:`DIGITS_TEST_FRACTION`, fixed seed
    :data:`DIGITS_SPLIT_SEED` (independent of any run seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=labels,
    )
    return np.sort(train_idx), np.sort(test_idx)


def _load_digits(split: str) -> tuple[TensorImageDataset, DatasetInfo]:
    """scikit-learn's bundled 8 x 8 digits (1797 images, values 0..16), in memory.

    The 17 grey levels 0..16 are stored as they are (uint8 level indices, ``info.levels = 17``):
    they are dequantised with 17 bins and bits/dim counts 17-level data. Split: stratified
    80 / 20 with the fixed seed :data:`DIGITS_SPLIT_SEED` -> 1437 train, 360 test images.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    values = np.asarray(bunch.images, dtype=np.float64)  # [1797, 8, 8], 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = digits_split_indices()
    idx = train_idx if split == "train" else test_idx
    images = torch.from_numpy(values[idx].astype(np.uint8))[:, None]
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        shape=(1, 8, 8),
        class_names=tuple(str(c) for c in bunch.target_names),
        levels=DIGITS_LEVELS,
    )
    return TensorImageDataset(images, torch.from_numpy(labels[idx])), info


def _load_cifar(
    name: str, split: str, root: Path, download: bool
) -> tuple[TensorImageDataset, DatasetInfo]:
    """torchvision's CIFAR-10/100 (python version) under ``root``, in memory."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        ds = cls(root=str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as e:
        # torchvision raises RuntimeError("Dataset not found or corrupted") without files, and
        # URLError / OSError when download=True cannot reach the network.
        raise DatasetNotFoundError(
            f"{name} ({split} split) not found in {root} (looked for "
            f"{root / cls.base_folder}). To provide it: (1) when online, pass download=True; "
            f"(2) offline, put the python-version archive {cls.filename} (from {cls.url}) in "
            f"{root} and pass download=True (torchvision checks its md5 and extracts it without "
            f"network), or extract it there yourself (tar xzf {cls.filename} -C {root}); "
            f"(3) or use name='imagefolder' with root= an extracted image tree (or .tar.gz of "
            f"one) laid out as <root>/{{train,test}}/<class>/<images>. "
            f"Set ${DATA_ROOT_ENV} or root= to look elsewhere. Cause: {e}"
        ) from e
    images = torch.from_numpy(np.asarray(ds.data, dtype=np.uint8)).permute(0, 3, 1, 2)
    info = DatasetInfo(
        name=name, num_classes=len(ds.classes), shape=(3, 32, 32), class_names=tuple(ds.classes)
    )
    return TensorImageDataset(images.contiguous(), torch.as_tensor(ds.targets)), info


def _reject_unless(name: str, allowed: tuple[str, ...], **options: object) -> None:
    """Options that only make sense for some datasets are errors elsewhere, not ignored."""
    for field, value in options.items():
        if value not in (None, False) and name not in allowed:
            raise ConfigError(field, value, f"only used by name in {allowed}; got name={name!r}")


def load_dataset(
    name: DatasetName,
    split: Split,
    *,
    root: str | os.PathLike[str] | None = None,
    augment: bool = False,
    items_per_class: int | None = None,
    seed: int = 0,
    download: bool = False,
    image_size: int | None = None,
    extract_to: str | os.PathLike[str] | None = None,
    in_memory: bool = False,
    num_classes: int | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[ImageDataset, DatasetInfo]:
    """Load one split of a dataset; items are ``(x, y)``, ``x`` uint8 ``[C, H, W]``, ``y`` in
    ``[0, K)``.

    Datasets:
        - ``digits``: scikit-learn's bundled 8 x 8 digits, ``(1, 8, 8)``, K = 10; values
          values 0..16 kept as uint8 level indices (``info.levels = 17``); fixed stratified 80/20 split (seed
          :data:`DIGITS_SPLIT_SEED`, independent of ``seed``): 1437 train / 360 test.
        - ``cifar10`` / ``cifar100``: torchvision's datasets under ``root`` (default
          :func:`default_data_root`); ``download=True`` fetches them when online.
        - ``imagefolder``: ``root`` is a tree ``{train,test|val}/<class>/<images>`` or a tar
          archive of one (extracted once to ``extract_to`` / ``$NFPI_DATA_CACHE`` / next to
          it); RGB; ``image_size`` resizes + centre-crops trees of unequal image sizes;
          ``in_memory`` decodes the images once (after subsampling).
        - ``synthetic``: K = ``num_classes`` (10) plane-wave patterns of ``shape``
          ``(3, 16, 16)`` plus noise; ``items_per_class`` items generated per class.

    Args:
        name: one of ``digits, cifar10, cifar100, imagefolder, synthetic``.
        split: ``"train"`` or ``"test"``.
        root: data location (cifar, imagefolder); ignored by digits and synthetic.
        augment: apply :func:`paper_augmentation` (train split only). No horizontal flip for
            digits (a mirrored digit is another glyph) nor synthetic (a mirrored pattern is
            another class's); no colour jitter for 1-channel images.
        items_per_class: keep this many items of every class, drawn with ``seed``
            (:func:`subsample_per_class`); for synthetic, the number generated per class.
        seed: seed of the subsampling and of synthetic noise.
        download: cifar only.
        image_size, extract_to, in_memory: imagefolder only.
        num_classes, shape: synthetic only.

    Returns:
        ``(dataset, info)``: an :class:`ImageDataset` (with ``targets``) and its
        :class:`DatasetInfo`.

    Raises:
        ConfigError: unknown name/split, or an option the dataset does not use.
        DatasetNotFoundError: files missing; the message names the path and how to fix it.
        InsufficientSamplesError: a class has fewer than ``items_per_class`` items.
        ShapeError / LabelRangeError: inconsistent images or labels.

    Example:
        >>> ds, info = load_dataset("digits", "train")
        >>> x, y = ds[0]
        >>> x.dtype, tuple(x.shape), info.num_classes
        (torch.uint8, (1, 8, 8), 10)
    """
    if name not in DATASET_NAMES:
        raise ConfigError("name", name, f"one of {DATASET_NAMES}")
    if split not in SPLITS:
        raise ConfigError("split", split, f"one of {SPLITS}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError("seed", seed, "an int >= 0")
    if augment and split != "train":
        raise ConfigError(
            "augment",
            augment,
            "augmentation applies to the train split only; evaluate on "
            "un-augmented test images (augment=False)",
        )
    _reject_unless(name, ("cifar10", "cifar100"), download=download)
    _reject_unless(
        name, ("imagefolder",), image_size=image_size, extract_to=extract_to, in_memory=in_memory
    )
    _reject_unless(name, ("synthetic",), num_classes=num_classes, shape=shape)

    dataset: ImageDataset
    if name == "digits":
        dataset, info = _load_digits(split)
    elif name in ("cifar10", "cifar100"):
        base = Path(root).expanduser() if root is not None else default_data_root()
        dataset, info = _load_cifar(name, split, base, download)
    elif name == "imagefolder":
        if root is None:
            raise ConfigError(
                "root",
                root,
                "name='imagefolder' needs root= a tree {train,test}/<class>/<images> "
                "or a .tar.gz/.tgz/.tar archive of one",
            )
        dataset, info = load_imagefolder(root, split, image_size=image_size, extract_to=extract_to)
    else:
        dataset, info = make_synthetic(
            split,
            num_classes=10 if num_classes is None else num_classes,
            shape=(3, 16, 16) if shape is None else tuple(shape),
            items_per_class=items_per_class,
            seed=seed,
        )
    where = f"{info.name} ({split} split)"
    check_dataset(dataset, info, where)
    if info.num_classes < 2:  # before any training: the plots, NF-Acc and the KL terms need 2
        raise ConfigError(
            "num_classes",
            info.num_classes,
            f"at least 2 classes for a class-conditional flow ({where} has one)",
        )

    if items_per_class is not None and name != "synthetic":
        keep = subsample_per_class(dataset.targets, items_per_class, seed, info.class_names)
        dataset = dataset.subset(keep)
    if in_memory and isinstance(dataset, ImageFileDataset):
        dataset = dataset.to_memory()
    if augment:
        dataset.transform = paper_augmentation(info.shape, flip=name not in NO_FLIP)
    counts = dataset.class_counts(info.num_classes)
    if bool((counts == 0).any()):
        logger.warning(
            "%s: classes without items: %s",
            where,
            [info.class_names[i] for i in torch.nonzero(counts == 0).flatten().tolist()],
        )
    logger.info(
        "%s: %d items, shape %s, %d classes", where, len(dataset), info.shape, info.num_classes
    )
    return dataset, info
