"""ImageFolder trees (ImageNet layout), as folders or tar archives."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from nfpi.data.archive import ARCHIVE_SUFFIXES, extract_archive, is_archive
from nfpi.data.datasets import DatasetInfo, ImageFileDataset
from nfpi.errors import ConfigError, DatasetNotFoundError, ShapeError

__all__ = ["find_tree", "layout", "load_imagefolder"]

logger = logging.getLogger(__name__)


def _extensions() -> tuple[str, ...]:
    """The image extensions torchvision's ImageFolder reads (imported on use: importing
    torchvision costs every Ray worker ~1.5 s, and digits runs never read a file)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS)


def layout() -> str:
    """The tree this loader reads, as error messages and the docs state it."""
    return (
        "root/{train,test}/<class name>/<image files> (the test split may be named 'val', as "
        f"in ImageNet; image extensions {', '.join(_extensions())}; root may also be a "
        f"{'/'.join(ARCHIVE_SUFFIXES)} archive of such a tree)"
    )


_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_split(path: Path) -> bool:
    return any((path / d).is_dir() for d in ("train", "test", "val"))


def find_tree(
    root: str | os.PathLike[str], extract_to: str | os.PathLike[str] | None = None
) -> Path:
    """Locate the tree holding ``train/`` and ``test/`` (or ``val/``).

    ``root`` is either that tree, a folder with exactly one such tree inside (an extracted
    archive whose top folder is e.g. ``cifar10/``), or a tar archive of either, which is
    extracted once (see :func:`nfpi.data.archive.extract_archive`).
    """
    path = Path(root).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"imagefolder root {path} does not exist; expected {layout()}")
    if path.is_file():
        if not is_archive(path):
            raise DatasetNotFoundError(
                f"imagefolder root {path} is a file but not a {'/'.join(ARCHIVE_SUFFIXES)} "
                f"archive; expected {layout()}"
            )
        path = extract_archive(path, extract_to)
    if _has_split(path):
        return path
    inner = [d for d in _visible_dirs(path) if _has_split(d)]
    if len(inner) == 1:
        return inner[0]
    if inner:
        raise DatasetNotFoundError(
            f"{path} holds several trees {[d.name for d in inner]}; pass one of them as root"
        )
    found = ", ".join(d.name for d in _visible_dirs(path)[:10]) or "no folders"
    raise DatasetNotFoundError(
        f"no train/test/val folders in {path} nor in a single sub-folder of it (found: {found}); "
        f"expected {layout()}"
    )


def _split_dir(tree: Path, split: str) -> Path:
    for name in _SPLIT_DIRS[split]:
        if (tree / name).is_dir():
            return tree / name
    raise DatasetNotFoundError(
        f"split {split!r} not found in {tree}: no folder {' or '.join(_SPLIT_DIRS[split])}; "
        f"expected {layout()}"
    )


def _classes(split_dir: Path) -> list[str]:
    classes = [d.name for d in _visible_dirs(split_dir)]
    if not classes:
        raise DatasetNotFoundError(f"no class folders in {split_dir}; expected {layout()}")
    hidden = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name.startswith("."))
    if hidden:
        logger.warning(
            "%s: ignoring %d hidden folder(s) %s (names starting with '.' are not classes; "
            "rename them to use them)",
            split_dir, len(hidden), ", ".join(hidden[:5]) + (" ..." if len(hidden) > 5 else ""),
        )  # fmt: skip
    return classes


def _image_files(class_dir: Path) -> list[Path]:
    files, extensions = [], _extensions()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(extensions)
        )
    return sorted(files)


#: Threads that read image headers at indexing time (file system latency, not CPU, dominates).
PROBE_THREADS = 16


def _header(path: Path) -> tuple[int, int] | str:
    """The (width, height) of the image at ``path`` from its header, or why it cannot be read."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as img:
            width, height = img.size
        return (width, height) if width > 0 and height > 0 else f"size {width}x{height}"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return " ".join(str(err).split())[:100] or type(err).__name__


def _probe(paths: list[Path]) -> list[tuple[int, int] | str]:
    """:func:`_header` of every file, read by :data:`PROBE_THREADS` threads."""
    if len(paths) < 64:
        return [_header(p) for p in paths]
    with ThreadPoolExecutor(PROBE_THREADS) as pool:
        return list(pool.map(_header, paths, chunksize=256))


def _probe_shape(
    sizes: dict[tuple[int, int], Path], image_size: int | None
) -> tuple[int, int, int]:
    """The image shape: ``image_size`` when given, else the one size of every image; unequal
    sizes without ``image_size`` are an error now rather than in the middle of an epoch."""
    if image_size is not None:
        return (3, image_size, image_size)
    if len(sizes) > 1:
        examples = "; ".join(f"{p} is {w}x{h}" for (w, h), p in list(sizes.items())[:3])
        raise ShapeError(
            f"images of unequal sizes ({examples}); pass image_size=S to resize the shorter "
            "side to S and centre-crop S x S"
        )
    (w, h), _ = next(iter(sizes.items()))
    return (3, h, w)


def load_imagefolder(
    root: str | os.PathLike[str],
    split: str,
    *,
    image_size: int | None = None,
    extract_to: str | os.PathLike[str] | None = None,
) -> tuple[ImageFileDataset, DatasetInfo]:
    """Load one split of an ImageFolder tree as RGB uint8 images ``[3, H, W]``.

    Every image's header is read once here (size, format; :data:`PROBE_THREADS` threads):
    files that cannot be read are skipped with one warning giving their count, and images of
    unequal sizes without ``image_size`` are an error, before any training. At least two class
    folders are required.

    Class index = position of the class folder in the sorted list of the train split's class
    folders; the test split must have the same class folders (else an error), so labels mean
    the same thing in both splits.

    Args:
        root: tree, folder holding one tree, or tar archive of either (see :func:`layout`).
        split: ``"train"`` or ``"test"`` (``test/``, else ``val/``).
        image_size: side S of an optional resize (shorter side) + centre crop, for trees whose
            images differ in size; without it all images must have one size.
        extract_to: base folder for extracting an archive (default: ``$NFPI_DATA_CACHE`` or
            next to the archive).

    Returns:
        A lazily reading :class:`ImageFileDataset` (``.to_memory()`` decodes it once) and its
        :class:`DatasetInfo`.
    """
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ConfigError("image_size", image_size, "None or an int >= 1 (side of the crop)")
    tree = find_tree(root, extract_to)
    split_dir = _split_dir(tree, split)
    classes = _classes(split_dir)
    if split != "train":
        if (tree / "train").is_dir():
            train_classes = _classes(tree / "train")
            if classes != train_classes:
                missing = sorted(set(train_classes) - set(classes))
                extra = sorted(set(classes) - set(train_classes))
                raise DatasetNotFoundError(
                    f"{split_dir} does not have the class folders of {tree / 'train'} "
                    f"(missing: {missing[:10]}, extra: {extra[:10]}); both splits need the same "
                    "class folders so that a label means the same class in each"
                )
        else:
            logger.warning(
                "%s has no train/ folder: class indices follow the sorted folders of %s",
                tree,
                split_dir,
            )
    if len(classes) < 2:
        raise DatasetNotFoundError(
            f"{split_dir} holds one class folder ({classes[0]}): a class-conditional flow needs "
            "at least 2 classes (K >= 2), one folder per class; add the others"
        )
    per_class = [_image_files(split_dir / name) for name in classes]
    headers = _probe([f for files in per_class for f in files])
    paths: list[Path] = []
    targets: list[int] = []
    sizes: dict[tuple[int, int], Path] = {}
    bad: list[tuple[Path, str]] = []
    i = 0
    for y, (name, files) in enumerate(zip(classes, per_class, strict=True)):
        kept = 0
        for path, header in zip(files, headers[i : i + len(files)], strict=True):
            if isinstance(header, str):
                bad.append((path, header))
                continue
            sizes.setdefault(header, path)
            paths.append(path)
            targets.append(y)
            kept += 1
        i += len(files)
        if not kept:
            raise DatasetNotFoundError(
                f"class folder {split_dir / name} holds no readable image files"
                + (f" ({len(files)} unreadable, e.g. {bad[-1][0]}: {bad[-1][1]})" if files else "")
                + f"; expected {layout()}"
            )
    if bad:
        logger.warning(
            "%s: skipped %d of %d image files whose headers cannot be read (e.g. %s: %s)",
            split_dir, len(bad), len(bad) + len(paths), bad[0][0], bad[0][1],
        )  # fmt: skip
    shape = _probe_shape(sizes, image_size)
    info = DatasetInfo(
        name=f"imagefolder/{tree.name}",
        num_classes=len(classes),
        shape=shape,
        class_names=tuple(classes),
    )
    logger.info(
        "imagefolder %s/%s: %d images, %d classes, shape %s",
        tree,
        split_dir.name,
        len(paths),
        len(classes),
        shape,
    )
    return ImageFileDataset(paths, targets, shape, image_size), info
