"""CNN-Acc classifier: CIFAR stem, batch augmentations, config validation, end-to-end training on
digits (real and generated data), the augmentation stack with NF augmentation, confusion PNG."""

import argparse
import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nfpi.checkpoint import load_checkpoint, load_trained
from nfpi.data import TensorImageDataset, load_dataset
from nfpi.downstream import (
    BatchAutoAugment,
    BatchCropFlip,
    BatchRandAugment,
    ClassifierConfig,
    ClassPCA,
    GeneratedDataset,
    NFAugment,
    NFAugmentConfig,
    UInt8Classifier,
    build_classifier,
    channel_stats,
    evaluate_classifier,
    evaluate_topk,
    generate_dataset,
    load_pretrained,
    train_classifier,
)
from nfpi.downstream.classifier import CLASSIFIER_KEYS
from nfpi.errors import CheckpointError, ConfigError, ShapeError
from nfpi.plots import confusion_png

# A small, fast classifier for 8x8 digits on two CPU cores (resnet18 works too, ~3x slower).
FAST = {"model": "resnet10t", "flip": False, "batch_size": 64}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # As fast as two threads for these small networks, and immune to OpenMP spin-waiting on a
    # shared machine (which once stretched this file from ~15 s to ~160 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    train, info = load_dataset("digits", "train")
    test, _ = load_dataset("digits", "test")
    return train, test, info


# ------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("name", ["resnet18", "resnet10t"])
def test_cifar_stem_is_3x3_stride_1_without_maxpool(name):
    model = build_classifier(name, 10, 3, 32)
    conv = model.conv1
    assert isinstance(conv, nn.Conv2d)
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert conv.in_channels == 3 and conv.out_channels == model.bn1.num_features
    assert isinstance(model.maxpool, nn.Identity)
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # layer1 sees the full 32x32 image.
    seen = {}
    model.layer1.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    model(torch.zeros(1, 3, 32, 32))
    assert tuple(seen["shape"][-2:]) == (32, 32)


def test_resnet18_has_the_papers_size_and_large_images_keep_the_imagenet_stem():
    small = build_classifier("resnet18", 10, 3, 32)
    n = sum(p.numel() for p in small.parameters())
    assert 11.1e6 < n < 11.2e6  # "11.2M parameters" (3x3 stem instead of 7x7)
    large = build_classifier("resnet18", 10, 3, 224)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    gray = build_classifier("resnet18", 10, 1, 8)
    assert gray.conv1.in_channels == 1


def test_build_classifier_errors():
    with pytest.raises(ConfigError) as err:
        build_classifier("no_such_net", 10, 3, 32)
    assert err.value.field == "model"
    with pytest.raises(ConfigError) as err:
        build_classifier("mobilenetv3_small_050", 10, 3, 32, cifar_stem=True)
    assert err.value.field == "cifar_stem"
    with pytest.raises(ConfigError) as err:
        build_classifier("resnet18", 0, 3, 32)
    assert err.value.field == "num_classes"


# ---------------------------------------------------------------------------- augmentation
def test_crop_flip_is_a_padded_window_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    assert torch.equal(BatchCropFlip(padding=0, flip=False)(x, g), x)
    out = BatchCropFlip(padding=2, flip=True)(x, torch.Generator().manual_seed(1))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    padded = nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [
            w
            for oy in range(5)
            for ox in range(5)
            for w in (padded[i, :, oy : oy + 8, ox : ox + 8],)
            for w in (w, w.flip(-1))
        ]
        assert any(torch.equal(out[i], w) for w in windows)
    # Most images moved or flipped (each stays put with probability 1/50).
    assert sum(torch.equal(out[i], x[i]) for i in range(len(x))) < len(x) // 2


def test_batch_randaugment_preserves_shape_and_is_seeded():
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    ra = BatchRandAugment(num_ops=2, magnitude=9)
    a = ra(x, torch.Generator().manual_seed(3))
    b = ra(x, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    gray = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    assert ra(gray, torch.Generator().manual_seed(0)).shape == gray.shape


def test_channel_stats(digits):
    train, _, _ = digits
    mean, std = channel_stats(train)
    pixels = torch.stack([train[i][0] for i in range(len(train))]).double()
    assert mean[0] == pytest.approx(float(pixels.mean()), rel=1e-9)
    assert std[0] == pytest.approx(float(pixels.std(unbiased=False)), rel=1e-9)


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1}, "batch_size"),
        ({"batch_size": 99, "mixup": 0.8}, "batch_size"),
        ({"max_lr": 0.0}, "max_lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"random_erasing": 1.5}, "random_erasing"),
        ({"mixup": -1.0}, "mixup"),
        ({"cutmix": float("inf")}, "cutmix"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"randaugment": 1}, "randaugment"),
        ({"randaugment_magnitude": 31}, "randaugment_magnitude"),
        ({"crop_padding": -1}, "crop_padding"),
        ({"normalize": "imagenet"}, "normalize"),
        ({"device": "tpu"}, "device"),
        ({"seed": -3}, "seed"),
        ({"nf_augment": 4}, "nf_augment"),
        ({"nf_augment": {"n_components": 0}}, "nf_augment.n_components"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        ClassifierConfig(**changes)
    assert err.value.field == field


def test_config_defaults_are_the_papers_and_dicts_round_trip():
    cfg = ClassifierConfig()
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.max_lr) == ("resnet18", 30, 100, 0.1)
    assert (cfg.momentum, cfg.weight_decay, cfg.crop_padding, cfg.flip) == (0.9, 5e-4, 4, True)
    assert cfg.max_lr / cfg.div_factor == pytest.approx(1e-3)  # the paper's SGD lr
    full = ClassifierConfig(randaugment=True, mixup=0.8, nf_augment=NFAugmentConfig(seed=3))
    assert ClassifierConfig.from_dict(full.to_dict()) == full
    with pytest.raises(ConfigError) as err:
        ClassifierConfig.from_dict({"epoch": 3})
    assert err.value.field == "epoch"
    with pytest.raises(ConfigError) as err:
        ClassifierConfig.from_dict({"nf_augment": {"probability": 2.0}})
    assert err.value.field == "nf_augment.probability"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 3  # type: ignore[misc]


# -------------------------------------------------------------------------------- training
@pytest.mark.slow  # trains a CNN
def test_trains_on_real_digits_beats_chance_and_writes_the_confusion_png(digits, tmp_path):
    train, test, info = digits
    seen = []
    result = train_classifier(
        train,
        test,
        info.num_classes,
        ClassifierConfig(epochs=2, **FAST),
        callback=lambda epoch, metrics: seen.append((epoch, metrics)),
    )
    assert [e for e, _ in seen] == [0, 1] and len(result.history) == 2
    assert set(seen[-1][1]) >= {"train_loss", "train_acc", "test_acc", "lr", "epoch_seconds"}
    assert result.accuracy > 0.3  # chance is 0.1 (360 test images: sd 0.016)
    assert result.confusion.shape == (10, 10) and result.confusion.dtype == torch.int64
    assert int(result.confusion.sum()) == len(test)
    assert result.accuracy == pytest.approx(float(result.confusion.trace()) / len(test))
    assert result.per_class_accuracy.shape == (10,)
    counts = torch.bincount(test.targets, minlength=10).double()
    assert torch.allclose(result.per_class_accuracy * counts, result.confusion.diag().double())
    # The returned model takes uint8 images and reproduces the reported accuracy.
    acc, cm = evaluate_classifier(result.model, test, 10)
    assert acc == result.accuracy and torch.equal(cm, result.confusion)

    png = confusion_png(result.confusion, info.class_names, tmp_path / "plots" / "cm.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ShapeError):
        confusion_png(result.confusion, info.class_names[:5], tmp_path / "bad.png")
    json_ready = result.to_dict()
    assert json_ready["confusion"] == result.confusion.tolist()


def test_cnn_acc_pipeline_on_generated_images(checkpoint, digits, tmp_path):
    _, test, _ = digits
    model = load_trained(checkpoint)
    path = generate_dataset(model, tmp_path / "gen", per_class=8, temperature=0.7, seed=0)
    generated = GeneratedDataset(path)
    result = train_classifier(
        generated, test, 10, ClassifierConfig(epochs=1, **{**FAST, "batch_size": 40})
    )
    assert 0.0 <= result.accuracy <= 1.0 and int(result.confusion.sum()) == len(test)


def test_every_augmentation_composes_with_nf_augmentation(checkpoint, digits):
    train, test, _ = digits
    small_train = train.subset(torch.arange(0, len(train), 6))  # 240 images
    model = load_trained(checkpoint)
    nf_cfg = NFAugmentConfig(n_components=3, probability=0.5, per_class_fit_samples=10)
    pca = ClassPCA.fit(model.flow, small_train, 10, 3, per_class_samples=10)
    nf = NFAugment(model.flow, pca, nf_cfg, small_train)
    cfg = ClassifierConfig(
        epochs=1,
        randaugment=True,
        random_erasing=0.25,
        mixup=0.8,
        cutmix=1.0,
        label_smoothing=0.1,
        **{**FAST, "batch_size": 40},
    )
    result = train_classifier(small_train, test, 10, cfg, nf_augment=nf)
    assert result.config.nf_augment == nf_cfg  # the config that ran is the one recorded
    assert result.nf_augment_stats["augmented"] > 0
    assert torch.isfinite(torch.tensor(result.history[0]["train_loss"]))
    assert int(result.confusion.sum()) == len(test)


def test_nf_augmentation_from_the_config_checkpoint(checkpoint, digits):
    train, test, _ = digits
    small_train = train.subset(torch.arange(0, len(train), 12))  # 120 images
    nf_cfg = NFAugmentConfig(
        n_components=2, probability=1.0, per_class_fit_samples=8, checkpoint=str(checkpoint)
    )
    cfg = ClassifierConfig(epochs=1, nf_augment=nf_cfg, **{**FAST, "batch_size": 40})
    result = train_classifier(small_train, test, 10, cfg)
    assert result.nf_augment_stats["picked"] == 120  # p = 1: every training image
    assert result.config == cfg


def test_training_input_errors(digits):
    train, test, _ = digits
    with pytest.raises(ConfigError) as err:
        train_classifier(train.subset(torch.arange(10)), test, 10, ClassifierConfig(**FAST))
    assert err.value.field == "batch_size"
    rgb = TensorImageDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4))
    with pytest.raises(ShapeError):
        train_classifier(train, rgb, 10, ClassifierConfig(**FAST))


def test_randaugment_ops_match_torchvision():
    """Parity with torchvision's own RandAugment op implementations (private API: skipped if a
    torchvision release renames it)."""
    from torchvision.transforms import v2

    from nfpi.downstream.augment import _ra_apply, _ra_space

    tv = v2.RandAugment()
    apply = getattr(tv, "_apply_image_or_video_transform", None)
    if apply is None or not hasattr(tv, "_AUGMENTATION_SPACE"):
        pytest.skip("torchvision's RandAugment internals changed")
    assert set(_ra_space(31, 16, 16)) == set(tv._AUGMENTATION_SPACE)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    for name, (mags, signed) in _ra_space(31, 16, 16).items():
        tv_mags = tv._AUGMENTATION_SPACE[name][0](31, 16, 16)
        assert signed == tv._AUGMENTATION_SPACE[name][1]
        if mags is None:
            assert tv_mags is None
        else:
            assert torch.equal(mags, tv_mags)
        mag = 0.0 if mags is None else float(mags[9])
        for m in (mag, -mag) if signed else (mag,):
            ours = _ra_apply(x, name, m)
            theirs = apply(x, name, m, interpolation=v2.InterpolationMode.NEAREST, fill={})
            assert torch.equal(ours, theirs), name


# ------------------------------------------------------- any timm model, recipes, checkpoints
TINY_SWIN = {
    "model": "swin_tiny_patch4_window7_224",
    "model_kwargs": {
        "img_size": 8,
        "patch_size": 2,
        "window_size": 2,
        "embed_dim": 16,
        "depths": [1, 1],
        "num_heads": [1, 2],
    },
}
TINY_EVA = {"img_size": 8, "patch_size": 2, "embed_dim": 16, "depth": 1, "num_heads": 2}


def test_any_timm_model_with_its_kwargs_adamw_cosine_autoaugment_clip_top5(digits):
    train, test, _ = digits
    small = train.subset(torch.arange(0, len(train), 6))  # 240 images
    cfg = ClassifierConfig(
        epochs=2,
        batch_size=40,
        flip=False,
        optimizer="adamw",
        schedule="cosine",
        warmup_epochs=0.5,
        max_lr=2e-3,
        weight_decay=5e-2,
        autoaugment="cifar10",
        randaugment=True,
        grad_clip=1.0,
        **TINY_SWIN,
    )
    result = train_classifier(small, test, 10, cfg)
    assert 0 <= result.accuracy <= result.top5_accuracy <= 1
    assert [h["test_top5"] for h in result.history][-1] == result.top5_accuracy
    assert type(result.model.net).__name__ == "SwinTransformer"
    assert result.history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine down to min_lr
    with pytest.raises(ConfigError) as err:
        train_classifier(small, test, 10, cfg.replace(model_kwargs={"no_such_kwarg": 1}))
    assert err.value.field == "model_kwargs"


def test_top5_counts_the_five_highest_logits():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):  # class c ranks 0 (best) .. 9: logits 9 - rank
            return torch.arange(9.0, -1.0, -1.0).expand(x.shape[0], 10)

    labels = torch.tensor([0, 4, 5, 9])  # ranks 0, 4, 5, 9: top-1 one, top-5 two
    data = TensorImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), labels)
    top1, top5, cm = evaluate_topk(Fixed(), data, 10)
    assert (top1, top5) == (0.25, 0.5) and int(cm[:, 0].sum()) == 4
    _, top3of3, _ = evaluate_topk(Fixed(), data, 10, k=10)
    assert top3of3 == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_then_cosine_or_constant_schedule(schedule):
    from nfpi.downstream.classifier import _optimizer, _scheduler

    cfg = ClassifierConfig(
        optimizer="adamw", schedule=schedule, max_lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10
    )
    model = UInt8Classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), [0.0], [1.0])
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear warm-up
    if schedule == "constant":
        assert lrs[10:] == pytest.approx([1.0] * 40)
    else:
        assert lrs[10] == pytest.approx(1.0) and lrs[-1] > 0.1
        assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # min_lr after the last step
    # timm's AdamW groups: weight decay on the weight matrix, none on the bias.
    decays = sorted((g["params"][0].ndim, g["weight_decay"]) for g in opt.param_groups)
    assert decays == [(1, 0.0), (2, cfg.weight_decay)]


def test_gradient_clipping_bounds_every_step(digits):
    train, test, _ = digits
    small = train.subset(torch.arange(0, len(train), 12))  # 120 images: 3 steps of 40
    base = {"epochs": 1, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant"}
    base.update({**FAST, "batch_size": 40, "crop": False, "max_lr": 1.0})
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in build_classifier("resnet10t", 10, 1, 8).state_dict().items()}

    def moved(result):
        net = result.model.net.state_dict()
        sq = sum(float(((net[k].float() - v.float()) ** 2).sum()) for k, v in start.items()
                 if v.is_floating_point() and "running" not in k)  # fmt: skip
        return sq**0.5

    clipped = train_classifier(small, test, 10, ClassifierConfig(grad_clip=1e-4, **base))
    free = train_classifier(small, test, 10, ClassifierConfig(**base))
    assert moved(clipped) <= 3 * 1e-4 * 1.0 * (1 + 1e-6)  # 3 steps of at most lr x clip
    assert moved(free) > 100 * moved(clipped)


def test_batch_autoaugment_matches_torchvision_per_image():
    """Same draws as torchvision's AutoAugment per image (sub-policy, application, sign), and the
    ops applied as torchvision applies them (private API: skipped if a release renames it)."""
    from torchvision.transforms import v2

    from nfpi.downstream.augment import AUTOAUGMENT_POLICIES, _ra_space

    for name, policy in (("cifar10", "CIFAR10"), ("imagenet", "IMAGENET")):
        tv = v2.AutoAugment(getattr(v2.AutoAugmentPolicy, policy))
        apply = getattr(tv, "_apply_image_or_video_transform", None)
        if apply is None or not hasattr(tv, "_policies"):
            pytest.skip("torchvision's AutoAugment internals changed")
        assert [tuple(p) for p in tv._policies] == list(AUTOAUGMENT_POLICIES[name])
        x = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
        ours = BatchAutoAugment(name)(x, torch.Generator().manual_seed(5))
        g = torch.Generator().manual_seed(5)
        sub = torch.randint(25, (64,), generator=g)
        draws = [(torch.rand(64, generator=g), torch.rand(64, generator=g) <= 0.5) for _ in "ab"]
        space = _ra_space(10, 12, 12)
        for i in range(64):
            img = x[i]
            for pos, (u, neg) in enumerate(draws):
                op, prob, bin_ = AUTOAUGMENT_POLICIES[name][int(sub[i])][pos]
                if not float(u[i]) <= prob:
                    continue
                mags, signed = space.get(op, (None, False))
                mag = 0.0 if mags is None else float(mags[bin_])
                mag = -mag if signed and bool(neg[i]) else mag
                img = apply(img, op, mag, interpolation=v2.InterpolationMode.NEAREST, fill={})
            assert torch.equal(ours[i], img), (name, i)
        assert not torch.equal(ours, x)


def test_input_size_resizes_for_the_network():
    model = UInt8Classifier(nn.Identity(), [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], input_size=20)
    assert model.normalize(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).shape == (2, 3, 20, 20)


# ------------------------------------------------------------------------ pretrained weights
def test_pretrained_weights_from_a_local_file_keep_the_body_and_reset_the_head(tmp_path):
    torch.manual_seed(1)
    source = build_classifier("eva02_tiny_patch14_224", 1000, 3, 8, **TINY_EVA)
    path = tmp_path / "eva02.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    model = build_classifier("eva02_tiny_patch14_224", 5, 3, 8, pretrained_path=path, **TINY_EVA)
    ours, theirs = model.state_dict(), source.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.startswith("head."))
    assert ours["head.weight"].shape == (5, 16)
    assert load_pretrained(model, path) == {"skipped_head": ["head.weight", "head.bias"]}
    # safetensors too
    from safetensors.torch import save_file

    save_file(source.state_dict(), str(tmp_path / "eva02.safetensors"))
    again = build_classifier(
        "eva02_tiny_patch14_224", 5, 3, 8, pretrained_path=tmp_path / "eva02.safetensors",
        **TINY_EVA,
    )  # fmt: skip
    assert torch.equal(again.state_dict()["pos_embed"], theirs["pos_embed"])


def test_pretrained_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    other = build_classifier("eva02_tiny_patch14_224", 5, 3, 8, **{**TINY_EVA, "embed_dim": 32})
    torch.save(other.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*patch_embed"):
        build_classifier("eva02_tiny_patch14_224", 5, 3, 8, pretrained_path=tmp_path / "wide.pt",
                         **TINY_EVA)  # fmt: skip
    resnet = build_classifier("resnet10t", 5, 3, 8)
    torch.save(resnet.state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match=r"missing keys.*unexpected keys"):
        build_classifier("eva02_tiny_patch14_224", 5, 3, 8, pretrained_path=tmp_path / "resnet.pt",
                         **TINY_EVA)  # fmt: skip
    with pytest.raises(CheckpointError, match="not found"):
        build_classifier("resnet10t", 5, 3, 8, pretrained_path=tmp_path / "absent.pt")
    torch.save({"model": argparse.Namespace(code=True)}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="cannot read"):  # weights_only refuses objects
        build_classifier("resnet10t", 5, 3, 8, pretrained_path=tmp_path / "code.pt")


# ---------------------------------------------------------------------------------- resuming
@pytest.mark.slow  # trains CNNs, interrupted and resumed
def test_classifier_resumes_after_its_last_epoch_bit_identically(checkpoint, digits, tmp_path):
    """Every epoch is checkpointed; a run that failed after epoch 0 resumes at epoch 1 and ends
    exactly where an uninterrupted run ends (model, optimiser state, metrics, NF-aug counters)."""
    train, test, _ = digits
    small = train.subset(torch.arange(0, len(train), 12))  # 120 images
    nf_cfg = NFAugmentConfig(
        n_components=2, probability=0.5, per_class_fit_samples=8, checkpoint=str(checkpoint)
    )
    cfg = ClassifierConfig(
        epochs=2,
        optimizer="adamw",
        schedule="cosine",
        warmup_epochs=0.5,
        max_lr=2e-3,
        randaugment=True,
        autoaugment="cifar10",
        random_erasing=0.25,
        mixup=0.8,
        cutmix=1.0,
        grad_clip=1.0,
        nf_augment=nf_cfg,
        **{**FAST, "batch_size": 40},
    )
    whole = train_classifier(small, test, 10, cfg, checkpoint_dir=tmp_path / "whole")

    class Crash(Exception):
        pass

    def crash_after_first(epoch, metrics):
        if epoch == 0:
            raise Crash

    with pytest.raises(Crash):
        train_classifier(
            small, test, 10, cfg, callback=crash_after_first, checkpoint_dir=tmp_path / "r"
        )
    seen = []
    resumed = train_classifier(
        small, test, 10, cfg, callback=lambda e, m: seen.append(e), checkpoint_dir=tmp_path / "r"
    )
    assert seen == [1] and resumed.resumed_epochs == 1
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The flow's checkpoint store: one verified checkpoint per epoch, metrics.jsonl = history.
    ends = [
        load_checkpoint(d, required=CLASSIFIER_KEYS) for d in (tmp_path / "whole", tmp_path / "r")
    ]
    assert [e["epoch"] for e in ends] == [2, 2]
    assert Path(ends[1]["_file"]).parent.name == "epoch-0002"
    assert (tmp_path / "r" / "checkpoints" / "epoch-0001" / "state.pt").is_file()
    o, p = ends[0]["optimizer"]["state"], ends[1]["optimizer"]["state"]
    assert o.keys() == p.keys()
    assert all(torch.equal(o[i][k], p[i][k]) for i in o for k in o[i] if torch.is_tensor(o[i][k]))
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["test_acc"] for line in lines] == [
        m["test_acc"] for m in whole.history
    ]
    drop = lambda h: [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h]
    assert drop(whole.history) == drop(resumed.history)
    assert torch.equal(whole.confusion, resumed.confusion)
    assert whole.nf_augment_stats == resumed.nf_augment_stats
    # A finished run read back trains nothing more; another config is refused.
    done = train_classifier(small, test, 10, cfg, checkpoint_dir=tmp_path / "r")
    assert done.resumed_epochs == 2 and done.accuracy == whole.accuracy
    with pytest.raises(CheckpointError, match="max_lr"):
        train_classifier(small, test, 10, cfg.replace(max_lr=1e-3), checkpoint_dir=tmp_path / "r")
