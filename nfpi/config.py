"""Experiment configuration: frozen, typed dataclasses validated at construction.

One :class:`ExperimentConfig` describes a run completely; the config that ran is the config that
is logged and checkpointed. Configs are built once from nested dicts or dotted overrides
(``{"prior.fpi.lam": 300.0}``, what a Tune trial receives) and never mutated afterwards. Unknown
keys and invalid values raise :class:`~nfpi.errors.ConfigError` naming the dotted field.

Named experiments (:data:`EXPERIMENTS`) are small overrides of the base config, named after what
they run::

    cfg = experiment_config("digits", {"prior.method": "gd", "optim.epochs": 5})
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from nfpi.errors import ConfigError
from nfpi.prior.fpi import FPIConfig
from nfpi.prior.gd import GDConfig, LRPolicy
from nfpi.validation import is_int

__all__ = [
    "EXPERIMENTS",
    "DataConfig",
    "EMAConfig",
    "EvalConfig",
    "ExperimentConfig",
    "FlowConfig",
    "OptimConfig",
    "PriorConfig",
    "experiment_config",
    "parse_override",
]


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(name, value, allowed)


@dataclass(frozen=True)
class DataConfig:
    """Dataset and loading. ``root`` is required for cifar10/100 and imagefolder (absolute
    paths are safest: Ray workers and jobs change the working directory)."""

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

    def dataset_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`nfpi.data.load_dataset` that this dataset takes."""
        if self.name in ("cifar10", "cifar100"):
            return {"root": self.root, "download": self.download}
        if self.name == "imagefolder":
            return {"root": self.root, "image_size": self.image_size}
        if self.name == "synthetic":
            given = (("num_classes", self.num_classes), ("shape", self.shape))
            return {k: v for k, v in given if v is not None}
        return {}

    def __post_init__(self) -> None:
        names = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
        _check(self.name in names, "data.name", self.name, f"one of {names}")
        for key in ("items_per_class", "test_items_per_class", "image_size"):
            value = getattr(self, key)
            _check(
                value is None or (is_int(value) and value >= 1),
                f"data.{key}",
                value,
                "None or an int >= 1",
            )
        _check(
            is_int(self.num_workers) and self.num_workers >= 0,
            "data.num_workers",
            self.num_workers,
            "an int >= 0",
        )
        if self.name in ("cifar10", "cifar100", "imagefolder"):
            _check(
                self.root is not None,
                "data.root",
                self.root,
                f"a dataset path (required for {self.name!r})",
            )
        if self.name != "synthetic":
            for key in ("num_classes", "shape"):
                _check(
                    getattr(self, key) is None,
                    f"data.{key}",
                    getattr(self, key),
                    "only for data.name='synthetic'",
                )


@dataclass(frozen=True)
class FlowConfig:
    """Flow architecture: a preset of :data:`nfpi.flows.PRESETS` plus optional overrides."""

    preset: str = "tiny"
    levels: int | None = None
    steps: int | tuple[int, ...] | None = None
    blocks: int | tuple[int, ...] | None = None
    hidden: int | None = None

    def __post_init__(self) -> None:
        from nfpi.flows import PRESETS  # local: keeps config importable without building flows

        _check(self.preset in PRESETS, "flow.preset", self.preset, f"one of {sorted(PRESETS)}")

    def overrides(self) -> dict[str, Any]:
        return {
            k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None
        }


@dataclass(frozen=True)
class PriorConfig:
    """Which prior, and when it is solved (the release's schedule by default).

    ``data-init``: class moments of the untrained flow at train start, frozen.
    ``fpi``: data-init at start, FPI solved at the end of epoch ``solve_epoch`` from statistics of
    the training set through the online flow, then frozen (or re-solved every ``resolve_every``
    epochs when > 0).
    ``gd``: data-init at start, then ``gd.steps_per_solve`` GD steps at the end of every epoch.
    """

    method: Literal["fpi", "gd", "data-init"] = "fpi"
    covariance: Literal["diag", "full"] = "diag"
    solve_epoch: int = 0
    resolve_every: int = 0
    fpi: FPIConfig = field(default_factory=lambda: FPIConfig(lam=100.0, var_bounds=(0.25, 1.25)))
    gd: GDConfig = field(default_factory=GDConfig)

    def __post_init__(self) -> None:
        _check(
            self.method in ("fpi", "gd", "data-init"),
            "prior.method",
            self.method,
            "one of ('fpi', 'gd', 'data-init')",
        )
        _check(
            self.covariance in ("diag", "full"),
            "prior.covariance",
            self.covariance,
            "one of ('diag', 'full')",
        )
        _check(
            is_int(self.solve_epoch) and self.solve_epoch >= 0,
            "prior.solve_epoch",
            self.solve_epoch,
            "an int >= 0",
        )
        _check(
            is_int(self.resolve_every) and self.resolve_every >= 0,
            "prior.resolve_every",
            self.resolve_every,
            "an int >= 0 (0: solve once)",
        )
        _check(
            self.fpi.covariance == self.covariance,
            "prior.fpi.covariance",
            self.fpi.covariance,
            f"equal to prior.covariance={self.covariance!r}",
        )
        _check(
            not (self.method == "gd" and self.covariance == "full"),
            "prior.covariance",
            self.covariance,
            "'diag' for the GD baseline",
        )

    def solves_after(self, epoch: int) -> bool:
        """Whether a prior update is scheduled at the end of ``epoch`` (0-based)."""
        if self.method == "gd":
            return True
        if self.method == "data-init" or epoch < self.solve_epoch:
            return False
        if epoch == self.solve_epoch:
            return True
        return self.resolve_every > 0 and (epoch - self.solve_epoch) % self.resolve_every == 0


@dataclass(frozen=True)
class OptimConfig:
    """Flow optimisation: Adamax with linear warm-up (paper: lr 1e-2, 1000 warm-up steps, batch 512,
    500 epochs, no clipping). ``batch_size`` is global: split evenly across data-parallel workers."""

    epochs: int = 10
    batch_size: int = 512
    lr: float = 1e-2
    warmup_steps: int = 1000
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        _check(is_int(self.epochs) and self.epochs >= 1, "optim.epochs", self.epochs, "an int >= 1")
        _check(
            is_int(self.batch_size) and self.batch_size >= 2,
            "optim.batch_size",
            self.batch_size,
            "an int >= 2",
        )
        _check(
            isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf,
            "optim.lr",
            self.lr,
            "a finite float > 0",
        )
        _check(
            is_int(self.warmup_steps) and self.warmup_steps >= 0,
            "optim.warmup_steps",
            self.warmup_steps,
            "an int >= 0",
        )
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            "optim.grad_clip",
            self.grad_clip,
            "None or a float > 0",
        )


@dataclass(frozen=True)
class EMAConfig:
    """EMA of the flow (ema-pytorch; paper: beta 0.9999, power 0.75). It starts after the first
    FPI solve (from the start for the other methods)."""

    beta: float = 0.9999
    power: float = 0.75
    update_every: int = 10
    update_after_step: int = 100

    def __post_init__(self) -> None:
        _check(0 <= self.beta < 1, "ema.beta", self.beta, "a float in [0, 1)")
        _check(self.power > 0, "ema.power", self.power, "a float > 0")
        _check(
            is_int(self.update_every) and self.update_every >= 1,
            "ema.update_every",
            self.update_every,
            "an int >= 1",
        )
        _check(
            is_int(self.update_after_step) and self.update_after_step >= 0,
            "ema.update_after_step",
            self.update_after_step,
            "an int >= 0",
        )


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation and pictures. ``plot_every`` = 0: sample grids and t-SNE at the end only."""

    every: int = 1
    batch_size: int = 500
    temperatures: tuple[float, ...] = (0.5, 0.75, 1.0)
    samples_per_class: int = 8
    tsne_points: int = 1000
    plots: bool = True
    plot_every: int = 0

    def __post_init__(self) -> None:
        _check(is_int(self.every) and self.every >= 1, "eval.every", self.every, "an int >= 1")
        _check(
            is_int(self.batch_size) and self.batch_size >= 1,
            "eval.batch_size",
            self.batch_size,
            "an int >= 1",
        )
        _check(
            len(self.temperatures) > 0 and all(t >= 0 for t in self.temperatures),
            "eval.temperatures",
            self.temperatures,
            "temperatures >= 0",
        )
        _check(
            is_int(self.samples_per_class) and self.samples_per_class >= 1,
            "eval.samples_per_class",
            self.samples_per_class,
            "an int >= 1",
        )
        _check(
            is_int(self.tsne_points) and self.tsne_points >= 0,
            "eval.tsne_points",
            self.tsne_points,
            "an int >= 0 (0: no t-SNE)",
        )
        _check(
            is_int(self.plot_every) and self.plot_every >= 0,
            "eval.plot_every",
            self.plot_every,
            "an int >= 0",
        )


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs. ``output_dir`` holds checkpoints, metrics and pictures."""

    name: str = "nfpi"
    seed: int = 0
    output_dir: str = "results/run"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _check(is_int(self.seed) and self.seed >= 0, "seed", self.seed, "an int >= 0")
        _check(
            self.device in ("auto", "cpu", "cuda"),
            "device",
            self.device,
            "one of ('auto', 'cpu', 'cuda')",
        )
        _check(
            bool(self.name) and "/" not in self.name,
            "name",
            self.name,
            "a non-empty name without '/'",
        )

    # ----------------------------------------------------------------------------- conversion
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ExperimentConfig:
        """Build from a nested dict (e.g. ``to_dict()``'s output); unknown keys are rejected."""
        return _build(cls, values, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to leaf values (what is logged as MLflow params)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}{k}.", v)
            else:
                out[prefix[:-1]] = value

        walk("", self.to_dict())
        return out

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentConfig:
        """A new config with dotted-key overrides applied (``{"prior.fpi.lam": 300.0}``)."""
        nested = self.to_dict()
        for key, value in overrides.items():
            parts = key.split(".")
            node = nested
            for i, part in enumerate(parts[:-1]):
                if (
                    not isinstance(node, dict)
                    or part not in node
                    or not isinstance(node[part], dict)
                ):
                    raise ConfigError(
                        key, value, f"unknown config section {'.'.join(parts[: i + 1])!r}"
                    )
                node = node[part]
            if parts[-1] not in node:
                raise ConfigError(key, value, f"unknown key; known in this section: {sorted(node)}")
            # A whole sub-config given as a dict replaces only the keys it names.
            if isinstance(node[parts[-1]], dict) and isinstance(value, dict):
                node[parts[-1]] = {**node[parts[-1]], **value}
            else:
                node[parts[-1]] = value
        return ExperimentConfig.from_dict(nested)


def _build(cls: type, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(prefix.rstrip(".") or cls.__name__, values, "a mapping of config keys")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}", values[unknown[0]], f"unknown key; known: {sorted(known)}"
        )
    return cls(
        **{key: _coerce(hints[key], value, f"{prefix}{key}") for key, value in values.items()}
    )


def _coerce(hint: Any, value: Any, name: str) -> Any:
    """Turn JSON/YAML-ish values into the annotated type (lists -> tuples, dicts -> configs)."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if isinstance(value, hint):
            return value
        if hint is FPIConfig:
            return _wrap(FPIConfig.from_dict, value, name)
        if hint is GDConfig:
            return _wrap(GDConfig.from_dict, value, name)
        if hint is LRPolicy:
            return _wrap(LRPolicy.from_dict, value, name)
        return _build(hint, value, f"{name}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, name)
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(name, value, f"a value of type {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, value, "a list/tuple")
        args = typing.get_args(hint)
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if inner is None and len(args) != len(value):
            raise ConfigError(name, value, f"a tuple of {len(args)} values")
        return tuple(_coerce(inner or args[i], v, name) for i, v in enumerate(value))
    if origin is Literal:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, value, "a number")
        return float(value)
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not is_int(value):
            raise ConfigError(name, value, "an int")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(name, value, "true or false")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(name, value, "a string")
        return value
    return value


def _wrap(factory: Any, value: Any, name: str) -> Any:
    if not isinstance(value, dict):
        raise ConfigError(name, value, "a mapping of config keys")
    try:
        return factory(value)
    except ConfigError as err:
        field_name = err.field.split(".", 1)[-1] if "." in err.field else err.field
        raise ConfigError(f"{name}.{field_name}", err.value, err.allowed) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"prior.fpi.lam=300"`` -> ``("prior.fpi.lam", 300)`` (values parsed as JSON when possible)."""
    import json

    if "=" not in text:
        raise ConfigError("override", text, "KEY=VALUE, e.g. prior.fpi.lam=300")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


# Named experiments: small overrides of the base config.
EXPERIMENTS: dict[str, dict[str, Any]] = {
    # The embedded default: scikit-learn digits (bundled, 1x8x8, 10 classes), tiny MEF flow, CPU.
    "digits": {
        "name": "digits",
        "data.name": "digits",
        "flow.preset": "tiny",
        "flow.hidden": 32,
        "optim.epochs": 30,
        "optim.batch_size": 128,
        "optim.lr": 2e-3,
        "optim.warmup_steps": 100,
        "ema.beta": 0.999,
        "ema.update_every": 1,
        "ema.update_after_step": 10,
        # The release's schedule (FPI at the end of epoch 0); lambda = 1000 separates the ten
        # digit gaussians enough to show the paper's effect within this short budget.
        "prior.solve_epoch": 0,
        "prior.fpi.lam": 1000.0,
        "eval.tsne_points": 360,
    },
    # Seconds-long runs for tests and smoke checks.
    "smoke": {
        "name": "smoke",
        "data.name": "digits",
        "data.items_per_class": 20,
        "data.test_items_per_class": 10,
        "flow.preset": "tiny",
        "optim.epochs": 2,
        "optim.batch_size": 50,
        "optim.warmup_steps": 5,
        "ema.update_every": 1,
        "ema.update_after_step": 0,
        "eval.tsne_points": 60,
        "eval.samples_per_class": 2,
        "eval.temperatures": (0.7,),
    },
    # The paper's CIFAR setting (method notes section 7); data.root must point at the data.
    "cifar10": {
        "name": "cifar10",
        "data.name": "cifar10",
        "flow.preset": "mef-cifar",
        "optim.epochs": 500,
        "prior.fpi.lam": 300.0,
    },
    "cifar100": {
        "name": "cifar100",
        "data.name": "cifar100",
        "flow.preset": "mef-cifar",
        "optim.epochs": 500,
        "prior.fpi.lam": 300.0,
    },
}


def experiment_config(
    name: str = "digits", overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """The named experiment with ``overrides`` (dotted keys) applied on top."""
    if name not in EXPERIMENTS:
        raise ConfigError("experiment", name, f"one of {sorted(EXPERIMENTS)}")
    return ExperimentConfig().with_overrides({**EXPERIMENTS[name], **(overrides or {})})
