"""Experiment configuration: one frozen, typed :class:`ExperimentConfig` per run.

The sections (data, flow, prior, optim, ema, eval) are :class:`~nfpi.schema.Config` dataclasses:
checked at construction against their annotations (allowed values of ``Literal`` fields read from
the annotation), built from nested dicts or dotted overrides (``{"prior.objective.lam": 300}``,
what a Tune trial receives), never mutated afterwards. Unknown keys and invalid values raise
:class:`~nfpi.errors.ConfigError` naming the dotted field. The config that ran is the config that
is logged and checkpointed. Where a run writes (its run directory) is not part of the experiment:
it is passed to the trainer separately, so the same experiment config can run anywhere.

Named experiments (small overrides of this base) live in :mod:`nfpi.presets`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nfpi.prior.fpi import FPIConfig
from nfpi.prior.gaussian import Covariance
from nfpi.prior.gd import GDConfig
from nfpi.prior.objective import Objective
from nfpi.prior.service import PriorMethod
from nfpi.schema import Config, check, is_number

__all__ = [
    "DataConfig",
    "EMAConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FlowConfig",
    "OptimConfig",
    "PriorConfig",
]


@dataclass(frozen=True)
class DataConfig(Config):
    """Dataset and loading. ``root`` is required for cifar10/100 and imagefolder (absolute
    paths are safest: Ray workers and jobs change the working directory).

    ``decode_cache`` (imagefolder): decode the images once into a uint8 file under
    ``cache_dir`` (default ``$NFPI_DATA_CACHE/decoded``, else ``~/.cache/nfpi/decoded``) that
    every epoch, rank and later run memory-maps instead of decoding the files again
    (:mod:`nfpi.data.cache`); data-parallel ranks decode one block each. Skipped, with a
    warning, when it does not fit on that disk. On a multi-node run ``cache_dir`` must be on
    the shared file system. ``in_memory`` (imagefolder) instead decodes into RAM in every
    process (one-process runs of a small set); not both. ``num_workers``: DataLoader processes
    per rank (decoding).

    Attributes:
        name: the dataset: ``digits`` (scikit-learn's, bundled), ``cifar10``, ``cifar100``,
            ``imagefolder`` (root/{train,test|val}/<class>/*) or ``synthetic``.
        root: the dataset's folder or archive (required for cifar10/100 and imagefolder).
        items_per_class: training images per class (None: all).
        test_items_per_class: test images per class (None: all).
        augment: the paper's training augmentation (random flips/shifts) on or off.
        image_size: resize images to this side (imagefolder; None: as stored).
        num_workers: DataLoader processes per rank (decoding).
        download: let torchvision download cifar10/100 (needs the internet).
        num_classes: number of classes of ``synthetic`` data.
        shape: (C, H, W) of ``synthetic`` data.
        in_memory: decode every imagefolder image once into RAM (per process).
        decode_cache: decode imagefolder images once into a uint8 file every rank memory-maps.
        cache_dir: where ``decode_cache`` writes (None: $NFPI_DATA_CACHE/decoded or
            ~/.cache/nfpi/decoded).
    """

    name: Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    root: str | None = None
    items_per_class: int | None = None
    test_items_per_class: int | None = None
    augment: bool = True
    image_size: int | None = None
    num_workers: int = 0
    download: bool = False
    num_classes: int | None = None  # synthetic only
    shape: tuple[int, int, int] | None = None  # synthetic only
    in_memory: bool = False  # imagefolder only: decode every image once, keep them in RAM
    decode_cache: bool = False  # imagefolder only
    cache_dir: str | None = None

    def split_kwargs(self, split: str) -> dict[str, object]:
        """The keyword arguments of :func:`nfpi.data.load_dataset` for ``split`` (``train`` or
        ``test``): its per-class subset plus :meth:`dataset_kwargs`."""
        per_class = self.items_per_class if split == "train" else self.test_items_per_class
        return {"items_per_class": per_class, **self.dataset_kwargs()}

    def dataset_kwargs(self) -> dict[str, object]:
        """The keyword arguments of :func:`nfpi.data.load_dataset` that this dataset takes."""
        if self.name in ("cifar10", "cifar100"):
            return {"root": self.root, "download": self.download}
        if self.name == "imagefolder":
            return {"root": self.root, "image_size": self.image_size, "in_memory": self.in_memory}
        if self.name == "synthetic":
            given = (("num_classes", self.num_classes), ("shape", self.shape))
            return {k: v for k, v in given if v is not None}
        return {}

    def validate(self) -> None:
        for key in ("items_per_class", "test_items_per_class", "image_size"):
            value = getattr(self, key)
            check(value is None or value >= 1, key, value, "None or an int >= 1")
        check(self.num_workers >= 0, "num_workers", self.num_workers, "an int >= 0")
        if self.name in ("cifar10", "cifar100", "imagefolder"):
            check(
                self.root is not None,
                "root",
                self.root,
                f"a dataset path (required for {self.name!r}): --set data.root=/abs/path",
            )
        if self.name != "synthetic":
            for key in ("num_classes", "shape"):
                value = getattr(self, key)
                check(value is None, key, value, "only for data.name='synthetic'")
        check(
            not self.in_memory or self.name == "imagefolder",
            "in_memory",
            self.in_memory,
            "false unless data.name='imagefolder' (the other datasets are in memory already)",
        )
        check(
            not self.decode_cache or self.name == "imagefolder",
            "decode_cache",
            self.decode_cache,
            "false unless data.name='imagefolder' (the other datasets are in memory already)",
        )
        check(
            not (self.decode_cache and self.in_memory),
            "decode_cache",
            self.decode_cache,
            "false with data.in_memory=true: choose one (in_memory: every process decodes and "
            "holds its own copy in RAM; decode_cache: decoded once into a file on disk that "
            "every rank, epoch and run memory-maps)",
        )
        check(
            self.cache_dir is None or self.decode_cache,
            "cache_dir",
            self.cache_dir,
            "None unless data.decode_cache=true",
        )


@dataclass(frozen=True)
class FlowConfig(Config):
    """Flow architecture: a preset of :data:`nfpi.flows.PRESETS` plus optional overrides.

    ``attention`` / ``attention_heads``: the release's attention layers after every coupling
    net (:mod:`nfpi.flows.attention`; preset ``mef-cifar-attn``).

    ``init_from`` (pretrain, then fine-tune): a run directory or checkpoint of a run with the
    same flow architecture (e.g. the ``imagenet32_pretrain`` experiment). A fresh run then
    starts from its flow weights (the online flow, as the release's ``nf_weights_load_path``;
    read with ``weights_only=True``) instead of the flow's data-dependent initialisation, and
    the prior is data-initialised from the loaded flow on this run's data, one gaussian per class
    of this dataset (:mod:`nfpi.training.finetune`). A resumed run ignores it (its own
    checkpoint holds everything). ``init_required``: the experiment is a fine-tuning one, so
    ``init_from`` must be given (the ``*_finetune`` experiments set it).

    Attributes:
        preset: the architecture (``tiny``, ``glow-small``, ``mef-cifar``, ...).
        levels: multi-scale levels (None: the preset's).
        steps: flow steps per level, one int or one per level (None: the preset's).
        blocks: residual blocks per coupling network (None: the preset's).
        hidden: channels of the coupling networks (None: the preset's).
        coupling: ``affine`` or ``matrixexp`` couplings (None: the preset's).
        attention: attention layers after every coupling net (None: the preset's).
        attention_heads: heads of those attention layers (None: the preset's).
        init_from: a pretrained run's directory or checkpoint to start the flow from.
        init_required: this experiment fine-tunes, so init_from must be set.
    """

    preset: str = "tiny"
    levels: int | None = None
    steps: int | tuple[int, ...] | None = None
    blocks: int | tuple[int, ...] | None = None
    hidden: int | None = None
    coupling: Literal["affine", "matrixexp"] | None = None
    attention: bool | None = None
    attention_heads: int | None = None
    init_from: str | None = None
    init_required: bool = False

    #: Keys that are not :class:`~nfpi.flows.FlowSpec` fields.
    NOT_SPEC = ("preset", "init_from", "init_required")

    def validate(self) -> None:
        from nfpi.flows import PRESETS  # local: keeps config importable without building flows

        check(self.preset in PRESETS, "preset", self.preset, f"one of {sorted(PRESETS)}")
        check(
            self.init_from is None or bool(self.init_from.strip()),
            "init_from",
            self.init_from,
            "None or a path (a run directory or checkpoint of the pretraining run)",
        )
        check(
            not self.init_required or self.init_from is not None,
            "init_from",
            self.init_from,
            "the pretrained flow this experiment fine-tunes: --set flow.init_from=/abs/path to "
            "the pretraining run's directory (e.g. an imagenet32_pretrain run) or a checkpoint",
        )

    def overrides(self) -> dict[str, object]:
        """The :class:`~nfpi.flows.FlowSpec` fields this config changes from its preset."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_SPEC and v is not None}


@dataclass(frozen=True)
class PriorConfig(Config):
    """Which prior, what it optimises and when it is solved (the release's schedule by default).

    ``data-init``: class moments of the untrained flow at train start, frozen.
    ``fpi``: data-init at start, FPI solved at the end of epoch ``solve_epoch`` from statistics of
    the training set through the online flow, then frozen (or re-solved every ``resolve_every``
    epochs when > 0; the release solves once, after epoch 0: ``solve_epoch=0, resolve_every=0``,
    method notes section 10; the ``digits`` experiment solves after epochs 0 and 1:
    ``resolve_every=1, solve_until=1``).
    ``gd``: data-init at start, then ``gd.steps_per_solve`` GD steps at the end of every epoch
    up to ``solve_until``.

    ``stats_augment``: the class statistics of a solve are taken under the training
    augmentation (the release) or on clean images (``False``: the prior then describes the data
    it is scored on; under augmentation the frozen prior misses the clean test latents, which is
    what erodes NF-Acc after the solve, benchmarks/README.md "Erosion").

    ``stats_from_training``: a prior update takes the class statistics gathered during the
    epoch's training pass (the latents of every training batch, computed there anyway) instead
    of a separate pass over the training set after the epoch. Cheaper (no extra pass), but not
    the same statistics: the flow changes at every step of the epoch, the images carry the
    training pass's dequantisation noise (and augmentation, so it needs ``stats_augment=True``
    when ``data.augment`` is on), and the last incomplete batch is dropped. Off by default: its
    effect on NF-Acc is not measured yet (benchmarks/README.md).

    ``objective`` (lambda, alpha, pi) is read by both solvers, so the FPI and GD rows of a sweep
    compare at equal objective by construction. ``gd_objective`` overrides it for GD only (the
    released GD weights differ from the released FPI lambda: method notes section 10).

    Attributes:
        method: the prior: ``fpi`` (fixed-point iteration), ``gd`` (gradient descent) or
            ``data-init`` (class moments of the untrained flow, frozen).
        covariance: ``diag`` or ``full`` class covariances.
        solve_epoch: the epoch (0-based) at whose end the FPI is first solved.
        resolve_every: re-solve the FPI every this many epochs after ``solve_epoch`` (0: once).
        solve_until: last epoch at whose end the prior is updated (None: no limit).
        stats_augment: take a solve's class statistics under the training augmentation.
        stats_from_training: take a prior update's statistics from the epoch's training pass.
        objective: what both solvers minimise (lambda, alpha, pi).
        gd_objective: the GD baseline's own objective (None: ``objective``).
        fpi: how the FPI solver runs.
        gd: how the GD baseline runs.
    """

    method: PriorMethod = "fpi"
    covariance: Covariance = "diag"
    solve_epoch: int = 0
    resolve_every: int = 0
    solve_until: int | None = None
    stats_augment: bool = True
    stats_from_training: bool = False
    objective: Objective = field(default_factory=Objective)
    gd_objective: Objective | None = None
    fpi: FPIConfig = field(default_factory=lambda: FPIConfig(var_bounds=(0.25, 1.25)))
    gd: GDConfig = field(default_factory=GDConfig)

    def validate(self) -> None:
        check(self.solve_epoch >= 0, "solve_epoch", self.solve_epoch, "an int >= 0")
        check(
            not (self.stats_from_training and self.gd_form_released),
            "stats_from_training",
            self.stats_from_training,
            "false with gd.form='released' (its step needs the per-sample NLL range of a "
            "separate statistics pass)",
        )
        check(
            self.resolve_every >= 0,
            "resolve_every",
            self.resolve_every,
            "an int >= 0 (0: solve once)",
        )
        check(
            self.solve_until is None or self.solve_until >= self.solve_epoch,
            "solve_until",
            self.solve_until,
            f"None (no limit) or an epoch >= solve_epoch = {self.solve_epoch}",
        )
        check(
            self.fpi.covariance == self.covariance,
            "fpi.covariance",
            self.fpi.covariance,
            f"equal to prior.covariance={self.covariance!r}",
        )
        check(
            not (self.method == "gd" and self.covariance == "full"),
            "covariance",
            self.covariance,
            "'diag' for the GD baseline",
        )

    @property
    def gd_form_released(self) -> bool:
        """Whether the statistics passes must carry the per-sample NLL range (the release's GD
        form normalises its gradients by it)."""
        return self.method == "gd" and self.gd.form == "released"

    def objective_for(self, method: str | None = None) -> Objective:
        """The objective the solver of ``method`` (default: this config's) minimises."""
        method = method or self.method
        if method == "gd" and self.gd_objective is not None:
            return self.gd_objective
        return self.objective

    def solve_epochs(self, epochs: int) -> list[int]:
        """The epochs (0-based) after which this prior is updated in a run of ``epochs``."""
        return [e for e in range(epochs) if self.solves_after(e)]

    def gd_steps(self, epochs: int) -> int:
        """The GD steps a run of ``epochs`` takes (0 unless ``method`` is ``gd``)."""
        if self.method != "gd":
            return 0
        return len(self.solve_epochs(epochs)) * self.gd.steps_per_solve

    def solves_after(self, epoch: int) -> bool:
        """Whether a prior update is scheduled at the end of ``epoch`` (0-based)."""
        if self.method == "data-init" or (
            self.solve_until is not None and epoch > self.solve_until
        ):
            return False
        if self.method == "gd":
            return True
        if epoch < self.solve_epoch:
            return False
        if epoch == self.solve_epoch:
            return True
        return self.resolve_every > 0 and (epoch - self.solve_epoch) % self.resolve_every == 0


@dataclass(frozen=True)
class OptimConfig(Config):
    """Flow optimisation: Adamax with linear warm-up (paper: lr 1e-2, 1000 warm-up steps, batch 512,
    500 epochs, no clipping). ``batch_size`` is global: split evenly across data-parallel workers.
    ``init_batch``: how many training images the data-dependent ActNorm init sees (the release:
    1024). ``invertible_backward``: the backward pass rebuilds each flow layer's input from its
    output instead of keeping the activations (:mod:`nfpi.flows.reversible`): training memory
    flat in the flow's depth (``mef-cifar`` at batch 64 on CPU: benchmarks/README.md), about one
    extra forward pass per step, the same gradients up to round-off.

    Attributes:
        epochs: training epochs.
        batch_size: global batch (a multiple of the data-parallel workers).
        lr: Adamax learning rate after warm-up.
        warmup_steps: optimiser steps of linear learning-rate warm-up.
        grad_clip: clip the gradient norm to this (None: no clipping).
        init_batch: training images of the flow's data-dependent ActNorm init.
        invertible_backward: rebuild activations in backward instead of storing them.
    """

    epochs: int = 10
    batch_size: int = 512
    lr: float = 1e-2
    warmup_steps: int = 1000
    grad_clip: float | None = None
    init_batch: int = 512
    invertible_backward: bool = False

    def validate(self) -> None:
        check(self.epochs >= 1, "epochs", self.epochs, "an int >= 1")
        check(
            self.init_batch >= 1,
            "init_batch",
            self.init_batch,
            "an int >= 1 (training images of the flow's data-dependent ActNorm init)",
        )
        check(self.batch_size >= 2, "batch_size", self.batch_size, "an int >= 2")
        check(is_number(self.lr) and self.lr > 0, "lr", self.lr, "a finite float > 0")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an int >= 0")
        check(
            self.grad_clip is None or self.grad_clip > 0,
            "grad_clip",
            self.grad_clip,
            "None or a float > 0",
        )


@dataclass(frozen=True)
class EMAConfig(Config):
    """EMA of the flow (ema-pytorch; paper: beta 0.9999, power 0.75). It starts after the first
    FPI solve (from the start for the other methods), or at the first step of epoch
    ``start_epoch`` when that is set (the release: epoch 1, for every method). ``enabled=False``: no EMA, evaluation and
    pictures use the online flow, the flow the prior's statistics come from (short runs that
    re-solve the prior every epoch: an EMA then lags behind the flow the prior was solved for).

    Attributes:
        enabled: keep an EMA of the flow (evaluation and pictures use it).
        beta: the EMA's maximum decay.
        power: the EMA warm-up's power (ema-pytorch's inv_gamma schedule).
        update_every: update the EMA every this many optimiser steps.
        update_after_step: optimiser steps before the EMA starts.
        start_epoch: the epoch whose first step starts the EMA (None: after the FPI's first
            solve, from the start for the other methods).
    """

    enabled: bool = True
    beta: float = 0.9999
    power: float = 0.75
    update_every: int = 10
    update_after_step: int = 100
    start_epoch: int | None = None

    def validate(self) -> None:
        check(0 <= self.beta < 1, "beta", self.beta, "a float in [0, 1)")
        check(
            self.start_epoch is None or self.start_epoch >= 0,
            "start_epoch",
            self.start_epoch,
            "None (after the FPI's first solve; from the start for the other methods) or the "
            "epoch (0-based) whose first step starts the EMA",
        )
        check(self.power > 0, "power", self.power, "a float > 0")
        check(self.update_every >= 1, "update_every", self.update_every, "an int >= 1")
        check(
            self.update_after_step >= 0,
            "update_after_step",
            self.update_after_step,
            "an int >= 0",
        )


@dataclass(frozen=True)
class EvalConfig(Config):
    """Evaluation and pictures. ``plot_every`` = 0: sample grids and t-SNE at the end only.

    Attributes:
        every: evaluate NF-Acc and bits/dim every this many epochs (and after the last).
        batch_size: evaluation batch.
        temperatures: sampling temperatures of the sample grids.
        samples_per_class: samples per class in each grid.
        tsne_points: test latents in the t-SNE picture (0: no t-SNE).
        plots: draw the pictures (sample grids, t-SNE, KL heatmaps).
        plot_every: draw them every this many epochs too (0: at the end only).
    """

    every: int = 1
    batch_size: int = 500
    temperatures: tuple[float, ...] = (0.5, 0.75, 1.0)
    samples_per_class: int = 8
    tsne_points: int = 1000
    plots: bool = True
    plot_every: int = 0

    def validate(self) -> None:
        check(self.every >= 1, "every", self.every, "an int >= 1")
        check(self.batch_size >= 1, "batch_size", self.batch_size, "an int >= 1")
        check(
            len(self.temperatures) > 0 and all(t >= 0 for t in self.temperatures),
            "temperatures",
            self.temperatures,
            "temperatures >= 0",
        )
        check(
            self.samples_per_class >= 1,
            "samples_per_class",
            self.samples_per_class,
            "an int >= 1",
        )
        check(self.tsne_points >= 0, "tsne_points", self.tsne_points, "an int >= 0 (0: no t-SNE)")
        check(self.plot_every >= 0, "plot_every", self.plot_every, "an int >= 0")


@dataclass(frozen=True)
class ExperimentConfig(Config):
    """Everything one run computes (not where it writes: that is the trainer's run directory).

    Attributes:
        name: the experiment's name (run directories and MLflow runs are named after it).
        seed: seed of every random draw (data order, noise, initialisation).
        device: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda``.
    """

    name: str = "nfpi"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def resolved(self) -> ExperimentConfig:
        """This config with the values that derive from others filled in: the GD policy's
        horizon (``prior.gd.policy.total_steps`` None -> the GD steps this run takes, so that a
        decaying policy ends at its ``lr_min`` on the run's last GD step). What runs, and what
        is logged, is the resolved config; resolving twice changes nothing."""
        if self.prior.method != "gd" or self.prior.gd.policy.total_steps is not None:
            return self
        steps = max(1, self.prior.gd_steps(self.optim.epochs))
        return self.with_overrides({"prior.gd.policy.total_steps": steps})

    def validate(self) -> None:
        check(self.seed >= 0, "seed", self.seed, "an int >= 0")
        check(
            not (
                self.prior.stats_from_training
                and self.data.augment
                and not self.prior.stats_augment
            ),
            "prior.stats_from_training",
            self.prior.stats_from_training,
            "false with data.augment=true and prior.stats_augment=false (the training pass sees "
            "augmented images; clean statistics need the separate pass)",
        )
        check(
            bool(self.name) and "/" not in self.name,
            "name",
            self.name,
            "a non-empty name without '/'",
        )
