"""NF augmentation as a dataset (nfpi.downstream.pool): shards that are deterministic, checked
and shared; the per-epoch serving policy; the Ray builder writing the same bytes in parallel."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from nfpi.checkpoint import find_checkpoint, load_trained
from nfpi.data import load_dataset
from nfpi.downstream import DownstreamConfig, run_downstream
from nfpi.downstream.nf_augment import NFAugmentConfig
from nfpi.downstream.pca import ClassPCA
from nfpi.downstream.pool import (
    PoolConfig,
    PooledNFDataset,
    PoolStore,
    build_shard,
    default_root,
    ensure_round,
    pool_augmenter,
    pool_key,
    pooled_dataset,
)
from nfpi.errors import CheckpointError, ConfigError

AUG = NFAugmentConfig(n_components=3, per_class_fit_samples=10, fit_batch_size=64)
POOL = PoolConfig(variants=2, refresh_every=2, probability=0.5, shard_size=70, batch_size=40)


@pytest.fixture(scope="module")
def setup(checkpoint):
    model = load_trained(checkpoint)
    train, _ = load_dataset("digits", "train", items_per_class=20)
    levels = model.info.levels  # digits: 17 grey levels, stored as level indices 0..16
    pca = ClassPCA.fit(
        model.flow, train, 10, n_components=3, per_class_samples=10, batch_size=64, levels=levels
    )
    augment = pool_augmenter(model.flow, pca, AUG, train, levels)
    return model, train, augment, find_checkpoint(checkpoint)


def _store(tmp_path, setup, pool=POOL) -> PoolStore:
    _, train, _, file = setup
    return PoolStore.for_flow(tmp_path / "pools", file, train, AUG, pool)


def test_round_is_built_once_in_checked_shards(tmp_path, setup):
    _, train, augment, _ = setup
    store = _store(tmp_path, setup)
    assert store.shard_ranges() == [(0, 70), (70, 140), (140, 200)]
    assert ensure_round(store, 0, augment, train, POOL) > 0
    manifest = json.loads((store.round_dir(0) / "manifest.json").read_text())
    assert [s["start"] for s in manifest["shards"]] == [0, 70, 140]
    stamp = (store.round_dir(0) / "shard-00000.npy").stat().st_mtime_ns
    assert ensure_round(store, 0, augment, train, POOL) == 0.0  # exists: nothing rebuilt
    assert (store.round_dir(0) / "shard-00000.npy").stat().st_mtime_ns == stamp
    rnd = store.open_round(0)
    assert rnd.variants == 2
    img = rnd.get(150, 1)
    assert img.dtype == torch.uint8 and img.shape == train[150][0].shape
    assert json.loads((store.dir / "pool.json").read_text())["augment"]["n_components"] == 3


def test_shards_are_deterministic_and_are_nf_variants(setup):
    _, train, augment, _ = setup
    a = build_shard(augment, train, 70, 140, POOL, 3, 1)
    b = build_shard(augment, train, 70, 140, POOL, 3, 1)
    assert np.array_equal(a, b)  # the bytes depend on (seed, round, shard, variant) only
    c = build_shard(augment, train, 70, 140, POOL, 4, 1)
    assert not np.array_equal(a, c)  # another round: other partners and weights
    originals = torch.stack([train[i][0] for i in range(70, 140)]).numpy()
    changed = (a != originals[:, None]).reshape(70, 2, -1).any(-1)
    assert changed.mean() > 0.8  # p = 1: (nearly) every image is mixed
    assert not np.array_equal(a[:, 0], a[:, 1])  # variants differ


def test_pools_hold_the_datasets_grey_levels(tmp_path, setup, checkpoint):
    """A flow of 17-level digits fills its pools with level indices 0..16 (what the dataset
    and the classifier's bin centres use), both through pooled_dataset (levels from the
    checkpoint's DatasetInfo) and the pool_augmenter of the fixture: the same bytes."""
    model, train, augment, _ = setup
    assert model.info.levels == 17
    assert int(torch.stack([train[i][0] for i in range(len(train))]).max()) <= 16
    data, _ = pooled_dataset(checkpoint, train, AUG, POOL, 1, root=tmp_path / "a")
    built = np.concatenate(
        [np.load(p) for p in sorted(data.store.round_dir(0).glob("shard-*.npy"))]
    )
    assert built.max() <= 16 and built.max() >= 8  # level indices, not 8-bit values
    assert np.array_equal(built[:70], build_shard(augment, train, 0, 70, POOL, 0, 0))


def test_corrupt_or_truncated_shards_are_refused(tmp_path, setup):
    _, train, augment, _ = setup
    store = _store(tmp_path, setup)
    ensure_round(store, 0, augment, train, POOL)
    shard = store.round_dir(0) / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shard-00001.npy fails its SHA-256"):
        store.open_round(0)
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="missing or truncated"):
        store.open_round(0)
    with pytest.raises(CheckpointError, match="no round 5"):
        store.open_round(5)


def test_key_follows_what_the_bytes_depend_on(setup):
    file = setup[3]
    base = pool_key("f" * 64, AUG, POOL, "d")[0]
    assert pool_key("f" * 64, AUG.replace(checkpoint="/x", probability=0.1), POOL, "d")[0] == base
    assert pool_key("f" * 64, AUG, POOL.replace(probability=0.9, refresh_every=7), "d")[0] == base
    assert pool_key("e" * 64, AUG, POOL, "d")[0] != base  # another flow
    assert pool_key("f" * 64, AUG.replace(weight_param=0.5), POOL, "d")[0] != base
    assert pool_key("f" * 64, AUG, POOL.replace(variants=3), "d")[0] != base
    assert pool_key("f" * 64, AUG, POOL, "other data")[0] != base
    assert default_root(file) == file.parents[2] / "nf_pools"


def test_serving_policy(tmp_path, setup):
    _, train, augment, _ = setup
    pool = POOL.replace(probability=0.5, refresh_every=2, rounds=2)
    store = _store(tmp_path, setup, pool)
    assert pool.rounds_for(7) == [0, 1] and [pool.round_of(e) for e in range(6)] == [
        0, 0, 1, 1, 0, 0,
    ]  # fmt: skip
    for r in (0, 1):
        ensure_round(store, r, augment, train, pool)
    data = PooledNFDataset(train, store, pool)
    # Before set_epoch: the real images (what dataset statistics should see).
    assert all(torch.equal(data[i][0], train[i][0]) for i in range(0, 200, 17))
    data.set_epoch(3)
    served = data.served.clone()
    assert 0.3 < served.float().mean() < 0.7
    rnd = store.open_round(1)
    for i in range(200):
        img, label = data[i]
        assert label == int(train.targets[i])
        want = rnd.get(i, int(data.variant[i])) if served[i] else train[i][0]
        assert torch.equal(img, want)
    data.set_epoch(0)
    data.set_epoch(3)
    assert torch.equal(data.served, served)  # a function of (seed, epoch) only
    data.set_epoch(2)
    assert not torch.equal(data.served, served)
    # DataLoader workers (pickled dataset) serve the same items.
    data.set_epoch(3)
    loader = DataLoader(data, batch_size=50, num_workers=1)
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, torch.stack([data[i][0] for i in range(200)]))
    with pytest.raises(ConfigError):
        data.set_epoch(-1)


def test_config_validation_names_the_field():
    for kwargs, field in (
        ({"variants": 0}, "variants"),
        ({"refresh_every": 0}, "refresh_every"),
        ({"rounds": 0}, "rounds"),
        ({"probability": 1.5}, "probability"),
    ):
        with pytest.raises(ConfigError) as err:
            PoolConfig(**kwargs)
        assert err.value.field == field


def test_pooled_dataset_builds_missing_rounds_then_reuses_them(tmp_path, setup, checkpoint):
    _, train, _, _ = setup
    pool = POOL.replace(refresh_every=3)
    data, seconds = pooled_dataset(checkpoint, train, AUG, pool, 4, root=tmp_path)
    assert seconds > 0 and sorted(p.name for p in data.store.dir.glob("round-*/")) == [
        "round-0000",
        "round-0001",
    ]
    again, seconds = pooled_dataset(checkpoint, train, AUG, pool, 4, root=tmp_path)
    assert seconds == 0.0 and again.store.dir == data.store.dir


@pytest.mark.slow  # a downstream run
def test_downstream_augment_run_with_a_pool(tmp_path, checkpoint, monkeypatch):
    """The augment run serves NF augmentation from the pool: the classifier calls set_epoch on
    the PooledNFDataset every epoch and runs no NFAugment in its loop."""
    config = DownstreamConfig.from_overrides(
        {
            "cnn.model": "resnet10t",
            "cnn.epochs": 2,
            "cnn.batch_size": 50,
            "cnn.flip": False,
            "downstream.kind": "augment",
            "cnn.nf_augment": {"n_components": 3, "per_class_fit_samples": 10},
            "downstream.nf_pool": {"variants": 1, "refresh_every": 1, "shard_size": 100},
        }
    )
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run)  # the pools go next to the flow's run directory
    epochs = []
    real = PooledNFDataset.set_epoch
    monkeypatch.setattr(
        PooledNFDataset, "set_epoch", lambda self, e: (epochs.append(e), real(self, e))[1]
    )
    result = run_downstream(run, config, tmp_path / "out")
    assert epochs == [0, 1]
    assert result.metrics["nf_pool_build_s"] > 0
    assert "aug_acc" in result.metrics and "augmented" in result.histories
    assert not result.results["augmented"].nf_augment_stats  # no online NFAugment ran
    assert len(list((run / "nf_pools").glob("*/round-000[01]/manifest.json"))) == 2
    again = run_downstream(run, config, tmp_path / "out2")
    assert again.metrics["nf_pool_build_s"] == 0.0  # the next trial reuses the pool


@pytest.mark.usefixtures("ray_session")
def test_ray_builder_writes_the_same_pool(tmp_path, setup, checkpoint):
    """Parallel Ray tasks (one per shard) write byte-identical shards to the in-process builder,
    under the same key; a second call finds the rounds and does nothing."""
    from ray_jobs.augment_pool import build_pool

    _, train, augment, file = setup
    pool = POOL.replace(refresh_every=1)
    build = build_pool(checkpoint, train, AUG, pool, 2, root=tmp_path / "ray")
    assert build.built == [0, 1] or sorted(build.built) == [0, 1]
    local = PoolStore.for_flow(tmp_path / "local", file, train, AUG, pool)
    assert local.key == build.store.key
    ensure_round(local, 1, augment, train, pool)
    for name in ("shard-00000.npy", "shard-00002.npy"):
        a = (build.store.round_dir(1) / name).read_bytes()
        assert a == (local.round_dir(1) / name).read_bytes()
    again = build_pool(checkpoint, train, AUG, pool, 2, root=tmp_path / "ray")
    assert again.built == [] and again.seconds == 0.0
