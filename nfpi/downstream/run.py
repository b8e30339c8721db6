"""What the paper does with a trained flow besides NF-Acc (pure PyTorch, no Ray).

``cnn`` (Tables 2-3, CNN-Acc): draw a labelled dataset from the trained flow and prior (as many
images per class as the real training set by default), train a classifier on it, test it on the
real test set. With ``reference=True`` the same classifier is also trained on the real training
set (the reference row).

``augment`` (Tables 5-6): train a classifier on the real training set, optionally with the NF
augmentation (latent mixup in the class's principal subspace, :mod:`nfpi.downstream.nf_augment`)
of the trained flow, alone or with standard augmentations (RandAugment, random erasing,
mixup/cutmix).

Both return flat metrics (top-1 and top-5 accuracy), per-epoch histories and the PNGs they
wrote. Everything is written under the output directory, which is also what a re-run resumes
from: a generated set whose manifest matches is reused, and each classifier continues after its
last checkpointed epoch (``<out>/classifier/<role>/``), bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch

from nfpi.checkpoint import load_trained
from nfpi.data import load_dataset
from nfpi.downstream.classifier import ClassifierConfig, ClassifierResult, train_classifier
from nfpi.downstream.generate import generate_dataset
from nfpi.downstream.generated import MANIFEST, GeneratedDataset
from nfpi.downstream.nf_augment import NFAugment
from nfpi.downstream.pool import PoolConfig, pooled_dataset
from nfpi.errors import ConfigError
from nfpi.plots import confusion_png
from nfpi.schema import Config, check

__all__ = ["DownstreamConfig", "DownstreamResult", "run_downstream"]

log = logging.getLogger(__name__)
EpochCallback = Callable[[str, int, dict[str, float]], None]

# The sections of DownstreamConfig.from_overrides' dotted keys: ``downstream.<field>`` and
# ``cnn.<classifier field>``.
_CNN, _DOWNSTREAM = "cnn", "downstream"


@dataclass(frozen=True)
class DownstreamConfig(Config):
    """A downstream evaluation of a trained flow; validated at construction.

    Attributes:
        kind: ``cnn`` (classifier on generated images) or ``augment`` (on real images, NF
            augmentation per ``classifier.nf_augment``).
        per_class: generated images per class (``None``: as many as the real training set's
            largest class, as in the paper).
        temperature: sampling temperature T of the generated set.
        seed: generation seed.
        batch_size: generation batch size.
        reference: ``cnn`` only: also train the classifier on the real training set.
        classifier: the classifier recipe (paper defaults).
        nf_pool: serve the NF augmentation (``classifier.nf_augment``; without it the pool
            setting is unused, so one ``--set`` can cover a sweep's with/without-NF trials) from
            precomputed pools (:mod:`nfpi.downstream.pool`; kept next to the flow's run
            directory, shared by every trial of that flow) instead of running the flow in the
            classifier's loop; ``None``: online.
        image_size: the side at which the classifier reads the real images (image folders,
            e.g. 448 for Table 6's EVA02, so that it sees the images at its own resolution, not
            the flow's 32 x 32 upsampled); ``None``: the flow's data resolution. Images the flow
            makes (generated sets, NF augmentation) are made at the flow's resolution and
            upsampled (bicubic, antialiased) to it.
        items_per_class: the real training images per class the classifier sees (a subset
            drawn with the flow's seed, as ``data.items_per_class`` draws one; Table 5 on a
            subset); ``None``: the flow's training set. The NF augmentation's class statistics
            still come from the flow's training set.
    """

    kind: Literal["cnn", "augment"] = "cnn"
    per_class: int | None = None
    temperature: float = 1.0
    seed: int = 0
    batch_size: int = 256
    reference: bool = False
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    nf_pool: PoolConfig | None = None
    image_size: int | None = None
    items_per_class: int | None = None

    def validate(self) -> None:
        check(
            self.image_size is None or self.image_size >= 1,
            "image_size",
            self.image_size,
            "None (the flow's resolution) or an int >= 1",
        )
        check(
            self.image_size is None or self.nf_pool is None,
            "image_size",
            self.image_size,
            "None with nf_pool (pools hold images at the flow's resolution): drop nf_pool to "
            "NF-augment online",
        )
        check(
            self.image_size is None or self.kind != "cnn" or self.classifier.input_size,
            "image_size",
            self.image_size,
            "None for kind='cnn' unless cnn.input_size is set (the generated images are made "
            "at the flow's resolution; cnn.input_size resizes them and the real test images "
            "alike)",
        )
        check(
            self.items_per_class is None or self.items_per_class >= 1,
            "items_per_class",
            self.items_per_class,
            "None (the flow's training set) or an int >= 1",
        )
        check(
            self.per_class is None or self.per_class >= 1,
            "per_class",
            self.per_class,
            "None or an int >= 1",
        )
        t = self.temperature
        check(math.isfinite(t) and t >= 0, "temperature", t, "a finite number >= 0")
        check(self.seed >= 0, "seed", self.seed, "an int >= 0")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        check(
            self.kind != "cnn" or self.classifier.nf_augment is None,
            "classifier.nf_augment",
            "set",
            "NF augmentation applies to kind='augment' (real data)",
        )

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any]) -> DownstreamConfig:
        """From dotted keys on top of the defaults: ``downstream.<field>`` and
        ``cnn.<classifier field>`` (``cnn.nf_augment`` a dict of NF-augmentation settings, or
        None; ``cnn.nf_augment.<field>`` sets one of them). Errors name the key as given
        (``cnn.nf_augment.probability``); unknown keys are rejected with their name."""
        known = sorted(f.name for f in fields(cls) if f.name != "classifier")
        dotted: dict[str, Any] = {}
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section == _DOWNSTREAM:
                if name.partition(".")[0] not in known:
                    raise ConfigError(
                        key, value, f"unknown key; known: {known} (the classifier's are cnn.*)"
                    )
                dotted[name] = value
            elif section == _CNN and name:
                dotted[f"classifier.{name}"] = value
            else:
                raise ConfigError(key, value, "a downstream.* or cnn.* key")
        try:
            return cls().with_overrides(dotted)
        except ConfigError as err:
            raise ConfigError(_override_key(err.field), err.value, err.allowed) from None


def _override_key(path: str) -> str:
    """A field path of DownstreamConfig as :meth:`DownstreamConfig.from_overrides` spells it."""
    head, _, tail = path.partition(".")
    if head == "classifier":
        return f"{_CNN}.{tail}" if tail else _CNN
    return f"{_DOWNSTREAM}.{path}"


@dataclass
class DownstreamResult:
    """Flat final metrics (``cnn_acc``, ``real_acc``, ``aug_acc``...), per-epoch classifier
    histories keyed by role, PNGs written, and the classifier results."""

    metrics: dict[str, float]
    histories: dict[str, list[dict[str, float]]]
    artifacts: list[Path]
    results: dict[str, ClassifierResult] = field(default_factory=dict)


class ResolutionBridge:
    """An :class:`NFAugment` for images larger than the flow's: each batch is resized to the
    flow's side (antialiased), augmented there, and the images the flow changed are upsampled
    (bicubic, antialiased) back over the originals; the others keep their full resolution.
    Same call, ``config`` and ``stats`` as the transform it wraps."""

    def __init__(self, nf: NFAugment, side: int) -> None:
        self.nf, self.side = nf, side
        self.config, self.stats = nf.config, nf.stats

    @staticmethod
    def _resize(x: torch.Tensor, side: int) -> torch.Tensor:
        out = torch.nn.functional.interpolate(
            x.float(), size=(side, side), mode="bicubic", antialias=True
        )
        return out.round().clamp(0, 255).to(torch.uint8)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        small = self._resize(x, self.side)
        mixed = self.nf(small, y, generator)
        changed = (mixed != small).flatten(1).any(dim=1)
        if not bool(changed.any()):
            return x
        out = x.clone()
        out[changed] = self._resize(mixed[changed], x.shape[-1])
        return out


def _train(
    role: str,
    train: Any,
    test: Any,
    k: int,
    cfg: ClassifierConfig,
    names: Any,
    out: Path,
    callback: EpochCallback | None,
    nf: NFAugment | ResolutionBridge | None = None,
) -> ClassifierResult:
    hook = None if callback is None else (lambda epoch, metrics: callback(role, epoch, metrics))
    result = train_classifier(
        train, test, k, cfg, callback=hook, nf_augment=nf, checkpoint_dir=out / "classifier" / role
    )
    confusion_png(
        result.confusion,
        names,
        out / f"confusion_{role}.png",
        title=f"{role}: accuracy {100 * result.accuracy:.2f}%",
    )
    log.info(
        "%s classifier: test accuracy %.4f (top-5 %.4f)",
        role,
        result.accuracy,
        result.top5_accuracy,
    )
    return result


def _reusable(
    folder: Path, config: DownstreamConfig, per_class: int, checkpoint: Path, epoch: int
) -> bool:
    """Whether ``folder`` already holds the complete set this run would generate (a resumed
    run: same checkpoint and epoch, count, temperature, seed and batch size)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    wanted = {
        "per_class": per_class,
        "temperature": config.temperature,
        "seed": config.seed,
        "batch_size": config.batch_size,
    }
    return (
        manifest.get("generation") == wanted
        and manifest.get("checkpoint") == str(checkpoint)
        and manifest.get("epoch") == epoch
    )


def run_downstream(
    checkpoint: str | Path | None,
    config: DownstreamConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    callback: EpochCallback | None = None,
) -> DownstreamResult:
    """Run ``config`` on the flow of ``checkpoint`` (a run directory, its ``checkpoints/``
    folder, an epoch folder or a state.pt; an ``augment`` run without NF augmentation does not
    use the flow but still needs the checkpoint's data config for the dataset: pass it). ``callback(role, epoch, metrics)`` sees every classifier
    epoch (role: ``generated``, ``real`` or ``augmented``)."""
    if checkpoint is None:
        raise ConfigError(
            "checkpoint", None, "a trained flow's checkpoint directory (it names the dataset too)"
        )
    out = Path(out_dir).expanduser().resolve()
    model = load_trained(checkpoint, device=device)  # a bad checkpoint fails before any output
    out.mkdir(parents=True, exist_ok=True)
    data = model.config.data
    seed = model.config.seed
    flow_train, info = load_dataset(data.name, "train", seed=seed, **data.split_kwargs("train"))
    train, test = flow_train, None
    upsampled = config.image_size is not None and config.image_size != info.shape[-1]
    if upsampled:
        if data.name != "imagefolder":
            raise ConfigError(
                "downstream.image_size",
                config.image_size,
                f"None for {data.name!r} (its images are {info.shape[-1]} x {info.shape[-1]}; "
                "cnn.input_size resizes them for the network) or an image folder",
            )
        data = data.replace(image_size=config.image_size)
    if config.items_per_class is not None:
        data = data.replace(items_per_class=config.items_per_class)
    if upsampled or config.items_per_class is not None:
        train, _ = load_dataset(data.name, "train", seed=seed, **data.split_kwargs("train"))
    test, _ = load_dataset(data.name, "test", seed=seed, **data.split_kwargs("test"))
    k, names = info.num_classes, info.class_names
    clf = config.classifier.replace(device=str(torch.device(device).type))
    metrics: dict[str, float] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    results: dict[str, ClassifierResult] = {}
    artifacts: list[Path] = []
    if config.kind == "cnn":
        per_class = config.per_class or int(
            torch.bincount(torch.as_tensor(train.targets), minlength=k).max()
        )
        gen_dir = out / "generated"
        source = Path(checkpoint).resolve()
        if _reusable(gen_dir, config, per_class, source, model.epoch):
            log.info("reusing the generated set in %s", gen_dir)
        else:
            # A classifier checkpointed on an earlier generated set must not be resumed.
            shutil.rmtree(out / "classifier" / "generated", ignore_errors=True)
            generate_dataset(
                model,
                gen_dir,
                per_class=per_class,
                temperature=config.temperature,
                seed=config.seed,
                batch_size=config.batch_size,
                device=device,
                checkpoint=source,
                overwrite=True,
            )
        results["generated"] = _train(
            "generated", GeneratedDataset(gen_dir), test, k, clf, names, out, callback
        )
        metrics.update(
            cnn_acc=results["generated"].accuracy,
            cnn_top5=results["generated"].top5_accuracy,
            generated_per_class=float(per_class),
        )
        if config.reference:
            results["real"] = _train("real", train, test, k, clf, names, out, callback)
            metrics["real_acc"] = results["real"].accuracy
            metrics["real_top5"] = results["real"].top5_accuracy
    else:
        nf = None
        role = "augmented" if clf.nf_augment is not None else "real"
        if clf.nf_augment is not None and config.nf_pool is not None:
            train, build_s = pooled_dataset(
                checkpoint, train, clf.nf_augment, config.nf_pool, clf.epochs, device=device
            )
            metrics["nf_pool_build_s"] = build_s
            clf = clf.replace(nf_augment=None)  # served by the dataset, not in the loop
        elif clf.nf_augment is not None:
            nf_cfg = clf.nf_augment.replace(checkpoint=str(checkpoint))
            nf = NFAugment.from_checkpoint(nf_cfg, flow_train, device=device)
            if upsampled:
                nf = ResolutionBridge(nf, info.shape[-1])
        results[role] = _train(role, train, test, k, clf, names, out, callback, nf)
        metrics["aug_acc"] = results[role].accuracy
        metrics["aug_top5"] = results[role].top5_accuracy
    for role, res in results.items():
        histories[role] = res.history
        artifacts.append(out / f"confusion_{role}.png")
        for c, acc in enumerate(res.per_class_accuracy.tolist()):
            if not math.isnan(acc):
                metrics[f"{role}_acc_class_{c}"] = acc
    return DownstreamResult(metrics, histories, artifacts, results)
