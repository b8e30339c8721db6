"""Tests of nfpi.data: datasets, archives, augmentation, dequantisation, loaders.

Self-contained: image trees and archives are built in tmp_path; nothing reads /work/shared.
"""

from __future__ import annotations

import dataclasses
import io
import math
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from nfpi.data import (
    DatasetInfo,
    TensorImageDataset,
    UnsafeArchiveError,
    bits_per_dim,
    class_pattern,
    dequantization_offset,
    dequantize,
    digits_split_indices,
    epoch_seed,
    extract_archive,
    load_dataset,
    make_loader,
    paper_augmentation,
    set_loader_epoch,
    subsample_per_class,
    to_uint8,
)
from nfpi.errors import (
    ConfigError,
    DatasetNotFoundError,
    InsufficientSamplesError,
    LabelRangeError,
    ShapeError,
)

# --------------------------------------------------------------------------- helpers


def _pixels(seed: int, size: tuple[int, int] = (8, 8), mode: str = "RGB") -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _write_image(path: Path, seed: int, size=(8, 8), mode="RGB") -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = _pixels(seed, size, mode)
    Image.fromarray(arr, mode=mode).save(path)
    return arr


def _make_tree(root: Path, test_dir: str = "test", size=(8, 8)) -> Path:
    """root/{train,<test_dir>}/{cat,dog,ant}: PNG and JPEG, one grayscale PNG."""
    for split, n in (("train", 3), (test_dir, 2)):
        for ci, cls in enumerate(["cat", "dog", "ant"]):
            for i in range(n):
                ext = "png" if i % 2 == 0 else "jpg"
                _write_image(root / split / cls / f"{i:03d}.{ext}", seed=100 * ci + i, size=size)
    _write_image(root / "train" / "dog" / "gray.png", seed=7, size=size, mode="L")
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return root


def _tar(tar_path: Path, src: Path, arcname: str) -> Path:
    with tarfile.open(tar_path, "w:gz") as tf:
        tf.add(src, arcname=arcname)
    return tar_path


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtype_labels_and_counts():
    train, info = load_dataset("digits", "train")
    test, _ = load_dataset("digits", "test")
    assert info == DatasetInfo("digits", 10, (1, 8, 8), tuple("0123456789"), levels=17)
    assert info.dim == 64
    assert (len(train), len(test)) == (1437, 360)
    x, y = train[5]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 8, 8)
    assert isinstance(y, int) and 0 <= y < 10
    for ds in (train, test):
        assert ds.targets.min() >= 0 and ds.targets.max() <= 9
    # stratified: every class has ~80 % / 20 % of its 174..183 images
    tr, te = train.class_counts(10), test.class_counts(10)
    assert (tr >= 139).all() and (te >= 34).all() and (te <= 37).all()
    assert abs(te.sum().item() / (tr + te).sum().item() - 0.2) < 0.001


def test_digits_values_split_disjoint_and_deterministic():
    from sklearn.datasets import load_digits

    train_idx, test_idx = digits_split_indices()
    assert len(np.intersect1d(train_idx, test_idx)) == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(1797))
    raw = load_digits().images
    test, _ = load_dataset("digits", "test")
    # the 17 grey levels 0..16 are kept as uint8 level indices (dequantised with 17 bins)
    expected = raw[test_idx].astype(np.uint8)
    assert np.array_equal(test.images[:, 0].numpy(), expected)
    assert int(test.images.max()) == 16 and int(test.images.min()) == 0
    # the split does not move with the run seed
    test_seed7, _ = load_dataset("digits", "test", seed=7)
    assert torch.equal(test.images, test_seed7.images)
    assert torch.equal(test.targets, test_seed7.targets)


# --------------------------------------------------------------------------- items_per_class


def test_items_per_class_is_exact_and_seeded():
    a, info = load_dataset("digits", "train", items_per_class=20, seed=3)
    b, _ = load_dataset("digits", "train", items_per_class=20, seed=3)
    c, _ = load_dataset("digits", "train", items_per_class=20, seed=4)
    assert len(a) == 200 and a.class_counts(10).tolist() == [20] * 10
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    full, _ = load_dataset("digits", "train")
    # the subset consists of real items of the full split
    keep = subsample_per_class(full.targets, 20, 3, info.class_names)
    assert torch.equal(full.images[keep], a.images)


def test_items_per_class_too_many_names_the_class():
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(InsufficientSamplesError, match=r"'bee'.*label 1.*2 items"):
        subsample_per_class(targets, 3, 0, ["ant", "bee", "cat"])
    with pytest.raises(InsufficientSamplesError, match="items_per_class = 500"):
        load_dataset("digits", "test", items_per_class=500)
    with pytest.raises(ConfigError) as err:
        load_dataset("digits", "train", items_per_class=0)
    assert err.value.field == "items_per_class"


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_tree_labels_pixels_and_gray(tmp_path):
    root = _make_tree(tmp_path / "tree")
    train, info = load_dataset("imagefolder", "train", root=root)
    test, info_test = load_dataset("imagefolder", "test", root=root)
    assert info.class_names == ("ant", "cat", "dog")  # sorted folder names
    assert info == info_test
    assert info.shape == (3, 8, 8) and info.num_classes == 3
    assert len(train) == 10 and len(test) == 6  # txt file ignored, gray image kept
    assert train.class_counts(3).tolist() == [3, 3, 4]
    for i in range(len(train)):
        x, y = train[i]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 8, 8)
        assert info.class_names[y] == train.paths[i].parent.name
    # a PNG round-trips exactly: "cat" (seed 100 * 0), file 000.png, label 1
    i = train.paths.index(root / "train" / "cat" / "000.png")
    x, y = train[i]
    assert y == 1 and torch.equal(x, torch.from_numpy(_pixels(0)).permute(2, 0, 1))
    # grayscale becomes RGB with three equal channels
    x, _ = train[train.paths.index(root / "train" / "dog" / "gray.png")]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    # in-memory copy is identical to the lazy reads
    mem, _ = load_dataset("imagefolder", "train", root=root, in_memory=True)
    assert isinstance(mem, TensorImageDataset)
    assert all(torch.equal(mem[i][0], train[i][0]) for i in range(len(train)))


def test_imagefolder_val_instead_of_test(tmp_path):
    root = _make_tree(tmp_path / "imagenet", test_dir="val")
    test, info = load_dataset("imagefolder", "test", root=root)
    assert len(test) == 6 and info.class_names == ("ant", "cat", "dog")


def test_imagefolder_from_tar_gz_extracts_once(tmp_path, monkeypatch):
    src = _make_tree(tmp_path / "src" / "tiny")
    archive = _tar(tmp_path / "tiny-jpeg.tar.gz", src, "tiny")  # top folder tiny/
    cache = tmp_path / "cache"
    train, info = load_dataset("imagefolder", "train", root=archive, extract_to=cache)
    assert len(train) == 10 and info.name == "imagefolder/tiny"
    assert train.paths[0].is_relative_to(cache)
    lazy, _ = load_dataset("imagefolder", "train", root=src)
    assert all(torch.equal(train[i][0], lazy[i][0]) for i in range(len(train)))
    (extracted,) = [p for p in cache.iterdir()]

    def no_reopen(*args, **kwargs):
        raise AssertionError("archive extracted a second time")

    monkeypatch.setattr(tarfile, "open", no_reopen)
    again, _ = load_dataset("imagefolder", "test", root=archive, extract_to=cache)
    assert len(again) == 6 and again.paths[0].is_relative_to(extracted)


def test_archive_cache_env_and_default_next_to_archive(tmp_path, monkeypatch):
    src = _make_tree(tmp_path / "src")
    archive = tmp_path / "data" / "flat.tgz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tf:  # tree at the archive's top level
        for child in sorted(src.iterdir()):
            tf.add(child, arcname=child.name)
    monkeypatch.setenv("NFPI_DATA_CACHE", str(tmp_path / "envcache"))
    dest = extract_archive(archive)
    assert dest.parent == tmp_path / "envcache" and (dest / "train" / "cat").is_dir()
    monkeypatch.delenv("NFPI_DATA_CACHE")
    dest2 = extract_archive(archive)
    assert dest2.parent == archive.parent / ".nfpi-cache"
    ds, _ = load_dataset("imagefolder", "test", root=archive)
    assert len(ds) == 6


def _evil_archive(path: Path, kind: str) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("tree/train/a/ok.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        if kind == "dotdot":
            bad = tarfile.TarInfo("tree/../../evil.png")
            bad.size = 4
            tf.addfile(bad, io.BytesIO(b"evil"))
        elif kind == "absolute":
            bad = tarfile.TarInfo(str(path.parent / "abs-evil.png"))
            bad.size = 4
            tf.addfile(bad, io.BytesIO(b"evil"))
        else:
            bad = tarfile.TarInfo("tree/link")
            bad.type = tarfile.SYMTYPE
            bad.linkname = "../../../etc"
            tf.addfile(bad)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("dotdot", "outside the extraction folder"),
        ("absolute", "outside the extraction folder"),
        ("symlink", "which is a symbolic link"),
    ],
)
def test_archive_rejects_escaping_members(tmp_path, kind, message):
    archive = _evil_archive(tmp_path / "evil.tar.gz", kind)
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError, match=message):
        load_dataset("imagefolder", "train", root=archive, extract_to=cache)
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "abs-evil.png").exists()
    assert not cache.exists()  # partial extraction removed, no empty cache folder left


def test_imagefolder_unequal_sizes(tmp_path):
    root = tmp_path / "mixed"
    _write_image(root / "train" / "a" / "0.png", 0, size=(8, 8))
    _write_image(root / "train" / "b" / "0.png", 1, size=(12, 10))
    with pytest.raises(ShapeError, match="image_size"):
        load_dataset("imagefolder", "train", root=root)
    ds, info = load_dataset("imagefolder", "train", root=root, image_size=6)
    assert info.shape == (3, 6, 6) and all(tuple(ds[i][0].shape) == (3, 6, 6) for i in (0, 1))
    # every image's header is probed (issue 22): a later odd size fails at indexing, naming
    # the file, not in the middle of an epoch
    root2 = tmp_path / "late"
    _write_image(root2 / "train" / "a" / "0.png", 0)
    _write_image(root2 / "train" / "a" / "1.png", 1, size=(9, 9))
    _write_image(root2 / "train" / "b" / "0.png", 1)
    with pytest.raises(ShapeError, match=r"1\.png"):
        load_dataset("imagefolder", "train", root=root2)


def test_imagefolder_missing_paths_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetNotFoundError, match=str(missing)):
        load_dataset("imagefolder", "train", root=missing)
    root = tmp_path / "only_train"
    _write_image(root / "train" / "a" / "0.png", 0)
    with pytest.raises(DatasetNotFoundError, match=r"test or val") as err:
        load_dataset("imagefolder", "test", root=root)
    assert str(root) in str(err.value) and "<class name>" in str(err.value)
    empty_class = tmp_path / "empty"
    _write_image(empty_class / "train" / "a" / "0.png", 0)
    (empty_class / "train" / "b").mkdir()
    with pytest.raises(DatasetNotFoundError, match=str(empty_class / "train" / "b")):
        load_dataset("imagefolder", "train", root=empty_class)
    no_tree = tmp_path / "flat"
    _write_image(no_tree / "a" / "0.png", 0)
    with pytest.raises(DatasetNotFoundError, match="no train/test/val"):
        load_dataset("imagefolder", "train", root=no_tree)
    not_archive = tmp_path / "x.zip"
    not_archive.write_bytes(b"PK")
    with pytest.raises(DatasetNotFoundError, match="archive"):
        load_dataset("imagefolder", "train", root=not_archive)
    with pytest.raises(ConfigError) as cerr:
        load_dataset("imagefolder", "train")
    assert cerr.value.field == "root"


def test_imagefolder_test_classes_must_match_train(tmp_path):
    root = _make_tree(tmp_path / "tree")
    _write_image(root / "test" / "zebra" / "0.png", 0)
    with pytest.raises(DatasetNotFoundError, match=r"extra: \['zebra'\]"):
        load_dataset("imagefolder", "test", root=root)


# --------------------------------------------------------------------------- cifar offline


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_offline_without_files(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, "train", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "download=True" in msg and "imagefolder" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_cifar_download_failure_offline(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError, match="no network") as err:
        load_dataset("cifar10", "test", root=tmp_path, download=True)
    assert "cifar-10-python.tar.gz" in str(err.value)


def test_cifar_default_root_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NFPI_DATA_ROOT", str(tmp_path / "envroot"))
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "envroot")):
        load_dataset("cifar10", "test")


# --------------------------------------------------------------------------- config errors


def test_bad_name_split_and_misplaced_options():
    with pytest.raises(ConfigError) as err:
        load_dataset("mnist", "train")
    assert err.value.field == "name" and "cifar10" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_dataset("digits", "val")
    assert err.value.field == "split" and "'test'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_dataset("digits", "test", augment=True)
    assert err.value.field == "augment"
    for kwargs in (
        {"image_size": 8},
        {"num_classes": 3},
        {"download": True},
        {"in_memory": True},
    ):
        with pytest.raises(ConfigError) as err:
            load_dataset("digits", "train", **kwargs)
        assert err.value.field == next(iter(kwargs))


def test_dataset_info_is_frozen_and_validated():
    info = DatasetInfo("x", 2, (3, 4, 4), ("a", "b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_classes = 3  # type: ignore[misc]
    with pytest.raises(ConfigError):
        DatasetInfo("x", 2, (3, 4, 4), ("a",))
    with pytest.raises(ConfigError):
        DatasetInfo("x", 2, (4, 4), ("a", "b"))


def test_label_range_is_checked():
    from nfpi.data.datasets import check_dataset

    ds = TensorImageDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 2]))
    with pytest.raises(LabelRangeError, match=r"\[0, 2\]"):
        check_dataset(ds, DatasetInfo("x", 2, (1, 2, 2), ("a", "b")), "x")
    with pytest.raises(ShapeError):
        TensorImageDataset(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]))


# --------------------------------------------------------------------------- dequantisation


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantize_range_and_exact_round_trip(dtype):
    k = torch.arange(256, dtype=torch.uint8).repeat(200)
    g = torch.Generator().manual_seed(0)
    x = dequantize(k, g, dtype=dtype)
    assert x.dtype == dtype and x.shape == k.shape
    assert x.min() >= -1.0 and x.max() < 1.0
    lo = k.to(dtype) / 128 - 1
    assert (x >= lo).all() and (x < lo + 1 / 128).all()  # pixel k's own bin
    assert torch.equal(to_uint8(x), k)
    # the extremes of the noise: u = 0 and the largest float below 1 (rounds up if unclamped)
    kk = torch.arange(256, dtype=torch.uint8)
    for u in (0.0, 1.0 - torch.finfo(dtype).eps / 2):
        xu = dequantize(kk, dtype=dtype, noise=torch.full(kk.shape, u, dtype=dtype))
        assert torch.equal(to_uint8(xu), kk), u
        assert xu.max() < 1.0
    # noise mean: average over draws sits at the bin centres (k + 0.5) / 128 - 1
    centre = (k.to(torch.float64) + 0.5) / 128 - 1
    assert abs((x.double() - centre).mean().item()) < 2e-4


def test_dequantize_is_seeded_and_validates():
    k = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    a = dequantize(k, torch.Generator().manual_seed(5))
    b = dequantize(k, torch.Generator().manual_seed(5))
    c = dequantize(k, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ShapeError, match="uint8"):
        dequantize(k.float())
    with pytest.raises(ConfigError):
        dequantize(k, dtype=torch.float16)
    with pytest.raises(ConfigError):
        dequantize(k, noise=torch.ones(k.shape))


def test_to_uint8_top_bottom_and_clamping():
    x = torch.tensor([-1.0, -1.5, 1.0, 2.0, 0.0, -1e-30, 1.0 - 2**-24, float("nan")])
    assert to_uint8(x).tolist() == [0, 0, 255, 255, 128, 127, 255, 0]
    # bin edges: x = k/128 - 1 is the bottom of pixel k's bin
    k = torch.arange(256)
    assert torch.equal(to_uint8(k.double() / 128 - 1), k.to(torch.uint8))
    with pytest.raises(ShapeError):
        to_uint8(torch.zeros(3, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantize_17_levels_round_trip_and_bins(dtype):
    k = torch.arange(17, dtype=torch.uint8).repeat(2000)
    x = dequantize(k, torch.Generator().manual_seed(0), dtype=dtype, levels=17)
    lo = 2 * k.to(dtype) / 17 - 1
    assert (x >= lo).all() and (x < lo + 2 / 17).all() and x.max() < 1.0
    assert torch.equal(to_uint8(x, 17), k)
    kk = torch.arange(17, dtype=torch.uint8)
    for u in (0.0, 1.0 - torch.finfo(dtype).eps / 2):
        xu = dequantize(kk, dtype=dtype, noise=torch.full(kk.shape, u, dtype=dtype), levels=17)
        assert torch.equal(to_uint8(xu, 17), kk), u
    assert to_uint8(torch.tensor([-2.0, 1.0, 5.0]), 17).tolist() == [0, 16, 16]
    with pytest.raises(ConfigError):
        dequantize(torch.tensor([17], dtype=torch.uint8), levels=17)
    with pytest.raises(ConfigError):
        dequantize(kk, levels=1)


def test_offset_17_levels_uniform_costs_log2_17_bits():
    d = 64
    nll = d * math.log(2.0)  # uniform density on [-1, 1]^d
    bpd = bits_per_dim(nll + dequantization_offset(d, 17), d)
    assert bpd == pytest.approx(math.log2(17), rel=1e-14)
    assert dequantization_offset(d, 256) == dequantization_offset(d)


def test_bits_per_dim_and_offset_hand_calculation():
    d = 3 * 32 * 32
    assert dequantization_offset(d) == pytest.approx(3072 * 4.852030263919617, rel=1e-15)
    # uniform density on [-1, 1]^d: -log p = d log 2; with the offset it costs 8 bits/dim
    nll = d * math.log(2.0)
    assert bits_per_dim(nll, d) == pytest.approx(1.0, rel=1e-15)
    assert bits_per_dim(nll + dequantization_offset(d), d) == pytest.approx(8.0, rel=1e-14)
    # per-sample tensors
    t = torch.tensor([nll, 2 * nll], dtype=torch.float64) + dequantization_offset(d)
    assert torch.allclose(bits_per_dim(t, d), torch.tensor([8.0, 9.0], dtype=torch.float64))
    # the offset is the log-Jacobian of x = (t - 128) / 128: a uniform density on the pixel
    # range [0, 256)^d has -log p_t = d log 256 = (-log p_x) + d log 128
    assert nll + dequantization_offset(d) == pytest.approx(d * math.log(256.0), rel=1e-14)
    for bad in (0, -3, 2.5):
        with pytest.raises(ConfigError):
            bits_per_dim(1.0, bad)


# --------------------------------------------------------------------------- augmentation


def test_paper_augmentation_keeps_shape_and_changes_pixels():
    x = torch.from_numpy(_pixels(1, (32, 32))).permute(2, 0, 1).contiguous()
    aug = paper_augmentation((3, 32, 32))
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b)
    assert (a != x).float().mean() > 0.3
    kinds = [type(t) for t in aug.transforms]
    assert v2.RandomHorizontalFlip in kinds and v2.ColorJitter in kinds
    assert v2.RandomRotation in kinds


def test_digits_augmentation_no_flip_no_colour():
    ds, _ = load_dataset("digits", "train", augment=True)
    kinds = [type(t) for t in ds.transform.transforms]
    assert v2.RandomHorizontalFlip not in kinds and v2.ColorJitter not in kinds
    torch.manual_seed(1)
    changed = 0
    for i in range(20):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 8, 8)
        assert y == int(ds.targets[i])
        changed += int(not torch.equal(x, ds.images[i]))
    assert changed >= 10
    with pytest.raises(ConfigError):
        paper_augmentation((1, 8, 8), color=True)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_classes_separable():
    a, info = load_dataset("synthetic", "train", num_classes=4, shape=(3, 8, 8), seed=1)
    b, _ = load_dataset("synthetic", "train", num_classes=4, shape=(3, 8, 8), seed=1)
    c, _ = load_dataset("synthetic", "train", num_classes=4, shape=(3, 8, 8), seed=2)
    t, _ = load_dataset("synthetic", "test", num_classes=4, shape=(3, 8, 8), seed=1)
    assert info.shape == (3, 8, 8) and info.num_classes == 4
    assert len(a) == 4 * 64 and len(t) == 4 * 16
    assert a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert not torch.equal(a.images[:64], t.images[:64])
    small, _ = load_dataset("synthetic", "test", items_per_class=5)
    assert small.class_counts(10).tolist() == [5] * 10
    # nearest class pattern recovers the label of (almost) every test image
    patterns = torch.stack([class_pattern(y, (3, 8, 8)) for y in range(4)]).flatten(1)
    dist = torch.cdist(t.images.flatten(1).double() / 255, patterns)
    assert (dist.argmin(1) == t.targets).float().mean() > 0.95


# --------------------------------------------------------------------------- loaders


def test_make_loader_is_seeded_per_epoch():
    ds, _ = load_dataset("synthetic", "train", num_classes=3, shape=(1, 4, 4), items_per_class=10)

    loader = make_loader(ds, 8, shuffle=True, seed=0)
    x, y = next(iter(loader))
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 4, 4) and y.dtype == torch.int64
    assert len(loader) == 3  # drop_last defaults to shuffle: 30 items -> 3 full batches

    def labels(seed, epoch):
        loader = make_loader(ds, 30, shuffle=True, seed=seed, epoch=epoch)
        return next(iter(loader))[1].tolist()

    assert labels(0, 0) == labels(0, 0)
    assert labels(0, 0) != labels(0, 1) and labels(0, 0) != labels(1, 0)
    # resuming: a loader reseeded for epoch 2 replays what a fresh epoch-2 loader yields
    loader = make_loader(ds, 30, shuffle=True, seed=0)
    for _ in loader:
        pass
    set_loader_epoch(loader, 0, 2)
    assert next(iter(loader))[1].tolist() == labels(0, 2)
    # evaluation: dataset order, last partial batch kept
    ev = make_loader(ds, 8, shuffle=False, seed=0)
    assert len(ev) == 4 and torch.cat([y for _, y in ev]).tolist() == ds.targets.tolist()
    assert epoch_seed(0, 1) != epoch_seed(1, 0)
    with pytest.raises(ConfigError) as err:
        make_loader(ds, 8, shuffle=True, seed=-1)
    assert err.value.field == "seed"
    with pytest.raises(ConfigError):
        make_loader(ds, 0, shuffle=True, seed=0)


def test_worker_augmentation_reproducible_from_seed():
    ds, _ = load_dataset("digits", "train", augment=True, items_per_class=4)

    def batch(epoch):
        loader = make_loader(ds, 40, shuffle=True, seed=0, epoch=epoch, num_workers=1)
        return next(iter(loader))[0]

    assert torch.equal(batch(0), batch(0))
    assert not torch.equal(batch(0), batch(1))


# --------------------------------------------------------------------------- library hygiene


@pytest.mark.slow  # imports in a subprocess
def test_data_library_imports_without_ray_or_mlflow():
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"
        "sys.modules['mlflow'] = None\n"
        "import nfpi.data\n"
        "assert 'ray' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
