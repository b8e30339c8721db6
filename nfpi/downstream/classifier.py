"""CNN-Acc: a classifier trained on (generated or real) images and tested on the real test set.

The paper's recipe (section 5.2; method notes section 7): ResNet-18 with the CIFAR stem (3x3
stride-1 first convolution, no max-pool; :mod:`nfpi.downstream.models`), SGD (momentum 0.9,
weight decay 5e-4), one-cycle schedule with maximum learning rate 0.1, batch 100, 30 epochs on
CIFAR-10 and 50 on CIFAR-100, random crop (padding 4) + horizontal flip. CNN-Acc trains it on a
:mod:`nfpi.downstream.generate` set; the reference row trains the same classifier on the real
training set (just pass that set).

Table 5's augmentation switches compose in this order, per batch (on the CPU, before the batch
moves to the device):

    NF augmentation (uint8) -> random crop + flip (uint8) -> RandAugment (uint8)
      -> normalisation (float) -> random erasing -> mixup / cutmix (soft targets)

The uint8 steps are vectorised over the batch (:mod:`nfpi.downstream.augment`,
:mod:`nfpi.downstream.nf_augment`); random erasing and mixup/cutmix are timm's.

Example::

    train = GeneratedDataset("gen/cifar10_T0.7")
    test, info = load_dataset("cifar10", "test", root=...)
    result = train_classifier(train, test, info.num_classes, ClassifierConfig(epochs=30))
    confusion_png(result.confusion, info.class_names, "confusion.png")  # nfpi.plots
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import Tensor, nn

from nfpi.data import epoch_seed, make_loader, set_loader_epoch
from nfpi.downstream.augment import BatchCropFlip, BatchRandAugment
from nfpi.downstream.models import UInt8Classifier, build_classifier
from nfpi.downstream.nf_augment import NFAugment, NFAugmentConfig
from nfpi.errors import ConfigError, DatasetNotFoundError, LabelRangeError, ShapeError
from nfpi.schema import Config, check, is_int

__all__ = [
    "ClassifierConfig",
    "ClassifierResult",
    "channel_stats",
    "evaluate_classifier",
    "train_classifier",
]

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class ClassifierConfig(Config):
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
        nf_augment: NF augmentation settings (``None`` = off); see
            :mod:`nfpi.downstream.nf_augment`.
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

    def validate(self) -> None:
        def need(cond: bool, name: str, allowed: str) -> None:
            check(cond, name, getattr(self, name), allowed)

        need(bool(self.model), "model", "a timm model name")
        for name in ("epochs", "eval_batch_size"):
            need(getattr(self, name) >= 1, name, "an int >= 1")
        need(self.batch_size >= 2, "batch_size", "an int >= 2")
        for name in ("seed", "num_workers", "crop_padding"):
            need(getattr(self, name) >= 0, name, "an int >= 0")
        need(0 < self.max_lr < math.inf, "max_lr", "a number > 0")
        for name in ("div_factor", "final_div_factor"):
            need(1 <= getattr(self, name) < math.inf, name, "a number >= 1")
        need(0 < self.pct_start < 1, "pct_start", "in (0, 1)")
        need(0 <= self.momentum < 1, "momentum", "in [0, 1)")
        need(0 <= self.weight_decay < math.inf, "weight_decay", "a number >= 0")
        need(not self.nesterov or self.momentum > 0, "nesterov", "false when momentum is 0 (SGD)")
        need(1 <= self.randaugment_ops <= 10, "randaugment_ops", "an int in [1, 10]")
        need(
            0 <= self.randaugment_magnitude <= 30,
            "randaugment_magnitude",
            "an int in [0, 30] (of 31 magnitude bins)",
        )
        need(0 <= self.random_erasing <= 1, "random_erasing", "a probability in [0, 1]")
        for name in ("mixup", "cutmix"):
            need(0 <= getattr(self, name) < math.inf, name, "alpha >= 0")
        need(0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)")
        need(
            (self.mixup == 0 and self.cutmix == 0) or self.batch_size % 2 == 0,
            "batch_size",
            "an even int when mixup/cutmix is on (timm mixes a batch with its reverse)",
        )


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
            :class:`~nfpi.downstream.generated.GeneratedDataset` for CNN-Acc or the real
            training set for the reference row (use it un-augmented: augmentation happens here).
        test_dataset: the real test set, same image shape.
        num_classes: K.
        config: the recipe (default :class:`ClassifierConfig()`).
        callback: ``callback(epoch, metrics)`` after each epoch (logging, MLflow, Tune).
        nf_augment: a ready :class:`~nfpi.downstream.nf_augment.NFAugment` (then
            ``config.nf_augment`` may be ``None``: the transform's own config is recorded in the
            result); otherwise one is built from ``config.nf_augment.checkpoint`` and fitted on
            ``train_dataset``.

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
        if hasattr(train_dataset, "set_epoch"):  # e.g. PooledNFDataset: the epoch's NF variants
            train_dataset.set_epoch(epoch)
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
