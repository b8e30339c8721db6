"""CNN-Acc: a classifier trained on (generated or real) images and tested on the real test set.

The paper's recipe (section 5.2; method notes section 7): ResNet-18 with the CIFAR stem (3x3
stride-1 first convolution, no max-pool), SGD (momentum 0.9, weight decay 5e-4), one-cycle
schedule with maximum learning rate 0.1, batch 100, 30 epochs on CIFAR-10 and 50 on CIFAR-100,
random crop (padding 4) + horizontal flip. CNN-Acc trains it on a :mod:`nfpi.generate` set; the
reference row trains the same classifier on the real training set (just pass that set).

Table 5's augmentation switches compose in this order, per batch (on the CPU, before the batch
moves to the device):

    NF augmentation (uint8) -> random crop + flip (uint8) -> RandAugment (uint8)
      -> normalisation (float) -> random erasing -> mixup / cutmix (soft targets)

The uint8 steps are vectorised over the batch (a per-image torchvision pipeline costs
milliseconds per image on two cores, more than the network's step on small images); random
erasing and mixup/cutmix are timm's.

Example::

    train = GeneratedDataset("gen/cifar10_T0.7")
    test, info = load_dataset("cifar10", "test", root=...)
    result = train_classifier(train, test, info.num_classes, ClassifierConfig(epochs=30))
    confusion_png(result.confusion, info.class_names, "confusion.png")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.models.resnet import ResNet
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from nfpi.data import epoch_seed, make_loader, set_loader_epoch
from nfpi.errors import ConfigError, DatasetNotFoundError, LabelRangeError, ShapeError
from nfpi.nf_augment import NFAugment, NFAugmentConfig
from nfpi.validation import is_int, is_number

__all__ = [
    "BatchCropFlip",
    "BatchRandAugment",
    "ClassifierConfig",
    "ClassifierResult",
    "UInt8Classifier",
    "build_classifier",
    "channel_stats",
    "confusion_png",
    "evaluate_classifier",
    "train_classifier",
]

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


# ---------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ClassifierConfig:
    """How the classifier is trained (defaults: the paper's CIFAR-10 recipe).

    Attributes:
        model: a timm model name (``"resnet18"``: 11.2 M parameters as in the paper).
        cifar_stem: replace a ResNet's stem by a 3x3 stride-1 conv without max-pool; ``None``
            = automatically for ResNets on images of side <= 64.
        epochs: 30 for CIFAR-10, 50 for CIFAR-100 in the paper.
        batch_size: 100 (even when mixup/cutmix is on: timm mixes the batch with its flip).
        max_lr: peak of the one-cycle schedule (0.1).
        div_factor: initial lr = ``max_lr / div_factor``; 100 gives the paper's stated SGD
            learning rate 1e-3 below the one-cycle peak 0.1.
        final_div_factor: final lr = initial lr / ``final_div_factor`` (torch's default).
        pct_start: share of the steps spent warming up (torch's default 0.3).
        cycle_momentum: let OneCycleLR cycle the momentum in [0.85, 0.95]; off by default so
            that SGD's momentum is the paper's 0.9 throughout.
        momentum, weight_decay, nesterov: SGD's.
        crop: random crop of the image size after zero padding by ``crop_padding``.
        crop_padding: 4 (CIFAR's standard).
        flip: random horizontal flip (off for glyphs such as digits).
        randaugment: RandAugment (torchvision's op set) with ``randaugment_ops`` operations of
            magnitude ``randaugment_magnitude`` (of 31 bins).
        random_erasing: probability of timm's random erasing (0 = off).
        mixup, cutmix: alphas of timm's mixup / cutmix (0 = off; both on = switch per batch).
        label_smoothing: of the cross-entropy (or of mixup's soft targets).
        nf_augment: NF augmentation settings (``None`` = off); see :mod:`nfpi.nf_augment`.
        normalize: ``"dataset"`` per-channel mean/std of the training set, or ``"fixed"``
            (pixels to [-1, 1]).
        eval_batch_size: test-time batch size.
        seed: initialisation, shuffling and augmentation seed (>= 0).
        num_workers: DataLoader workers (0 = main process).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    model: str = "resnet18"
    cifar_stem: bool | None = None
    epochs: int = 30
    batch_size: int = 100
    max_lr: float = 0.1
    div_factor: float = 100.0
    final_div_factor: float = 1e4
    pct_start: float = 0.3
    cycle_momentum: bool = False
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    crop: bool = True
    crop_padding: int = 4
    flip: bool = True
    randaugment: bool = False
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    nf_augment: NFAugmentConfig | None = None
    normalize: Literal["dataset", "fixed"] = "dataset"
    eval_batch_size: int = 500
    seed: int = 0
    num_workers: int = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    def __post_init__(self) -> None:
        def check(cond: bool, name: str, allowed: str) -> None:
            if not cond:
                raise ConfigError(name, getattr(self, name), allowed)

        check(isinstance(self.model, str) and bool(self.model), "model", "a timm model name")
        check(self.cifar_stem in (None, True, False), "cifar_stem", "None, true or false")
        for name in ("epochs", "eval_batch_size"):
            check(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an int >= 1")
        check(is_int(self.batch_size) and self.batch_size >= 2, "batch_size", "an int >= 2")
        for name in ("seed", "num_workers", "crop_padding"):
            check(is_int(getattr(self, name)) and getattr(self, name) >= 0, name, "an int >= 0")
        check(is_number(self.max_lr) and self.max_lr > 0, "max_lr", "a number > 0")
        for name in ("div_factor", "final_div_factor"):
            check(
                is_number(getattr(self, name)) and getattr(self, name) >= 1, name, "a number >= 1"
            )
        check(is_number(self.pct_start) and 0 < self.pct_start < 1, "pct_start", "in (0, 1)")
        check(is_number(self.momentum) and 0 <= self.momentum < 1, "momentum", "in [0, 1)")
        check(
            is_number(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            "a number >= 0",
        )
        for name in ("cycle_momentum", "nesterov", "crop", "flip", "randaugment"):
            check(isinstance(getattr(self, name), bool), name, "true or false")
        check(not self.nesterov or self.momentum > 0, "nesterov", "false when momentum is 0 (SGD)")
        check(
            is_int(self.randaugment_ops) and 1 <= self.randaugment_ops <= 10,
            "randaugment_ops",
            "an int in [1, 10]",
        )
        check(
            is_int(self.randaugment_magnitude) and 0 <= self.randaugment_magnitude <= 30,
            "randaugment_magnitude",
            "an int in [0, 30] (of 31 magnitude bins)",
        )
        check(
            is_number(self.random_erasing) and 0 <= self.random_erasing <= 1,
            "random_erasing",
            "a probability in [0, 1]",
        )
        for name in ("mixup", "cutmix"):
            check(is_number(getattr(self, name)) and getattr(self, name) >= 0, name, "alpha >= 0")
        check(
            is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "label_smoothing",
            "in [0, 1)",
        )
        check(
            (self.mixup == 0 and self.cutmix == 0) or self.batch_size % 2 == 0,
            "batch_size",
            "an even int when mixup/cutmix is on (timm mixes a batch with its reverse)",
        )
        check(
            self.nf_augment is None or isinstance(self.nf_augment, NFAugmentConfig),
            "nf_augment",
            "None or an NFAugmentConfig",
        )
        check(self.normalize in ("dataset", "fixed"), "normalize", "'dataset' or 'fixed'")
        check(self.device in ("cpu", "cuda", "auto"), "device", "'cpu', 'cuda' or 'auto'")
        for name in (
            "max_lr",
            "div_factor",
            "final_div_factor",
            "pct_start",
            "momentum",
            "weight_decay",
            "random_erasing",
            "mixup",
            "cutmix",
            "label_smoothing",
        ):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ClassifierConfig:
        """Build from a (nested) dict such as ``to_dict()``'s output; unknown keys raise."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                unknown[0], values[unknown[0]], f"unknown key; known: {sorted(known)}"
            )
        values = dict(values)
        nf = values.get("nf_augment")
        if isinstance(nf, dict):
            values["nf_augment"] = NFAugmentConfig.from_dict(nf)
        return cls(**values)

    def replace(self, **changes: Any) -> ClassifierConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------- model
def build_classifier(
    name: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    *,
    cifar_stem: bool | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm classifier, randomly initialised.

    ImageNet ResNets open with a 7x7 stride-2 convolution and a stride-2 max-pool, which throw
    away three quarters of a 32x32 image's resolution before the first block. The CIFAR stem
    (used by the paper) replaces ``conv1`` by a 3x3 stride-1 padding-1 convolution (to the
    stem's width, kaiming-normal initialised like timm's) and ``maxpool`` by ``Identity``, so
    ``layer1`` sees the full image. Deep-stem variants (``resnet10t``, ``resnet18d``) lose their
    three-conv stem the same way.

    Args:
        name: timm model name (``timm.list_models()``).
        num_classes: K outputs.
        in_chans: image channels (1 for digits, 3 for CIFAR).
        image_size: side of the (square) images.
        cifar_stem: force the CIFAR stem on/off; default on for timm ResNets with
            ``image_size <= 64``. Non-ResNet models keep timm's architecture.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size`` for a ViT).

    Returns:
        ``nn.Module`` mapping float ``[B, in_chans, H, W]`` to logits ``[B, K]``.
    """
    for field_name, value, low in (
        ("num_classes", num_classes, 1),
        ("in_chans", in_chans, 1),
        ("image_size", image_size, 1),
    ):
        if not is_int(value) or value < low:
            raise ConfigError(field_name, value, f"an int >= {low}")
    try:
        model = timm.create_model(
            name, num_classes=num_classes, in_chans=in_chans, pretrained=False, **timm_kwargs
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError("model", name, "a timm model name (see timm.list_models())") from e
        raise
    is_resnet = isinstance(model, ResNet)
    if cifar_stem is None:
        cifar_stem = is_resnet and image_size <= 64
    if cifar_stem:
        if not is_resnet:
            raise ConfigError("cifar_stem", True, f"False for {name!r}: only timm ResNets have it")
        width = model.bn1.num_features
        conv = nn.Conv2d(in_chans, width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = conv
        model.maxpool = nn.Identity()
    return model


class UInt8Classifier(nn.Module):
    """A classifier of uint8 images: ``forward(x uint8 [B, C, H, W]) -> logits [B, K]``.

    ``normalize`` maps pixels to ``(x - mean) / std`` per channel (float32); ``net`` takes
    normalised floats (training inserts random erasing and mixup in between).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> float32 ``[B, C, H, W]``."""
        return (x.to(self.mean.device, torch.float32) - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


# ------------------------------------------------------------------------- batch augmentation
class BatchCropFlip:
    """Random crop after zero padding and random horizontal flip, drawn per image, applied to a
    uint8 batch ``[B, C, H, W]`` with one gather (no per-image Python loop)."""

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if not is_int(padding) or padding < 0:
            raise ConfigError("crop_padding", padding, "an int >= 0")
        self.padding, self.flip = padding, flip

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        b, c, h, w = x.shape
        p = self.padding
        if p > 0:
            xp = nn.functional.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            batch = torch.arange(b, device=x.device)[:, None, None, None]
            chan = torch.arange(c, device=x.device)[None, :, None, None]
            x = xp[batch, chan, rows, cols]
        if self.flip:
            flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)[:, None, None, None]
            x = torch.where(flip, x.flip(-1), x)
        return x


# RandAugment's op space, as torchvision.transforms.v2.RandAugment: name -> (magnitudes over the
# bins for an image of height h and width w, signed).
def _ra_space(bins: int, h: int, w: int) -> dict[str, tuple[Tensor | None, bool]]:
    lin = torch.linspace
    return {
        "Identity": (None, False),
        "ShearX": (lin(0.0, 0.3, bins), True),
        "ShearY": (lin(0.0, 0.3, bins), True),
        "TranslateX": (lin(0.0, 150.0 / 331.0 * w, bins), True),
        "TranslateY": (lin(0.0, 150.0 / 331.0 * h, bins), True),
        "Rotate": (lin(0.0, 30.0, bins), True),
        "Brightness": (lin(0.0, 0.9, bins), True),
        "Color": (lin(0.0, 0.9, bins), True),
        "Contrast": (lin(0.0, 0.9, bins), True),
        "Sharpness": (lin(0.0, 0.9, bins), True),
        "Posterize": ((8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int(), False),
        "Solarize": (lin(1.0, 0.0, bins), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }


def _ra_apply(x: Tensor, op: str, mag: float) -> Tensor:
    """One RandAugment op on a uint8 batch, as torchvision's v2 RandAugment applies it."""
    nearest = InterpolationMode.NEAREST
    if op == "Identity":
        return x
    if op in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(mag))
        shear = [deg, 0.0] if op == "ShearX" else [0.0, deg]
        return TF.affine(
            x, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest,
            center=[0, 0],
        )  # fmt: skip
    if op in ("TranslateX", "TranslateY"):
        shift = [int(mag), 0] if op == "TranslateX" else [0, int(mag)]
        return TF.affine(
            x, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=nearest
        )
    if op == "Rotate":
        return TF.rotate(x, angle=mag, interpolation=nearest)
    if op == "Brightness":
        return TF.adjust_brightness(x, 1.0 + mag)
    if op == "Color":
        return TF.adjust_saturation(x, 1.0 + mag)
    if op == "Contrast":
        return TF.adjust_contrast(x, 1.0 + mag)
    if op == "Sharpness":
        return TF.adjust_sharpness(x, 1.0 + mag)
    if op == "Posterize":
        return TF.posterize(x, bits=int(mag))
    if op == "Solarize":
        return TF.solarize(x, threshold=255.0 * mag)
    if op == "AutoContrast":
        return TF.autocontrast(x)
    if op == "Equalize":
        return TF.equalize(x)
    raise ConfigError("op", op, "a RandAugment op")


class BatchRandAugment:
    """RandAugment (Cubuk et al. 2020) with torchvision's op set and magnitudes, drawn per image
    but applied to a uint8 batch: images that drew the same op (and sign) go through it
    together, so a batch costs at most ``2 x 14`` vectorised calls per round instead of
    ``B x num_ops`` single-image calls (each dominated by fixed overhead on small images).

    Every op of torchvision's set is per-image on a batch (autocontrast and equalize use each
    image's own histogram), so this draws from the same distribution as applying
    ``torchvision.transforms.v2.RandAugment(num_ops, magnitude)`` image by image.
    """

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31) -> None:
        if not is_int(num_ops) or num_ops < 1:
            raise ConfigError("randaugment_ops", num_ops, "an int >= 1")
        if not is_int(magnitude) or not 0 <= magnitude < num_magnitude_bins:
            raise ConfigError(
                "randaugment_magnitude", magnitude, f"an int in [0, {num_magnitude_bins})"
            )
        self.num_ops, self.magnitude, self.bins = num_ops, magnitude, num_magnitude_bins

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> uint8 ``[B, C, H, W]``."""
        b, _, h, w = x.shape
        space = list(_ra_space(self.bins, h, w).items())
        for _ in range(self.num_ops):
            ops = torch.randint(len(space), (b,), generator=generator)
            negative = torch.rand(b, generator=generator) <= 0.5
            out = x.clone()
            for i in torch.unique(ops).tolist():
                name, (mags, signed) = space[i]
                mag = 0.0 if mags is None else float(mags[self.magnitude])
                groups = [(negative, -mag), (~negative, mag)] if signed else [(None, mag)]
                for mask, m in groups:
                    sel = ops == i if mask is None else (ops == i) & mask
                    idx = torch.nonzero(sel, as_tuple=True)[0].to(x.device)
                    if idx.numel():
                        out[idx] = _ra_apply(x[idx], name, m)
            x = out
        return x


# ----------------------------------------------------------------------------- training
@dataclass
class ClassifierResult:
    """What :func:`train_classifier` returns.

    Attributes:
        accuracy: test accuracy after the last epoch, in [0, 1].
        per_class_accuracy: ``[K]`` float64, recall per class (NaN for a class absent from the
            test set).
        confusion: int64 ``[K, K]``, rows = true class, columns = prediction; sums to the test
            set size.
        history: one metrics dict per epoch (``epoch``, ``train_loss``, ``train_acc``,
            ``test_acc``, ``lr``, ``epoch_seconds``).
        model: the trained classifier (takes uint8 images), in eval mode.
        config: the config that ran (with the NF augmentation's own config filled in).
        nf_augment_stats: counters of the NF augmentation (empty when off).
    """

    accuracy: float
    per_class_accuracy: Tensor
    confusion: Tensor
    history: list[dict[str, float]]
    model: UInt8Classifier
    config: ClassifierConfig
    nf_augment_stats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no model)."""
        return {
            "accuracy": self.accuracy,
            "per_class_accuracy": [float(a) for a in self.per_class_accuracy],
            "confusion": self.confusion.tolist(),
            "history": self.history,
            "config": self.config.to_dict(),
            "nf_augment_stats": dict(self.nf_augment_stats),
        }


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "'cpu' or 'auto': no CUDA device is visible")
    return torch.device(name)


def _image_shape(dataset: Any, where: str) -> tuple[int, int, int]:
    if len(dataset) == 0:
        raise DatasetNotFoundError(f"the {where} set holds no images")
    x, _ = dataset[0]
    if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 3:
        raise ShapeError(
            f"the {where} set must yield uint8 images [C, H, W] (as nfpi.data's datasets do), "
            f"got {getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}"
        )
    return tuple(int(s) for s in x.shape)  # type: ignore[return-value]


@torch.no_grad()
def channel_stats(dataset: Any, batch_size: int = 1000) -> tuple[list[float], list[float]]:
    """Per-channel pixel mean and standard deviation (pixel units, float64 sums) of a uint8
    dataset, streamed in batches."""
    total = None
    count = 0
    for x, _ in make_loader(dataset, batch_size, shuffle=False, seed=0):
        xf = x.to(torch.float64).transpose(0, 1).flatten(1)  # [C, B*H*W]
        sums = torch.stack([xf.sum(dim=1), (xf * xf).sum(dim=1)])
        total = sums if total is None else total + sums
        count += xf.shape[1]
    if total is None:
        raise DatasetNotFoundError("channel_stats: the dataset holds no images")
    mean = total[0] / count
    std = (total[1] / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: Any,
    num_classes: int,
    *,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> tuple[float, Tensor]:
    """Accuracy and confusion matrix (int64 ``[K, K]``, rows true, columns predicted) of a
    uint8-image classifier on ``dataset`` (no augmentation)."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    try:
        for x, y in make_loader(
            dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers
        ):
            if int(y.min()) < 0 or int(y.max()) >= num_classes:
                raise LabelRangeError(
                    f"test labels span [{int(y.min())}, {int(y.max())}], the classifier has "
                    f"{num_classes} classes"
                )
            pred = model(x.to(device)).argmax(dim=1).cpu()
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2)
    finally:
        model.train(was_training)
    confusion = confusion.view(num_classes, num_classes)
    total = int(confusion.sum())
    return (float(confusion.trace()) / total if total else float("nan")), confusion


def _seed_all(seed: int, epoch: int) -> torch.Generator:
    """Seed every RNG an epoch's augmentation touches (timm's random erasing uses ``random``,
    its mixup ``numpy``); returns the generator for the vectorised steps."""
    s = epoch_seed(seed, epoch)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
    return torch.Generator().manual_seed(s)


def train_classifier(
    train_dataset: Any,
    test_dataset: Any,
    num_classes: int,
    config: ClassifierConfig | None = None,
    *,
    callback: EpochCallback | None = None,
    nf_augment: NFAugment | None = None,
) -> ClassifierResult:
    """Train a classifier on ``train_dataset`` and test it on ``test_dataset`` every epoch.

    SGD + ``OneCycleLR`` stepped per batch; the last incomplete training batch is dropped (equal
    batch sizes for BatchNorm and mixup). Runs are reproducible given ``config.seed`` on a
    given machine (model init from the seed, shuffling and augmentation from
    ``epoch_seed(seed, epoch)``).

    Args:
        train_dataset: map-style, items ``(uint8 [C, H, W], int)``: a
            :class:`~nfpi.generate.GeneratedDataset` for CNN-Acc or the real training set for
            the reference row (use it un-augmented: augmentation happens here).
        test_dataset: the real test set, same image shape.
        num_classes: K.
        config: the recipe (default :class:`ClassifierConfig()`).
        callback: ``callback(epoch, metrics)`` after each epoch (logging, MLflow, Tune).
        nf_augment: a ready :class:`~nfpi.nf_augment.NFAugment` (then ``config.nf_augment`` may
            be ``None``: the transform's own config is recorded in the result); otherwise one is
            built from ``config.nf_augment.checkpoint`` and fitted on ``train_dataset``.

    Returns:
        :class:`ClassifierResult`.
    """
    config = config or ClassifierConfig()
    if not is_int(num_classes) or num_classes < 2:
        raise ConfigError("num_classes", num_classes, "an int >= 2")
    shape = _image_shape(train_dataset, "training")
    test_shape = _image_shape(test_dataset, "test")
    if test_shape != shape:
        raise ShapeError(f"training images are {shape}, test images {test_shape}: they must match")
    n = len(train_dataset)
    if n < config.batch_size:
        raise ConfigError(
            "batch_size", config.batch_size, f"<= the training set size {n} (batches are full)"
        )
    device = _resolve_device(config.device)
    c, h, w = shape

    torch.manual_seed(config.seed)
    net = build_classifier(config.model, num_classes, c, min(h, w), cifar_stem=config.cifar_stem)
    mean, std = (
        channel_stats(train_dataset)
        if config.normalize == "dataset"
        else (
            [127.5] * c,
            [127.5] * c,
        )
    )
    model = UInt8Classifier(net, mean, std).to(device)

    if nf_augment is None and config.nf_augment is not None:
        nf_augment = NFAugment.from_checkpoint(config.nf_augment, train_dataset, device=device)
    if nf_augment is not None:
        config = config.replace(nf_augment=nf_augment.config)
    crop_flip = BatchCropFlip(config.crop_padding if config.crop else 0, config.flip)
    randaug = (
        BatchRandAugment(config.randaugment_ops, config.randaugment_magnitude)
        if config.randaugment
        else None
    )
    erasing = (
        RandomErasing(config.random_erasing, mode="pixel", device=str(device))
        if config.random_erasing > 0
        else None
    )
    mixup = (
        Mixup(
            mixup_alpha=config.mixup,
            cutmix_alpha=config.cutmix,
            label_smoothing=config.label_smoothing,
            num_classes=num_classes,
        )
        if config.mixup > 0 or config.cutmix > 0
        else None
    )
    criterion: nn.Module = (
        SoftTargetCrossEntropy()
        if mixup is not None
        else nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    )
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.max_lr / config.div_factor,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    steps = n // config.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.max_lr,
        total_steps=config.epochs * steps,
        pct_start=config.pct_start,
        div_factor=config.div_factor,
        final_div_factor=config.final_div_factor,
        cycle_momentum=config.cycle_momentum,
    )
    loader = make_loader(
        train_dataset,
        config.batch_size,
        shuffle=True,
        seed=config.seed,
        num_workers=config.num_workers,
        drop_last=True,
    )
    log.info(
        "classifier %s: %d training images, %d epochs x %d steps, device %s",
        config.model,
        n,
        config.epochs,
        steps,
        device,
    )

    history: list[dict[str, float]] = []
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    accuracy = float("nan")
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        gen = _seed_all(config.seed, epoch)
        set_loader_epoch(loader, config.seed, epoch)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            if int(y.min()) < 0 or int(y.max()) >= num_classes:
                raise LabelRangeError(
                    f"training labels span [{int(y.min())}, {int(y.max())}], expected "
                    f"[0, {num_classes})"
                )
            if nf_augment is not None:
                x = nf_augment(x, y, gen)
            x = crop_flip(x, gen)
            if randaug is not None:
                x = randaug(x, gen)
            xf = model.normalize(x.to(device, non_blocking=True))
            y = y.to(device)
            if erasing is not None:
                xf = erasing(xf)
            target = y
            if mixup is not None:
                xf, target = mixup(xf, y)
            logits = model.net(xf)
            loss = criterion(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
        if not math.isfinite(loss_sum):
            log.warning("epoch %d: non-finite training loss", epoch)
        accuracy, confusion = evaluate_classifier(
            model,
            test_dataset,
            num_classes,
            batch_size=config.eval_batch_size,
            device=device,
            num_workers=config.num_workers,
        )
        metrics = {
            "epoch": float(epoch),
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_acc": accuracy,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "epoch_seconds": time.perf_counter() - t0,
        }
        history.append(metrics)
        log.info(
            "classifier epoch %d: loss %.4f, train acc %.4f, test acc %.4f",
            epoch,
            metrics["train_loss"],
            metrics["train_acc"],
            accuracy,
        )
        if callback is not None:
            callback(epoch, metrics)
    model.eval()
    rows = confusion.sum(dim=1).to(torch.float64)
    per_class = confusion.diag().to(torch.float64) / rows
    return ClassifierResult(
        accuracy=accuracy,
        per_class_accuracy=per_class,
        confusion=confusion,
        history=history,
        model=model,
        config=config,
        nf_augment_stats=dict(nf_augment.stats) if nf_augment is not None else {},
    )


# --------------------------------------------------------------------------------- picture
def confusion_png(
    confusion: Tensor,
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Write a confusion-matrix PNG: rows true class, columns prediction, colours row-normalised
    (recall), counts printed when K <= 20, class names on the axes when K <= 40.

    Args:
        confusion: int ``[K, K]`` (e.g. :attr:`ClassifierResult.confusion`).
        class_names: K names.
        path: the PNG to write (parent directories are created).
        title: optional title (default: the overall accuracy).

    Returns:
        ``path`` as a ``Path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = torch.as_tensor(confusion).to(torch.float64)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ShapeError(f"confusion must be [{k}, {k}] for {k} class names, got {tuple(cm.shape)}")
    rows = cm.sum(dim=1, keepdim=True)
    recall = torch.where(rows > 0, cm / rows.clamp_min(1), torch.zeros_like(cm)).numpy()
    total = float(cm.sum())
    size = min(max(4.0, 0.45 * k + 2.0), 16.0)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(recall, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 40:
        ax.set_xticks(range(k), [str(c) for c in class_names], rotation=90)
        ax.set_yticks(range(k), [str(c) for c in class_names])
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j] > 0:
                    color = "white" if recall[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                            color=color)  # fmt: skip
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = float(cm.trace()) / total if total else float("nan")
    ax.set_title(title if title is not None else f"accuracy {acc:.4f} ({int(total)} images)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
