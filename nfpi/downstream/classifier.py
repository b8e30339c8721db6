"""CNN-Acc: a classifier trained on (generated or real) images and tested on the real test set.

The paper's recipe (section 5.2; method notes section 7): ResNet-18 with the CIFAR stem (3x3
stride-1 first convolution, no max-pool; :mod:`nfpi.downstream.models`), SGD (momentum 0.9,
weight decay 5e-4), one-cycle schedule with maximum learning rate 0.1, batch 100, 30 epochs on
CIFAR-10 and 50 on CIFAR-100, random crop (padding 4) + horizontal flip. CNN-Acc trains it on a
:mod:`nfpi.downstream.generate` set; the reference row trains the same classifier on the real
training set (just pass that set).

Other recipes (Tables 5 and 6) choose any timm model with its keyword arguments
(``model_kwargs``, e.g. a CIFAR-sized Swin), local pretrained weights (``pretrained_path``),
SGD or AdamW (timm's, no weight decay on norms and biases), a one-cycle, cosine (with linear
warm-up) or constant schedule, gradient clipping and AutoAugment; every epoch reports top-1
and top-5 test accuracy.

The augmentation switches compose in this order, per batch (on the CPU, before the batch moves
to the device):

    NF augmentation (uint8) -> random crop + flip (uint8) -> AutoAugment (uint8)
      -> RandAugment (uint8) -> normalisation (float, resized to input_size) -> random erasing
      -> mixup / cutmix (soft targets)

The uint8 steps are vectorised over the batch (:mod:`nfpi.downstream.augment`,
:mod:`nfpi.downstream.nf_augment`); random erasing and mixup/cutmix are timm's.

The classifier trains through the epoch loop every model shares (:func:`nfpi.epochs.fit_epochs`,
the flow's too), as a recipe (:class:`ClassifierRecipe`). With ``checkpoint_dir`` that directory
is the classifier's run directory, laid out as a flow's (:class:`nfpi.checkpoint.CheckpointStore`):
``checkpoints/epoch-NNNN/state.pt`` after every finished epoch (model, optimiser, schedule,
history, last test; verified before written, the last 3 kept, read with ``weights_only=True``),
``config.json`` and ``metrics.jsonl``. A later call with the same config and directory resumes
after the last saved epoch, bit-identical to an uninterrupted run (every epoch's randomness is a
function of ``(seed, epoch)``).

Example::

    train = GeneratedDataset("gen/cifar10_T1")
    test, info = load_dataset("cifar10", "test", root=...)
    result = train_classifier(train, test, info.num_classes, ClassifierConfig(epochs=30))
    confusion_png(result.confusion, info.class_names, "confusion.png")  # nfpi.plots
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from torch import Tensor, nn

from nfpi.checkpoint import CheckpointStore
from nfpi.data import epoch_seed, make_loader, set_loader_epoch
from nfpi.device import resolve_device
from nfpi.downstream.augment import (
    BatchAutoAugment,
    BatchCropFlip,
    BatchRandAugment,
)
from nfpi.downstream.models import UInt8Classifier, build_classifier
from nfpi.downstream.nf_augment import NFAugment, NFAugmentConfig
from nfpi.epochs import EpochResult, fit_epochs
from nfpi.errors import (
    CheckpointError,
    ConfigError,
    DatasetNotFoundError,
    LabelRangeError,
    ShapeError,
)
from nfpi.schema import Config, check, is_int

__all__ = [
    "CLASSIFIER_KEYS",
    "ClassifierConfig",
    "ClassifierRecipe",
    "ClassifierResult",
    "channel_stats",
    "evaluate_classifier",
    "evaluate_topk",
    "train_classifier",
]

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]
#: The entries that make a state a classifier checkpoint (:class:`nfpi.checkpoint.CheckpointStore`).
CLASSIFIER_KEYS = ("config", "model")
# Config keys that may differ between a run and its resumption (where it runs, not what).
_RESUMABLE_CHANGES = ("device", "num_workers", "eval_batch_size")
_TIMM_OWNED_KWARGS = ("num_classes", "in_chans", "pretrained")


@dataclass(frozen=True)
class ClassifierConfig(Config):
    """How the classifier is trained (defaults: the paper's CIFAR-10 recipe).

    Attributes:
        model: a timm model name (``"resnet18"``: 11.2 M parameters as in the paper).
        model_kwargs: more keyword arguments of ``timm.create_model`` (e.g. ``{"img_size": 32,
            "patch_size": 2, "window_size": 4}`` for a CIFAR-sized Swin); ``num_classes``,
            ``in_chans`` and ``pretrained`` are set from the data.
        pretrained_path: a local weights file of this architecture (loaded with
            ``weights_only=True``; a head of another size is re-initialised); ``None`` =
            random initialisation. Nothing is ever downloaded.
        input_size: resize the normalised images to this side for the network (e.g. 448 for an
            EVA02 pretrained at 448 on a 64 x 64 dataset); ``None`` = as they are.
        cifar_stem: replace a ResNet's stem by a 3x3 stride-1 conv without max-pool; ``None``
            = automatically for ResNets on images of side <= 64 without pretrained weights.
        epochs: 30 for CIFAR-10, 50 for CIFAR-100 in the paper.
        batch_size: 100 (even when mixup/cutmix is on: timm mixes the batch with its flip).
        optimizer: ``sgd`` (torch's, weight decay on every parameter, as the paper's ResNet
            recipe) or ``adamw`` (timm's, no weight decay on norms, biases and position
            embeddings, as transformer recipes).
        schedule: ``onecycle`` (from ``max_lr / div_factor`` up to ``max_lr`` and down),
            ``cosine`` (linear warm-up over ``warmup_epochs`` to ``max_lr``, then cosine to
            ``min_lr``) or ``constant`` (``max_lr`` after the warm-up), stepped per batch.
        warmup_epochs: linear warm-up of the cosine and constant schedules (may be fractional).
        min_lr: the cosine schedule's final learning rate.
        betas: AdamW's.
        grad_clip: clip the global gradient norm to this value (``None`` = off).
        max_lr: peak (or constant) learning rate (0.1 for the one-cycle ResNet).
        div_factor: initial lr = ``max_lr / div_factor``; 100 gives the paper's stated SGD
            learning rate 1e-3 below the one-cycle peak 0.1.
        final_div_factor: final lr = initial lr / ``final_div_factor`` (torch's default).
        pct_start: share of the steps spent warming up (torch's default 0.3).
        cycle_momentum: let OneCycleLR cycle the momentum in [0.85, 0.95]; off by default so
            that SGD's momentum is the paper's 0.9 throughout.
        momentum, nesterov: SGD's.
        weight_decay: SGD's L2 or AdamW's decoupled decay.
        crop: random crop of the image size after zero padding by ``crop_padding``.
        crop_padding: 4 (CIFAR's standard).
        flip: random horizontal flip (off for glyphs such as digits).
        randaugment: RandAugment (torchvision's op set) with ``randaugment_ops`` operations of
            magnitude ``randaugment_magnitude`` (of 31 bins).
        randaugment_ops: RandAugment's number of operations per image.
        randaugment_magnitude: RandAugment's magnitude (of 31 bins).
        autoaugment: AutoAugment with torchvision's ``cifar10`` or ``imagenet`` policy
            (``None`` = off).
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
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained_path: str | None = None
    input_size: int | None = None
    cifar_stem: bool | None = None
    epochs: int = 30
    batch_size: int = 100
    optimizer: Literal["sgd", "adamw"] = "sgd"
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
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
    autoaugment: Literal["cifar10", "imagenet"] | None = None
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
        need(
            isinstance(self.model_kwargs, dict)
            and all(isinstance(k, str) for k in self.model_kwargs)
            and not set(self.model_kwargs) & set(_TIMM_OWNED_KWARGS),
            "model_kwargs",
            f"a mapping of timm.create_model keywords other than {_TIMM_OWNED_KWARGS} "
            "(those come from the data)",
        )
        need(
            self.pretrained_path is None or bool(self.pretrained_path),
            "pretrained_path",
            "None or the path of a local weights file",
        )
        need(self.input_size is None or self.input_size >= 1, "input_size", "None or an int >= 1")
        need(0 <= self.warmup_epochs < math.inf, "warmup_epochs", "a number >= 0")
        need(
            self.schedule != "onecycle" or self.warmup_epochs == 0,
            "warmup_epochs",
            "0 with schedule='onecycle' (its warm-up is pct_start)",
        )
        need(0 <= self.min_lr <= self.max_lr, "min_lr", f"in [0, max_lr = {self.max_lr}]")
        need(all(0 <= b < 1 for b in self.betas), "betas", "AdamW betas in [0, 1)")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "None or a norm > 0")
        need(
            self.optimizer == "sgd" or not self.nesterov,
            "nesterov",
            "false with optimizer='adamw' (an SGD option)",
        )
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
        top5_accuracy: share of test images whose class is among the 5 highest logits (among
            all of them when K < 5).
        per_class_accuracy: ``[K]`` float64, recall per class (NaN for a class absent from the
            test set).
        confusion: int64 ``[K, K]``, rows = true class, columns = prediction; sums to the test
            set size.
        history: one metrics dict per epoch (``epoch``, ``train_loss``, ``train_acc``,
            ``test_acc``, ``test_top5``, ``lr``, ``epoch_seconds``).
        model: the trained classifier (takes uint8 images), in eval mode.
        config: the config that ran (with the NF augmentation's own config filled in).
        nf_augment_stats: counters of the NF augmentation (empty when off).
        resumed_epochs: epochs read from a checkpoint instead of trained in this call.
    """

    accuracy: float
    top5_accuracy: float
    per_class_accuracy: Tensor
    confusion: Tensor
    history: list[dict[str, float]]
    model: UInt8Classifier
    config: ClassifierConfig
    nf_augment_stats: dict[str, int] = field(default_factory=dict)
    resumed_epochs: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no model)."""
        return {
            "accuracy": self.accuracy,
            "top5_accuracy": self.top5_accuracy,
            "per_class_accuracy": [float(a) for a in self.per_class_accuracy],
            "confusion": self.confusion.tolist(),
            "history": self.history,
            "config": self.config.to_dict(),
            "nf_augment_stats": dict(self.nf_augment_stats),
        }


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
def evaluate_topk(
    model: nn.Module,
    dataset: Any,
    num_classes: int,
    *,
    batch_size: int = 500,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    k: int = 5,
) -> tuple[float, float, Tensor]:
    """Top-1 accuracy, top-``k`` accuracy (``k`` capped at K) and the confusion matrix (int64
    ``[K, K]``, rows true, columns predicted) of a uint8-image classifier on ``dataset`` (no
    augmentation)."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64)
    in_top, k = 0, min(k, num_classes)
    try:
        for x, y in make_loader(
            dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers
        ):
            if int(y.min()) < 0 or int(y.max()) >= num_classes:
                raise LabelRangeError(
                    f"test labels span [{int(y.min())}, {int(y.max())}], the classifier has "
                    f"{num_classes} classes"
                )
            logits = model(x.to(device)).cpu()
            pred = logits.argmax(dim=1)
            confusion += torch.bincount(y * num_classes + pred, minlength=num_classes**2)
            in_top += int((logits.topk(k, dim=1).indices == y[:, None]).any(dim=1).sum())
    finally:
        model.train(was_training)
    confusion = confusion.view(num_classes, num_classes)
    total = int(confusion.sum())
    if not total:
        return float("nan"), float("nan"), confusion
    return float(confusion.trace()) / total, in_top / total, confusion


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
    uint8-image classifier on ``dataset`` (no augmentation); :func:`evaluate_topk` adds top-5."""
    acc, _, confusion = evaluate_topk(
        model,
        dataset,
        num_classes,
        batch_size=batch_size,
        device=device,
        num_workers=num_workers,
    )
    return acc, confusion


def _seed_all(seed: int, epoch: int) -> torch.Generator:
    """Seed every RNG an epoch's augmentation touches (timm's random erasing uses ``random``,
    its mixup ``numpy``); returns the generator for the vectorised steps."""
    s = epoch_seed(seed, epoch)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
    return torch.Generator().manual_seed(s)


def _optimizer(model: UInt8Classifier, config: ClassifierConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        # timm's grouping: no weight decay on 1-d parameters and the model's no_weight_decay().
        return create_optimizer_v2(
            model.net,
            opt="adamw",
            lr=config.max_lr,
            weight_decay=config.weight_decay,
            betas=config.betas,
        )
    start = config.max_lr / config.div_factor if config.schedule == "onecycle" else config.max_lr
    return torch.optim.SGD(
        model.parameters(),
        lr=start,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )


def _scheduler(
    optimizer: torch.optim.Optimizer, config: ClassifierConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-batch schedule; cosine and constant are a pure function of the step (LambdaLR),
    so a resumed run continues them exactly."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.max_lr,
            total_steps=total,
            pct_start=config.pct_start,
            div_factor=config.div_factor,
            final_div_factor=config.final_div_factor,
            cycle_momentum=config.cycle_momentum,
        )
    warm = round(config.warmup_epochs * steps_per_epoch)
    floor = config.min_lr / config.max_lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    for group in optimizer.param_groups:
        group["lr"] = config.max_lr
        group["initial_lr"] = config.max_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES}


class ClassifierRecipe:
    """The classifier's recipe for the shared epoch loop (:func:`nfpi.epochs.fit_epochs`): its
    model, augmentation pipeline, optimiser and schedule, one epoch's training and test, and
    what its checkpoint holds. :func:`train_classifier` runs it; the arguments are its.

    Attributes:
        epoch: epochs finished; history: their metrics.
        accuracy, top5, confusion: the test of the last finished epoch.
    """

    def __init__(
        self,
        train_dataset: Any,
        test_dataset: Any,
        num_classes: int,
        config: ClassifierConfig,
        nf_augment: NFAugment | None = None,
    ) -> None:
        if not is_int(num_classes) or num_classes < 2:
            raise ConfigError("num_classes", num_classes, "an int >= 2")
        shape = _image_shape(train_dataset, "training")
        test_shape = _image_shape(test_dataset, "test")
        if test_shape != shape:
            raise ShapeError(
                f"training images are {shape}, test images {test_shape}: they must match"
            )
        n = len(train_dataset)
        if n < config.batch_size:
            raise ConfigError(
                "batch_size", config.batch_size, f"<= the training set size {n} (batches are full)"
            )
        self.train_dataset, self.test_dataset, self.num_classes = (
            train_dataset,
            test_dataset,
            num_classes,
        )
        self.device = device = resolve_device(config.device)
        c, h, w = shape

        torch.manual_seed(config.seed)
        net = build_classifier(
            config.model,
            num_classes,
            c,
            min(h, w),
            cifar_stem=config.cifar_stem,
            pretrained_path=config.pretrained_path,
            **config.model_kwargs,
        )
        mean, std = (
            channel_stats(train_dataset)
            if config.normalize == "dataset"
            else ([127.5] * c, [127.5] * c)
        )
        self.model = UInt8Classifier(net, mean, std, config.input_size).to(device)

        if nf_augment is None and config.nf_augment is not None:
            nf_augment = NFAugment.from_checkpoint(config.nf_augment, train_dataset, device=device)
        if nf_augment is not None:
            config = config.replace(nf_augment=nf_augment.config)
        self.config, self.nf_augment = config, nf_augment
        self.crop_flip = BatchCropFlip(config.crop_padding if config.crop else 0, config.flip)
        self.autoaug = (
            BatchAutoAugment(config.autoaugment) if config.autoaugment is not None else None
        )
        self.randaug = (
            BatchRandAugment(config.randaugment_ops, config.randaugment_magnitude)
            if config.randaugment
            else None
        )
        self.erasing = (
            RandomErasing(config.random_erasing, mode="pixel", device=str(device))
            if config.random_erasing > 0
            else None
        )
        self.mixup = (
            Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                label_smoothing=config.label_smoothing,
                num_classes=num_classes,
            )
            if config.mixup > 0 or config.cutmix > 0
            else None
        )
        self.criterion: nn.Module = (
            SoftTargetCrossEntropy()
            if self.mixup is not None
            else nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        )
        self.steps = n // config.batch_size
        self.optimizer = _optimizer(self.model, config)
        self.scheduler = _scheduler(self.optimizer, config, self.steps)
        self.loader = make_loader(
            train_dataset,
            config.batch_size,
            shuffle=True,
            seed=config.seed,
            num_workers=config.num_workers,
            drop_last=True,
        )
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.accuracy = self.top5 = float("nan")

    def run_epoch(self, epoch: int) -> EpochResult:
        """One epoch: training steps over the epoch's augmented batches, then the test."""
        config, model = self.config, self.model
        gen = _seed_all(config.seed, epoch)
        set_loader_epoch(self.loader, config.seed, epoch)
        if hasattr(self.train_dataset, "set_epoch"):  # e.g. PooledNFDataset: its NF variants
            self.train_dataset.set_epoch(epoch)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in self.loader:
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise LabelRangeError(
                    f"training labels span [{int(y.min())}, {int(y.max())}], expected "
                    f"[0, {self.num_classes})"
                )
            xf = self._augmented(x, y, gen)
            y = y.to(self.device)
            if self.erasing is not None:
                xf = self.erasing(xf)
            target = y
            if self.mixup is not None:
                xf, target = self.mixup(xf, y)
            logits = model.net(xf)
            loss = self.criterion(logits, target)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(dim=1) == y).sum())
            seen += len(y)
        self.accuracy, self.top5, self.confusion = evaluate_topk(
            model,
            self.test_dataset,
            self.num_classes,
            batch_size=config.eval_batch_size,
            device=self.device,
            num_workers=config.num_workers,
        )
        metrics = {
            "epoch": float(epoch),
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_acc": self.accuracy,
            "test_top5": self.top5,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }
        return EpochResult(epoch, metrics)

    def _augmented(self, x: Tensor, y: Tensor, gen: torch.Generator) -> Tensor:
        """The uint8 steps of the pipeline (module docstring), then the normalised float batch
        on the device."""
        if self.nf_augment is not None:
            x = self.nf_augment(x, y, gen)
        x = self.crop_flip(x, gen)
        if self.autoaug is not None:
            x = self.autoaug(x, gen)
        if self.randaug is not None:
            x = self.randaug(x, gen)
        return self.model.normalize(x.to(self.device, non_blocking=True))

    def guarded_state(self) -> dict[str, Any]:
        """What the divergence guard checks after every epoch: the weights and the optimiser."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint: everything a resume needs (tensors and plain values)."""
        return {
            "epoch": self.epoch,
            "config": self.config.to_dict(),
            "train_size": len(self.train_dataset),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "confusion": self.confusion,
            "accuracy": self.accuracy,
            "top5": self.top5,
            "nf_augment_stats": self._nf_stats(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint of the same config (only :data:`_RESUMABLE_CHANGES` may
        differ) and training set size.

        Raises:
            CheckpointError: it was written by another run (the message names what differs).
        """
        ours, theirs = _comparable(self.config.to_dict()), _comparable(state["config"])
        n = len(self.train_dataset)
        if ours != theirs or state.get("train_size") != n:
            differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            if state.get("train_size") != n:
                differ.append(f"training set size ({state.get('train_size')} -> {n})")
            raise CheckpointError(
                f"the classifier checkpoint {state.get('_file')} was written by another run "
                f"(differs in {differ}); use another output directory, or --fresh / delete its "
                "checkpoints/ to start from epoch 0"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history, self.confusion = list(state["history"]), state["confusion"]
        self.accuracy, self.top5, self.epoch = state["accuracy"], state["top5"], int(state["epoch"])
        if self.nf_augment is not None:
            self.nf_augment.stats.update(state["nf_augment_stats"])

    def _nf_stats(self) -> dict[str, int]:
        return dict(self.nf_augment.stats) if self.nf_augment is not None else {}

    def result(self, resumed_epochs: int) -> ClassifierResult:
        """The :class:`ClassifierResult` of the recipe as it stands (the model in eval mode)."""
        self.model.eval()
        rows = self.confusion.sum(dim=1).to(torch.float64)
        return ClassifierResult(
            accuracy=self.accuracy,
            top5_accuracy=self.top5,
            per_class_accuracy=self.confusion.diag().to(torch.float64) / rows,
            confusion=self.confusion,
            history=self.history,
            model=self.model,
            config=self.config,
            nf_augment_stats=self._nf_stats(),
            resumed_epochs=resumed_epochs,
        )


def train_classifier(
    train_dataset: Any,
    test_dataset: Any,
    num_classes: int,
    config: ClassifierConfig | None = None,
    *,
    callback: EpochCallback | None = None,
    nf_augment: NFAugment | None = None,
    checkpoint_dir: str | Path | None = None,
) -> ClassifierResult:
    """Train a classifier on ``train_dataset`` and test it on ``test_dataset`` every epoch: the
    :class:`ClassifierRecipe` through the epoch loop every model shares
    (:func:`nfpi.epochs.fit_epochs`).

    One optimiser step per batch with the configured schedule; the last incomplete training
    batch is dropped (equal batch sizes for BatchNorm and mixup). Runs are reproducible given
    ``config.seed`` on a given machine (model init from the seed, shuffling and augmentation
    from ``epoch_seed(seed, epoch)``). An epoch whose loss or weights are not finite raises
    :class:`~nfpi.errors.DivergenceError` and is not saved.

    Args:
        train_dataset: map-style, items ``(uint8 [C, H, W], int)``: a
            :class:`~nfpi.downstream.generated.GeneratedDataset` for CNN-Acc or the real
            training set for the reference row (use it un-augmented: augmentation happens here).
        test_dataset: the real test set, same image shape.
        num_classes: K.
        config: the recipe (default :class:`ClassifierConfig()`).
        callback: ``callback(epoch, metrics)`` after each epoch trained in this call (logging,
            MLflow, Tune), once its checkpoint is saved.
        nf_augment: a ready :class:`~nfpi.downstream.nf_augment.NFAugment` (then
            ``config.nf_augment`` may be ``None``: the transform's own config is recorded in the
            result); otherwise one is built from ``config.nf_augment.checkpoint`` and fitted on
            ``train_dataset``.
        checkpoint_dir: the classifier's run directory: every finished epoch is checkpointed
            there and a later call resumes from it (see the module docstring); ``None`` = no
            checkpoints.

    Returns:
        :class:`ClassifierResult`.

    Raises:
        CheckpointError: ``checkpoint_dir`` holds the checkpoint of another config, or history
            without a checkpoint that loads.
        DivergenceError: an epoch diverged.
    """
    recipe = ClassifierRecipe(
        train_dataset, test_dataset, num_classes, config or ClassifierConfig(), nf_augment
    )
    config = recipe.config
    store = None
    if checkpoint_dir is not None:
        store = CheckpointStore(checkpoint_dir, required=CLASSIFIER_KEYS)
    with store.locked() if store is not None else nullcontext():
        if store is not None:
            _, state = store.resume()
            if state is not None:
                recipe.load_state_dict(state)
                log.info(
                    "classifier: resuming after epoch %d of %d from %s",
                    recipe.epoch,
                    config.epochs,
                    store.run_dir,
                )
            store.write_config(config.to_dict())
            store.write_metrics(recipe.history)
        resumed = recipe.epoch
        log.info(
            "classifier %s: %d training images, %d epochs x %d steps, device %s",
            config.model,
            len(train_dataset),
            config.epochs,
            recipe.steps,
            recipe.device,
        )
        hooks = [] if callback is None else [lambda r: callback(r.epoch, r.metrics)]
        fit_epochs(recipe, config.epochs, store=store, callbacks=hooks, name="classifier ")
    return recipe.result(resumed)
