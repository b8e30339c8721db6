"""CNN-Acc classifier: CIFAR stem, batch augmentations, config validation, end-to-end training on
digits (real and generated data), the augmentation stack with NF augmentation, confusion PNG."""

import dataclasses

import pytest
import torch
from torch import nn

from nfpi.checkpoint import load_trained
from nfpi.data import TensorImageDataset, load_dataset
from nfpi.downstream import (
    BatchCropFlip,
    BatchRandAugment,
    ClassifierConfig,
    ClassPCA,
    GeneratedDataset,
    NFAugment,
    NFAugmentConfig,
    build_classifier,
    channel_stats,
    evaluate_classifier,
    generate_dataset,
    train_classifier,
)
from nfpi.errors import ConfigError, ShapeError
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
