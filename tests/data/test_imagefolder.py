"""Image-file datasets fail before training, not in the middle of an epoch (issue 22): every
header is read at indexing time (unreadable files skipped and counted), 16-bit PNGs keep their
levels, hidden folders are named when ignored, one class is refused."""

import logging

import numpy as np
import pytest
from PIL import Image

from nfpi.data import load_dataset
from nfpi.data.datasets import read_image
from nfpi.errors import ConfigError, DatasetNotFoundError


def _png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _tree(root, classes=("a", "b"), per_class=2):
    for split in ("train", "test"):
        for c in classes:
            for i in range(per_class):
                _png(root / split / c / f"{i}.png", 10 * i)
    return root


def test_unreadable_images_are_skipped_and_counted_at_indexing(tmp_path, caplog):
    """Before: only the first image of each class was opened at indexing, so a damaged file
    later in a class crashed training mid-epoch. Now every header is read: 2 bad files of 6 are
    skipped with one warning, and every item left loads."""
    root = _tree(tmp_path / "tree")
    (root / "train" / "a" / "x_garbage.png").write_bytes(b"this is not a png")
    (root / "train" / "b" / "y_empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        train, info = load_dataset("imagefolder", "train", root=root)
    assert len(train) == 4 and info.num_classes == 2
    assert "skipped 2 of 6 image files" in caplog.text
    for i in range(len(train)):
        train[i]


def test_a_class_of_only_unreadable_images_is_named(tmp_path):
    root = _tree(tmp_path / "tree")
    for f in (root / "train" / "b").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(DatasetNotFoundError, match=r"train/b holds no readable image files"):
        load_dataset("imagefolder", "train", root=root)


def test_a_16_bit_png_keeps_its_levels(tmp_path):
    """Before: PIL's conversion clipped 16-bit grey levels at 255 (everything above 255/65535
    came out white). Now the high byte is kept, as for 16-bit RGB."""
    levels = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode == "I;16"
    x = read_image(path)
    expected = (levels >> 8).astype(np.uint8)
    for channel in range(3):
        assert np.array_equal(x[channel].numpy(), expected)


def test_hidden_folders_are_ignored_with_a_word(tmp_path, caplog):
    root = _tree(tmp_path / "tree")
    _png(root / "train" / ".ipynb_checkpoints" / "0.png")
    with caplog.at_level(logging.WARNING):
        _, info = load_dataset("imagefolder", "train", root=root)
    assert info.class_names == ("a", "b")
    assert "ignoring 1 hidden folder(s) .ipynb_checkpoints" in caplog.text


def test_one_class_is_refused_up_front(tmp_path):
    """Before: K = 1 was accepted and the run crashed later, in the plots."""
    root = _tree(tmp_path / "tree", classes=("only",))
    with pytest.raises(DatasetNotFoundError, match=r"one class folder \(only\).*at least 2"):
        load_dataset("imagefolder", "train", root=root)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        load_dataset("synthetic", "train", num_classes=1, items_per_class=4)
