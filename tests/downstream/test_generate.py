"""Generated datasets: counts, labels, range, reload, determinism, corruption, top of range."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from nfpi.checkpoint import TrainedModel, load_trained
from nfpi.config import ExperimentConfig
from nfpi.data import DatasetInfo, make_loader
from nfpi.downstream import GeneratedDataset, GenerationConfig, generate_dataset, sample_latents
from nfpi.downstream.generated import MANIFEST
from nfpi.errors import CheckpointError, ConfigError, DatasetNotFoundError
from nfpi.prior import GaussianPrior


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_trained(checkpoint)


@pytest.fixture(scope="module")
def generated(model, checkpoint, tmp_path_factory):
    """30 images (3 per class) in shards of 7: 7, 7, 7, 7, 2."""
    out = tmp_path_factory.mktemp("gen") / "set"
    return generate_dataset(
        model, out, per_class=3, temperature=0.7, seed=1, batch_size=7, checkpoint=checkpoint
    )


def _images(path):
    ds = GeneratedDataset(path)
    return torch.stack([ds[i][0] for i in range(len(ds))]), ds.targets


def test_counts_labels_range_and_manifest(generated, model, checkpoint):
    ds = GeneratedDataset(generated)
    assert len(ds) == 30
    assert ds.targets.dtype == torch.int64
    assert torch.bincount(ds.targets, minlength=10).tolist() == [3] * 10
    x, y = ds[13]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 8, 8)
    assert isinstance(y, int) and y == 13 % 10  # labels interleave: every shard is balanced
    images, _ = _images(generated)
    assert images.float().std() > 0  # not a constant image

    m = json.loads((generated / MANIFEST).read_text())
    assert m["checkpoint"] == str(checkpoint.resolve())
    assert m["epoch"] == model.epoch == 1
    assert m["temperature"] == 0.7 and m["seed"] == 1
    assert m["counts_per_class"] == [3] * 10 and m["total"] == 30
    assert m["shape"] == [1, 8, 8] and m["class_names"] == list(model.info.class_names)
    assert [s["count"] for s in m["shards"]] == [7, 7, 7, 7, 2]
    assert m["format_version"] == 1 and m["nonfinite_pixels"] == 0
    assert ds.info.num_classes == 10 and ds.info.shape == (1, 8, 8)


def test_sample_latents_are_the_priors_own_samples(model):
    # Drawn by GaussianPrior.sample on a CPU float64 copy of the prior, from the CPU generator.
    y = torch.arange(25) % 10
    z = sample_latents(model, y, 0.7, torch.Generator().manual_seed(3))
    ref = model.prior.sample(y, 0.7, torch.Generator().manual_seed(3), dtype=torch.float64)
    assert z.dtype == torch.float64 and z.device.type == "cpu" and torch.equal(z, ref)


def test_loader_subset_and_reload(generated):
    ds = GeneratedDataset(generated)
    batches = list(make_loader(ds, 8, shuffle=False, seed=0))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    again, targets = _images(generated)  # a second, independent reader
    assert torch.equal(x, again) and torch.equal(y, targets)
    sub = ds.subset([29, 0, 14])
    assert len(sub) == 3 and sub.targets.tolist() == [9, 0, 4]
    assert torch.equal(sub[0][0], ds[29][0])
    with pytest.raises(IndexError):
        ds.load(30)


def test_deterministic_by_seed(model, generated, tmp_path):
    same = generate_dataset(
        model, tmp_path / "a", per_class=3, temperature=0.7, seed=1, batch_size=7
    )
    other = generate_dataset(
        model, tmp_path / "b", per_class=3, temperature=0.7, seed=2, batch_size=7
    )
    ref, _ = _images(generated)
    assert torch.equal(_images(same)[0], ref)
    assert not torch.equal(_images(other)[0], ref)


def test_from_checkpoint_path_and_overwrite(checkpoint, tmp_path):
    out = generate_dataset(checkpoint, tmp_path / "g", per_class=1, temperature=0.5, seed=0)
    assert json.loads((out / MANIFEST).read_text())["checkpoint"] == str(checkpoint.resolve())
    with pytest.raises(ConfigError) as err:
        generate_dataset(checkpoint, out, per_class=2, temperature=0.5, seed=0)
    assert err.value.field == "out_dir"
    generate_dataset(checkpoint, out, per_class=2, temperature=0.5, seed=0, overwrite=True)
    assert len(GeneratedDataset(out)) == 20


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_and_corrupt_files_raise_named_errors(generated, tmp_path):
    with pytest.raises(DatasetNotFoundError):
        GeneratedDataset(tmp_path / "nowhere")
    with pytest.raises(DatasetNotFoundError, match="manifest"):
        GeneratedDataset(tmp_path)

    missing = _copy(generated, tmp_path / "missing")
    (missing / "images_00002.npy").unlink()
    with pytest.raises(DatasetNotFoundError, match="images_00002.npy"):
        GeneratedDataset(missing)

    flipped = _copy(generated, tmp_path / "flipped")
    raw = bytearray((flipped / "images_00001.npy").read_bytes())
    raw[-1] ^= 0xFF
    (flipped / "images_00001.npy").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256"):
        GeneratedDataset(flipped)

    truncated = _copy(generated, tmp_path / "truncated")
    raw = (truncated / "images_00000.npy").read_bytes()
    (truncated / "images_00000.npy").write_bytes(raw[:-20])
    with pytest.raises(CheckpointError):
        GeneratedDataset(truncated, verify=False)  # caught by the header/size check alone

    wrong_shape = _copy(generated, tmp_path / "wrong_shape")
    np.save(wrong_shape / "images_00004.npy", np.zeros((2, 1, 8, 7), dtype=np.uint8))
    with pytest.raises(CheckpointError, match="images_00004.npy"):
        GeneratedDataset(wrong_shape, verify=False)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(total=31),
        lambda m: m.update(counts_per_class=[4] + [3] * 9),
        lambda m: m.update(format_version=99),
        lambda m: m.update(format="something-else"),
        lambda m: m.pop("shards"),
        lambda m: m["shards"][0].update(file="../escape.npy"),
    ],
)
def test_mismatched_manifest_raises(generated, tmp_path, edit):
    bad = _copy(generated, tmp_path / "bad")
    m = json.loads((bad / MANIFEST).read_text())
    edit(m)
    (bad / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(CheckpointError):
        GeneratedDataset(bad)


def test_unreadable_manifest(generated, tmp_path):
    bad = _copy(generated, tmp_path / "bad")
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        GeneratedDataset(bad)


class _IdentityFlow(nn.Module):
    """x = z reshaped: the generated pixels are to_uint8 of the latents themselves."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.dummy = nn.Parameter(torch.zeros(()))

    def inverse(self, z):
        return z.view(z.shape[0], *self.shape), torch.zeros(z.shape[0])


def test_top_of_range_gives_255_not_0(tmp_path):
    # Class means sit at / near / beyond the ends of [-1, 1]; T = 0 puts every sample on them.
    values = [1.0 - 1e-6, 1.0, 1.5, 127.5 / 128, 0.99, -1.0, -1.5, 1e39]
    shape = (1, 2, 2)
    means = torch.tensor(values, dtype=torch.float64)[:, None].expand(-1, 4)
    info = DatasetInfo("fake", len(values), shape, tuple(str(v) for v in values))
    fake = TrainedModel(
        flow=_IdentityFlow(shape),
        prior=GaussianPrior(means, var=torch.ones_like(means)),
        config=ExperimentConfig(),
        info=info,
        epoch=0,
    )
    out = generate_dataset(fake, tmp_path / "edge", per_class=2, temperature=0.0, seed=0)
    ds = GeneratedDataset(out)
    pixel = {int(y): int(x.flatten()[0]) for x, y in (ds[i] for i in range(len(ds)))}
    assert pixel == {0: 255, 1: 255, 2: 255, 3: 255, 4: 254, 5: 0, 6: 0, 7: 255}
    # 1e39 overflows float32 to inf: still 255 (clamped), and reported.
    assert json.loads((out / MANIFEST).read_text())["nonfinite_pixels"] == 2 * 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"per_class": 0}, "per_class"),
        ({"per_class": 2.5}, "per_class"),
        ({"per_class": 1, "temperature": -0.1}, "temperature"),
        ({"per_class": 1, "temperature": float("nan")}, "temperature"),
        ({"per_class": 1, "seed": -1}, "seed"),
        ({"per_class": 1, "batch_size": 0}, "batch_size"),
        ({"per_class": 1, "batch_size": True}, "batch_size"),
    ],
)
def test_generation_config_validation(kwargs, field):
    with pytest.raises(ConfigError) as err:
        GenerationConfig(**kwargs)
    assert err.value.field == field


def test_device_mismatch_is_refused(model, tmp_path):
    with pytest.raises(ConfigError) as err:
        generate_dataset(model, tmp_path / "x", per_class=1, temperature=1.0, seed=0, device="meta")
    assert err.value.field == "device"
