"""Deterministic class-conditional images for tests and smoke runs."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nfpi.data.datasets import DatasetInfo, TensorImageDataset
from nfpi.errors import ConfigError

__all__ = ["NOISE_STD", "class_pattern", "make_synthetic", "write_imagefolder"]

NOISE_STD = 0.08  # per-pixel gaussian noise, in units of the [0, 1] intensity range
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_SPLIT_STREAM = {"train": 0, "test": 1}


def class_pattern(label: int, shape: Sequence[int]) -> torch.Tensor:
    """The noise-free image of class ``label``: a float64 ``[C, H, W]`` in ``[0.2, 0.8]``.

    A plane wave ``0.5 + 0.3 sin(2 pi f (u cos theta + v sin theta) + phase_c)`` over the unit
    square, with orientation ``theta`` spread by the golden ratio over classes, ``f`` in
    {1, 2, 3} cycles per image and a per-channel phase; it depends on the label and shape only,
    so train and test (and every seed) share the class patterns.
    """
    c, h, w = (int(s) for s in shape)
    theta = math.pi * ((label * _GOLDEN) % 1.0)
    freq = 1.0 + (label % 3)
    v, u = torch.meshgrid(
        torch.linspace(0.0, 1.0, h, dtype=torch.float64),
        torch.linspace(0.0, 1.0, w, dtype=torch.float64),
        indexing="ij",
    )
    wave = u * math.cos(theta) + v * math.sin(theta)
    phases = torch.tensor([label + 2.0 * math.pi * ch / c for ch in range(c)], dtype=torch.float64)
    return 0.5 + 0.3 * torch.sin(2.0 * math.pi * freq * wave[None] + phases[:, None, None])


def make_synthetic(
    split: str,
    *,
    num_classes: int = 10,
    shape: Sequence[int] = (3, 16, 16),
    items_per_class: int | None = None,
    seed: int = 0,
) -> tuple[TensorImageDataset, DatasetInfo]:
    """``items_per_class`` noisy copies of every class pattern (:func:`class_pattern`), uint8.

    Deterministic in ``(seed, split)``; train and test draw independent noise. Items are ordered
    class by class. Defaults: 64 items per class for train, 16 for test.

    Args:
        split: ``"train"`` or ``"test"``.
        num_classes: K >= 1.
        shape: ``(C, H, W)``.
        items_per_class: items generated per class.
        seed: noise seed.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("num_classes", num_classes, "an int >= 1")
    if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ConfigError("shape", shape, "(C, H, W) with three positive ints")
    n = items_per_class if items_per_class is not None else (64 if split == "train" else 16)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError("items_per_class", items_per_class, "None or an int >= 1")
    state = np.random.SeedSequence([seed, _SPLIT_STREAM[split]]).generate_state(1)[0]
    g = torch.Generator().manual_seed(int(state))
    shape = tuple(int(s) for s in shape)
    images = torch.empty((num_classes * n, *shape), dtype=torch.uint8)
    for y in range(num_classes):
        noise = NOISE_STD * torch.randn((n, *shape), generator=g, dtype=torch.float64)
        x = (class_pattern(y, shape)[None] + noise).clamp(0.0, 1.0)
        images[y * n : (y + 1) * n] = torch.round(x * 255.0).to(torch.uint8)
    targets = torch.arange(num_classes).repeat_interleave(n)
    info = DatasetInfo(
        name="synthetic",
        num_classes=num_classes,
        shape=shape,  # type: ignore[arg-type]
        class_names=tuple(f"class_{y}" for y in range(num_classes)),
    )
    return TensorImageDataset(images, targets), info


def write_imagefolder(
    root: str | os.PathLike[str],
    *,
    num_classes: int = 10,
    shape: Sequence[int] = (3, 32, 32),
    train_per_class: int = 3,
    test_per_class: int = 1,
    seed: int = 0,
    suffix: str = ".jpg",
) -> Path:
    """Write :func:`make_synthetic`'s images as an ImageFolder tree (ImageNet's layout, at toy
    size): ``root/{train,test}/class_<y>/<i>.<suffix>``, class folders zero-padded so that
    their sorted order is the label order. ``.jpg`` (quality 95) or lossless ``.png``.

    Returns ``root``. E.g. ``write_imagefolder(tmp, num_classes=1000)`` gives the class count
    of ImageNet with 4000 files of 32 x 32 pixels in a few seconds.
    """
    if len(shape) != 3 or int(shape[0]) != 3:
        raise ConfigError("shape", shape, "(3, H, W): image files are RGB")
    if suffix not in (".jpg", ".png"):
        raise ConfigError("suffix", suffix, "'.jpg' or '.png'")
    root = Path(root).expanduser()
    width = max(4, len(str(num_classes - 1)))
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        dataset, _ = make_synthetic(
            split, num_classes=num_classes, shape=shape, items_per_class=n, seed=seed
        )
        pixels = dataset.images.permute(0, 2, 3, 1).numpy()
        for i, y in enumerate(dataset.targets.tolist()):
            folder = root / split / f"class_{y:0{width}d}"
            folder.mkdir(parents=True, exist_ok=True)
            options = {"quality": 95} if suffix == ".jpg" else {}
            Image.fromarray(pixels[i], mode="RGB").save(folder / f"{i % n:04d}{suffix}", **options)
    return root
