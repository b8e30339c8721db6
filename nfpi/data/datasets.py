"""Dataset containers: every dataset yields ``(x, y)`` with ``x`` a uint8 tensor ``[C, H, W]``
and ``y`` an int in ``[0, K)``; labels are available without loading images (``targets``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from nfpi.errors import (
    ConfigError,
    DatasetNotFoundError,
    InsufficientSamplesError,
    LabelRangeError,
    ShapeError,
)

__all__ = [
    "DatasetInfo",
    "ImageDataset",
    "ImageFileDataset",
    "TensorImageDataset",
    "subsample_per_class",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    Attributes:
        name: dataset name (``"digits"``, ``"cifar10"``, ``"imagefolder/<tree>"``, ...).
        num_classes: K; labels are in ``[0, K)``.
        shape: ``(C, H, W)`` of every image.
        class_names: K names, index = label.
        levels: grey levels per channel; the uint8 images hold level indices ``0..levels-1``
            (256 for 8-bit images; 17 for scikit-learn's digits, values 0..16). Dequantisation,
            bits/dim and sample quantisation use it.
    """

    name: str
    num_classes: int
    shape: tuple[int, int, int]
    class_names: tuple[str, ...]
    levels: int = 256

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError("num_classes", self.num_classes, "an int >= 1")
        if len(self.shape) != 3 or not all(int(s) > 0 for s in self.shape):
            raise ConfigError("shape", self.shape, "(C, H, W) with three positive ints")
        if len(self.class_names) != self.num_classes:
            raise ConfigError(
                "class_names", self.class_names, f"exactly num_classes = {self.num_classes} names"
            )
        if not (isinstance(self.levels, int) and 2 <= self.levels <= 256):
            raise ConfigError("levels", self.levels, "an int in [2, 256]")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))

    @property
    def dim(self) -> int:
        """Dimensions per image, ``d = C * H * W`` (for bits/dim)."""
        c, h, w = self.shape
        return c * h * w


class ImageDataset(Dataset):
    """Base class: subclasses implement :meth:`load` (uint8 ``[C, H, W]``) and :meth:`subset`.

    Attributes:
        targets: int64 tensor ``[N]`` of labels, readable without touching the images.
        transform: optional callable applied to the uint8 image (e.g. augmentation).
    """

    targets: torch.Tensor
    transform: Transform | None

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.load(index)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.targets[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """A batch's items, as ``DataLoader`` fetches them when a dataset has this method: the
        same items as ``[self[i] for i in indices]``, the labels read in one indexing."""
        labels = self.targets[torch.as_tensor(indices, dtype=torch.int64)].tolist()
        items = []
        for index, y in zip(indices, labels, strict=True):
            x = self.load(index)
            items.append((x if self.transform is None else self.transform(x), y))
        return items

    def load(self, index: int) -> torch.Tensor:
        """The untransformed uint8 image ``[C, H, W]`` at ``index``."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageDataset:
        """A dataset of the same kind holding only ``indices`` (in that order)."""
        raise NotImplementedError

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """Items per class, int64 ``[num_classes]``."""
        return torch.bincount(self.targets, minlength=num_classes)


class TensorImageDataset(ImageDataset):
    """Images held in memory.

    Args:
        images: uint8 tensor ``[N, C, H, W]``.
        targets: integer tensor ``[N]``.
        transform: optional callable on one uint8 image ``[C, H, W]``.
    """

    def __init__(
        self, images: torch.Tensor, targets: torch.Tensor, transform: Transform | None = None
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ShapeError(
                f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        targets = torch.as_tensor(targets)
        if targets.dim() != 1 or targets.shape[0] != images.shape[0]:
            raise ShapeError(
                f"targets must have shape [N] = [{images.shape[0]}], got {tuple(targets.shape)}"
            )
        self.images = images
        self.targets = targets.to(torch.int64)
        self.transform = transform

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TensorImageDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return TensorImageDataset(self.images[idx], self.targets[idx], self.transform)


_NATIVE_SUFFIXES = (".jpg", ".jpeg", ".png")  # decoded by torchvision.io without PIL


def _decode_native(path: str | Path) -> torch.Tensor | None:
    """A JPEG or PNG decoded by ``torchvision.io.decode_image`` (libjpeg-turbo / libpng, C++
    from bytes to a ``[3, H, W]`` tensor: 2-3x the images per second of PIL's decode on small
    images, where PIL's header parsing in Python dominates); ``None`` if it cannot (the caller
    falls back to PIL). torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a
    dependency here): the warning is silenced, and once they are gone PIL reads everything."""
    try:  # torchvision is imported where images are read (it costs ~1.5 s per process)
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # a torchvision without its image decoders: PIL decodes everything
        return None
    try:
        with open(path, "rb") as f:
            data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            x = decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None
    return x if x.dtype == torch.uint8 and x.shape[0] == 3 else None


def _eight_bit(img: Image.Image, path: str | Path) -> Image.Image:
    """``img`` with 8 bits per channel. PIL converts 16-bit greyscale (modes ``I;16*``, ``I``)
    to RGB by clipping at 255, which turns every level above 255 white; here the high byte is
    kept instead (as PIL does for 16-bit RGB, and libpng's ``strip_16``)."""
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    values = np.asarray(img).astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ShapeError(
            f"image {path} has {img.mode} pixels outside 0..65535 (a 32-bit integer image); "
            "convert it to 8 or 16 bits per channel"
        )
    if img.mode == "I" and (not values.size or values.max() <= 255):
        return Image.fromarray(values.astype(np.uint8), "L")
    return Image.fromarray((values >> 8).astype(np.uint8), "L")


def read_image(path: str | Path, image_size: int | None = None) -> torch.Tensor:
    """Read an image file as an RGB uint8 tensor ``[3, H, W]``.

    JPEG and PNG files at their own size are decoded by ``torchvision.io`` (the same pixels as
    PIL, several times faster on small images); other formats, and files it cannot decode, by
    PIL. 16-bit greyscale images keep the high byte of each level (not clipped at 255). With ``image_size = S`` the shorter side is resized to S (bilinear, antialiased) and
    the centre S x S crop is kept, as in ImageNet evaluation; a JPEG at least twice S is then
    decoded at 1/2, 1/4 or 1/8 scale first (libjpeg's DCT scaling, PIL's draft mode: each side
    stays >= S), which decodes an ImageNet photo for S = 32 or 64 several times faster.
    """
    if image_size is None and str(path).lower().endswith(_NATIVE_SUFFIXES):
        native = _decode_native(path)
        if native is not None:
            return native
    try:
        with Image.open(path) as img:
            if image_size is not None and img.format == "JPEG":
                img.draft("RGB", (image_size, image_size))
            arr = np.array(_eight_bit(img, path).convert("RGB"), dtype=np.uint8)  # writable
    except OSError as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    if image_size is not None:
        from torchvision.transforms.v2 import functional as F

        x = F.resize(x, [image_size], antialias=True)
        x = F.center_crop(x, [image_size, image_size])
    return x


class ImageFileDataset(ImageDataset):
    """Images read from files on access (ImageFolder trees), as RGB uint8 ``[3, H, W]``.

    Args:
        paths: one file per item.
        targets: integer labels ``[N]``.
        shape: the ``(3, H, W)`` every image must have (after ``image_size``); an image of
            another size raises :class:`~nfpi.errors.ShapeError` naming the file.
        image_size: optional side S of the resize + centre crop.
        transform: optional callable on one uint8 image.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        targets: torch.Tensor | Sequence[int],
        shape: tuple[int, int, int],
        image_size: int | None = None,
        transform: Transform | None = None,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        if self.targets.shape != (len(self.paths),):
            raise ShapeError(
                f"targets must have shape [{len(self.paths)}], got {tuple(self.targets.shape)}"
            )
        self.shape = tuple(int(s) for s in shape)
        self.image_size = image_size
        self.transform = transform

    def load(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        x = read_image(path, self.image_size)
        if tuple(x.shape) != self.shape:
            raise ShapeError(
                f"image {path} has shape {tuple(x.shape)} but the dataset's images are "
                f"{self.shape}; images of unequal sizes need image_size=S (resize + centre crop)"
            )
        return x

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageFileDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageFileDataset(
            [self.paths[i] for i in idx.tolist()],
            self.targets[idx],
            self.shape,  # type: ignore[arg-type]
            self.image_size,
            self.transform,
        )

    def to_memory(self) -> TensorImageDataset:
        """Decode every image once into a :class:`TensorImageDataset` (fast epochs for small
        images such as CIFAR: 50k x 3 x 32 x 32 bytes = 150 MB)."""
        c, h, w = self.shape
        images = torch.empty((len(self), c, h, w), dtype=torch.uint8)
        for i in range(len(self)):
            images[i] = self.load(i)
        return TensorImageDataset(images, self.targets.clone(), self.transform)


def subsample_per_class(
    targets: torch.Tensor,
    items_per_class: int,
    seed: int,
    class_names: Sequence[str],
) -> torch.Tensor:
    """Seeded per-class subsampling: indices of ``items_per_class`` items of every class.

    Class ``y`` draws its items with a generator seeded from ``(seed, y)``, so a class's subset
    depends only on the seed and on that class's items (same seed -> same subset). The result
    is sorted (original order); shuffling is the loader's job.

    Args:
        targets: int64 labels ``[N]`` in ``[0, K)``, ``K = len(class_names)``.
        items_per_class: n >= 1.
        seed: subsampling seed.
        class_names: names used in the error message.

    Returns:
        int64 tensor ``[K * n]`` of indices into ``targets``.

    Raises:
        InsufficientSamplesError: a class has fewer than n items (names the class).
    """
    if isinstance(items_per_class, bool) or not isinstance(items_per_class, int):
        raise ConfigError("items_per_class", items_per_class, "None or an int >= 1")
    if items_per_class < 1:
        raise ConfigError("items_per_class", items_per_class, "None or an int >= 1")
    chosen = []
    for y, name in enumerate(class_names):
        members = torch.nonzero(targets == y, as_tuple=True)[0]
        if members.numel() < items_per_class:
            raise InsufficientSamplesError(
                f"class {name!r} (label {y}) has {members.numel()} items, fewer than "
                f"items_per_class = {items_per_class}; lower items_per_class or use None for all"
            )
        g = torch.Generator().manual_seed(
            int(np.random.SeedSequence([seed, y]).generate_state(1)[0])
        )
        perm = torch.randperm(members.numel(), generator=g)
        chosen.append(members[perm[:items_per_class]])
    return torch.sort(torch.cat(chosen)).values


def check_dataset(dataset: ImageDataset, info: DatasetInfo, where: str) -> None:
    """Validate what can be checked cheaply: non-empty, labels in range, in-memory shapes."""
    if len(dataset) == 0:
        raise DatasetNotFoundError(f"{where} holds no images")
    lo, hi = int(dataset.targets.min()), int(dataset.targets.max())
    if lo < 0 or hi >= info.num_classes:
        raise LabelRangeError(
            f"{where}: labels span [{lo}, {hi}] but num_classes = {info.num_classes}; "
            f"labels must be in [0, {info.num_classes})"
        )
    if isinstance(dataset, TensorImageDataset) and dataset.shape != info.shape:
        raise ShapeError(f"{where}: images have shape {dataset.shape}, info says {info.shape}")
