"""The data path that scales: generated ImageFolder trees, the decoded uint8 cache (one process
and rank blocks), JPEG draft decoding, and the sharding of an ImageNet-shaped tree over 16
ranks (disjoint, complete, deterministic per epoch)."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as F

import nfpi.data.cache as cache_module
import nfpi.data.datasets as datasets_module
from nfpi.config import DataConfig
from nfpi.data import (
    DecodedCache,
    TensorImageDataset,
    decoded_dataset,
    load_dataset,
    make_synthetic,
    read_image,
    write_imagefolder,
)
from nfpi.data.cache import block
from nfpi.data.sharding import EpochShardSampler, IndexedDataset, ShardSampler
from nfpi.errors import ConfigError, DatasetNotFoundError
from nfpi.presets import experiment_config
from nfpi.training import Trainer, is_wall_clock


def _pixels(dataset):
    return torch.stack([dataset.load(i) for i in range(len(dataset))])


def test_write_imagefolder_is_make_synthetic_as_files(tmp_path):
    root = write_imagefolder(
        tmp_path / "tree", num_classes=12, shape=(3, 8, 8), train_per_class=2, suffix=".png"
    )
    train, info = load_dataset("imagefolder", "train", root=root)
    test, _ = load_dataset("imagefolder", "test", root=root)
    want, _ = make_synthetic("train", num_classes=12, shape=(3, 8, 8), items_per_class=2)
    assert info.num_classes == 12 and info.class_names[11] == "class_0011" and len(test) == 12
    assert torch.equal(train.targets, want.targets)  # folder order is label order
    assert torch.equal(_pixels(train), want.images)  # PNG is lossless
    with pytest.raises(ConfigError, match="RGB"):
        write_imagefolder(tmp_path / "grey", shape=(1, 8, 8))


# ------------------------------------------------------------------------------ decoded cache
@pytest.fixture
def jpeg_tree(tmp_path):
    return write_imagefolder(tmp_path / "tree", num_classes=5, shape=(3, 8, 8), train_per_class=4)


def test_decoded_cache_equals_the_files_and_later_runs_do_not_decode(
    jpeg_tree, tmp_path, monkeypatch
):
    files, _ = load_dataset("imagefolder", "train", root=jpeg_tree)
    cached = decoded_dataset(files, tmp_path / "cache")
    assert isinstance(cached, TensorImageDataset)
    assert torch.equal(cached.images, _pixels(files)) and torch.equal(cached.targets, files.targets)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert (folder / "images.u8").stat().st_size == len(files) * 3 * 8 * 8
    assert not list(folder.glob("*.partial")) and not list(folder.glob("done-*"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded a file although the cache is complete")

    monkeypatch.setattr(datasets_module, "read_image", no_decoding)
    again = decoded_dataset(files, tmp_path / "cache")
    assert torch.equal(again.images, cached.images)
    # Another subset (or image size) is another cache: it must decode, so it fails here.
    with pytest.raises(AssertionError, match="decoded a file"):
        decoded_dataset(files.subset([0, 1, 2]), tmp_path / "cache")
    assert decoded_dataset(cached, tmp_path / "cache") is cached  # in memory already


def test_rank_blocks_build_the_same_cache_and_a_missing_block_is_named(jpeg_tree, tmp_path):
    files, _ = load_dataset("imagefolder", "train", root=jpeg_tree)
    cache = DecodedCache(tmp_path / "cache", files)
    assert cache.state() == "build"
    cache.prepare()
    for rank in (2, 0):  # rank 1 never runs (e.g. its node wrote to a disk of its own)
        cache.fill(rank, 3)
    with pytest.raises(DatasetNotFoundError, match=r"ranks \[1\].*every node reaches"):
        cache.finish(3)
    with pytest.raises(DatasetNotFoundError, match="missing or incomplete"):
        cache.open()
    cache.fill(1, 3, num_workers=2, batch_size=3)  # DataLoader worker processes decode
    cache.finish(3)
    assert cache.state() == "ready"
    assert torch.equal(cache.open().images, _pixels(files))


def test_cache_that_does_not_fit_is_skipped_with_a_warning(
    jpeg_tree, tmp_path, monkeypatch, caplog
):
    files, _ = load_dataset("imagefolder", "train", root=jpeg_tree)
    full = type("Usage", (), {"free": 10})()
    monkeypatch.setattr(cache_module.shutil, "disk_usage", lambda path: full)
    with caplog.at_level(logging.WARNING, logger="nfpi.data.cache"):
        assert decoded_dataset(files, tmp_path / "cache") is files
    assert "does not fit" in caplog.text


def test_block_partition_is_contiguous_disjoint_and_complete():
    for n, world in ((10, 3), (1281, 16), (5, 8)):
        blocks = [block(n, r, world) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(ConfigError):
        block(10, 3, 3)


def test_data_config_allows_the_cache_for_image_files_only():
    assert DataConfig(name="imagefolder", root="/data", decode_cache=True).decode_cache
    with pytest.raises(ConfigError) as err:
        DataConfig(name="digits", decode_cache=True)
    assert err.value.field == "decode_cache"
    with pytest.raises(ConfigError) as err:
        DataConfig(name="imagefolder", root="/data", cache_dir="/tmp/c")
    assert err.value.field == "cache_dir"
    with pytest.raises(ConfigError, match="choose one") as err:
        DataConfig(name="imagefolder", root="/data", decode_cache=True, in_memory=True)
    assert err.value.field == "decode_cache"


def test_training_from_the_cache_is_bit_identical_to_training_from_files(jpeg_tree, tmp_path):
    overrides = {
        "data.name": "imagefolder",
        "data.root": str(jpeg_tree),
        "data.items_per_class": None,
        "data.test_items_per_class": None,
        "optim.batch_size": 10,
        "optim.epochs": 1,
        "eval.plots": False,
    }
    files = Trainer(experiment_config("smoke", overrides), tmp_path / "files")
    files.fit()
    cached_config = experiment_config(
        "smoke",
        {**overrides, "data.decode_cache": True, "data.cache_dir": str(tmp_path / "cache")},
    )
    cached = Trainer(cached_config, tmp_path / "cached")
    assert isinstance(cached.train_set, TensorImageDataset)
    assert isinstance(cached.test_set, TensorImageDataset)
    cached.fit()

    def untimed(history):  # wall-clock fields differ between any two runs
        return [{k: v for k, v in h.items() if not is_wall_clock(k)} for h in history]

    assert untimed(cached.history) == untimed(files.history)
    for key, value in files.flow.state_dict().items():
        assert torch.equal(cached.flow.state_dict()[key], value), key
    assert len([p for p in (tmp_path / "cache").iterdir() if p.is_dir()]) == 2  # train, test


# -------------------------------------------------------------------------------- JPEG draft
def test_large_jpegs_are_decoded_at_a_reduced_scale_then_resized(tmp_path, monkeypatch):
    y, x = np.mgrid[0:300, 0:256]
    wave = 128 + 100 * np.sin(x / 20) * np.cos(y / 25)
    smooth = np.stack([x, y * 255 / 299, wave], axis=-1).round().astype(np.uint8)
    path = tmp_path / "photo.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    small = read_image(path, image_size=32)
    assert tuple(small.shape) == (3, 32, 32) and calls == [((32, 32), (32, 38))]  # 1/8 scale
    # libjpeg's 1/8 DCT scaling against the full decode area-resized to the same 32 x 38 and
    # cropped alike: the same picture up to resampling (a mean of < 2 of 255 levels).
    full = F.center_crop(F.resize(read_image(path), [38, 32], antialias=True), [32, 32])
    assert (small.float() - full.float()).abs().mean() < 2.5
    assert read_image(path).shape == (3, 300, 256)  # no image_size: full decode


def _pil_rgb(path):
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


def test_files_decode_to_the_pixels_pil_gives_and_odd_files_fall_back_to_pil(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    images = {
        "photo.jpg": Image.fromarray(rgb),
        "grey.jpeg": Image.fromarray(rgb[..., 0]),
        "alpha.png": Image.fromarray(np.dstack([rgb, rgb[..., :1]]), mode="RGBA"),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "bitmap.jpg": Image.fromarray(rgb),  # a BMP named .jpg: torchvision refuses, PIL reads
    }
    for name, img in images.items():
        img.save(tmp_path / name, format="BMP" if name == "bitmap.jpg" else None)
        x = read_image(tmp_path / name)
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 12, 10), name
        assert torch.equal(x, _pil_rgb(tmp_path / name)), name
    # The JPEGs and PNGs took torchvision's path, the disguised bitmap PIL's.
    assert all(datasets_module._decode_native(tmp_path / n) is not None for n in list(images)[:4])
    assert datasets_module._decode_native(tmp_path / "bitmap.jpg") is None
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(OSError, match="cannot read image .*broken.jpg"):
        read_image(tmp_path / "broken.jpg")


# ---------------------------------------------------------------------------------- sharding
def test_imagenet_shaped_tree_sharded_over_16_ranks(tmp_path):
    """How 16 GPU workers read an ImageFolder: each rank's sampler takes every 16th item of
    the epoch's permutation (disjoint, equal counts, all but fewer than 16 items per epoch,
    the same for an epoch however often it is replayed); evaluation shards are exact."""
    root = write_imagefolder(
        tmp_path / "imagenet", num_classes=50, shape=(3, 8, 8), train_per_class=7
    )
    dataset, _ = load_dataset("imagefolder", "train", root=root)
    n, world = len(dataset), 16  # 350 items: 14 left over each epoch

    def read(sampler):
        loader = DataLoader(IndexedDataset(dataset), batch_size=8, sampler=sampler)
        seen = []
        for x, y, index in loader:
            assert torch.equal(y, dataset.targets[index])  # the files of those indices
            assert x.shape[1:] == (3, 8, 8)
            seen += index.tolist()
        return seen

    epochs = {}
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            sampler = EpochShardSampler(n, seed=3, rank=rank, world=world)
            sampler.set_epoch(epoch)
            shards.append(read(sampler))
        flat = [i for s in shards for i in s]
        assert all(len(s) == n // world for s in shards)  # every rank runs the same steps
        assert len(set(flat)) == len(flat) == n - n % world  # disjoint, all but 14
        epochs[epoch] = shards
        replay = EpochShardSampler(n, seed=3, rank=5, world=world)
        replay.set_epoch(epoch)
        assert list(replay) == shards[5]  # deterministic per (seed, epoch): resumable
    assert epochs[0] != epochs[1]
    left_out = [set(range(n)) - {i for s in epochs[e] for i in s} for e in (0, 1)]
    assert left_out[0] != left_out[1]  # a different remainder each epoch
    exact = [read(ShardSampler(n, rank=r, world=world)) for r in range(world)]
    assert sorted(i for s in exact for i in s) == list(range(n))  # statistics, evaluation
