"""Sweeps as code: one module per search space, named after what it reproduces.

A space is a base experiment (dataset, flow preset, budget) plus the Tune domains that vary.
Keys of ``params`` are dotted config keys (``"prior.objective.lam"``), or ``"variant"``-style keys whose
values are whole dicts of dotted overrides (so coupled settings, e.g. a method and its learning-rate
policy, vary together). Every space module defines ``SPACE``.

    from search_spaces import load_space
    space = load_space("table2")
    config = space.config_for({"prior.objective.lam": 300.0}, {"data.root": "/data/cifar100"})

Options: a space may offer named choices that change the whole space rather than one config
key (which dataset's settings, the released or the paper's form of the update, GD's weights).
They are given like overrides, ``--set variant=paper --set dataset=cifar100``; each space lists
its own (``SearchSpace.options``, first value the default) and rebuilds itself for the chosen
ones (:meth:`SearchSpace.with_options`). A value outside an option's list, or a ``data.name``
that contradicts the ``dataset`` option, is a :class:`~nfpi.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import pkgutil
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.search.sample import Domain

from nfpi.config import ExperimentConfig
from nfpi.errors import ConfigError
from nfpi.presets import experiment_config
from nfpi.prior import PRIOR_METHODS

__all__ = [
    "SPACE_NAMES",
    "SearchSpace",
    "Trial",
    "catalogue_markdown",
    "load_space",
    "prior_comparison",
    "trial_label",
]

# Every module of this package is a space: adding a file adds a space (no hand-kept list).
SPACE_NAMES: tuple[str, ...] = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
)
DOWNSTREAM_PREFIXES = ("downstream.", "cnn.")


@dataclass(frozen=True)
class Trial:
    """One trial of a sweep, built once by :meth:`SearchSpace.trial` and read by everything that
    needs it: the Tune trial that runs it, the progress lines, the results table, the parent
    run's comparison and ``--plan``.

    Attributes:
        sample: the values Tune drew for it (dict-valued entries are whole variants).
        config: the flow experiment it runs, resolved (derived values such as the GD policy's
            horizon filled in: :meth:`~nfpi.config.ExperimentConfig.resolved`).
        downstream: its :class:`~nfpi.downstream.DownstreamConfig` (downstream spaces), or None.
        label: its name in the console and in MLflow (:func:`trial_label`).
    """

    sample: dict[str, Any]
    config: ExperimentConfig
    downstream: Any
    label: str

    def plan(self, tflops: float | None = None) -> Any:
        """Its :class:`nfpi.plan.RunPlan` (what it will run and what that costs)."""
        from nfpi.plan import H100_EFFECTIVE_FLOPS, plan_of

        return plan_of(self.config, self.label, tflops or H100_EFFECTIVE_FLOPS / 1e12)


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, dict):
        return "on"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_label(space: SearchSpace, sample: dict[str, Any], config: ExperimentConfig) -> str:
    """What a trial of ``space`` varies, in a few words: its prior method, then the values of the
    ``group_by`` keys it sets, then the other scalar values it draws (``fpi lam=300``,
    ``gd linear``, ``fpi alpha=0.53 pi=mean``); ``config`` is the trial's config."""
    varied = space.overrides_of(sample)
    parts = [config.prior.method]
    keys = [k for k in space.group_by if k != "prior.method"]
    keys += [
        k
        for k, v in varied.items()
        if k not in keys and k != "prior.method" and not isinstance(v, dict)
        and k in space.params  # drawn by Tune itself, not part of a whole-variant dict
    ]  # fmt: skip
    flat = config.flat()
    for key in keys:
        if key in varied:
            value = varied[key]
        elif any(key.startswith(f"{v}.") for v in varied):
            value = flat.get(key)
        else:
            continue  # this trial does not set it (e.g. the GD policy of the FPI row)
        name = key.rsplit(".", 1)[-1]
        parts.append(_value_text(value) if name == "name" else f"{name}={_value_text(value)}")
    return " ".join(parts)


@dataclass(frozen=True)
class SearchSpace:
    """A base experiment and the domains a sweep varies.

    Attributes:
        name: the space's name (its module name).
        reproduces: what it reproduces (paper table/figure), shown in ``--help`` and logged.
        experiment: the named base experiment (:data:`nfpi.presets.EXPERIMENTS`).
        base: dotted overrides of that experiment (dataset, flow preset, budget).
        params: dotted key (or dict-valued key) -> value or Tune domain / ``tune.grid_search``.
        num_samples: Tune samples (x the grid).
        metric, mode: what "best" means in the results table and for ASHA.
        group_by: config keys that name a row of the results table (e.g. the method).
        kind: ``flow`` (a flow-training trial) or ``downstream`` (train or reuse the flow, then
            a :mod:`nfpi.downstream` evaluation: CNN-Acc or NF augmentation). Keys starting with
            ``downstream.`` or ``cnn.`` configure that evaluation.
        options: option name -> allowed values (the first is the default), e.g.
            ``{"variant": ("as_released", "paper")}``; see the module docstring.
        build: ``build(**chosen options) -> SearchSpace``, the space for other option values.
        chosen: the option values this space was built for.
        required: dotted keys that a sweep must set (e.g. a weights file); validation names them.
    """

    name: str
    reproduces: str
    experiment: str
    base: dict[str, Any]
    params: dict[str, Any]
    num_samples: int = 1
    metric: str = "nf_acc"
    mode: str = "max"
    group_by: tuple[str, ...] = ("prior.method",)
    kind: str = "flow"
    extra: dict[str, Any] = field(default_factory=dict)
    options: dict[str, tuple[str, ...]] = field(default_factory=dict)
    build: Callable[..., SearchSpace] | None = field(default=None, compare=False, repr=False)
    chosen: dict[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()

    def with_options(self, overrides: dict[str, Any] | None) -> tuple[SearchSpace, dict[str, Any]]:
        """Split ``overrides`` into this space's options and config overrides: the space built
        for the chosen options (this one if they are its own) and the remaining overrides."""
        rest = dict(overrides or {})
        picked = {key: rest.pop(key) for key in list(rest) if key in self.options}
        for key, value in picked.items():
            if value not in self.options[key]:
                raise ConfigError(
                    key, value, f"one of {self.options[key]} (an option of space {self.name!r})"
                )
        chosen = {**self.chosen, **picked}
        datasets = self.options.get("dataset", ())
        name = rest.get("data.name")
        if name in datasets and name != chosen.get("dataset"):
            raise ConfigError(
                "data.name",
                name,
                f"--set dataset={name} instead: space {self.name!r} has per-dataset settings "
                f"(lambda, FPI setting, classifier epochs), chosen with its dataset option",
            )
        if chosen == self.chosen or self.build is None:
            return self, rest
        return dataclasses.replace(self.build(**chosen), chosen=chosen), rest

    def describe_options(self) -> str:
        """``variant=as_released|paper, dataset=cifar10|cifar100`` (first = default)."""
        return ", ".join(f"{k}={'|'.join(v)}" for k, v in self.options.items())

    def param_space(self) -> dict[str, Any]:
        return dict(self.params)

    @staticmethod
    def overrides_of(sample: dict[str, Any]) -> dict[str, Any]:
        """A sampled Tune config -> dotted overrides (dict-valued entries are merged in)."""
        out: dict[str, Any] = {}
        for key, value in sample.items():
            if isinstance(value, dict):
                out.update(value)
            else:
                out[key] = value
        return out

    def _merged(
        self, sample: dict[str, Any], overrides: dict[str, Any] | None
    ) -> tuple[dict, dict]:
        merged = {**self.base, **self.overrides_of(sample), **(overrides or {})}
        for key in self.required:
            if merged.get(key) is None:
                raise ConfigError(
                    key, None, f"a value: space {self.name!r} needs it (--set {key}=...)"
                )
        flow = {k: v for k, v in merged.items() if not k.startswith(DOWNSTREAM_PREFIXES)}
        down = {k: v for k, v in merged.items() if k.startswith(DOWNSTREAM_PREFIXES)}
        if down and self.kind != "downstream":
            key = next(iter(down))
            raise ConfigError(
                key, down[key], f"downstream settings, but space {self.name!r} trains flows only"
            )
        return flow, down

    def trial(self, sample: dict[str, Any], overrides: dict[str, Any] | None = None) -> Trial:
        """The one builder of a trial (:class:`Trial`): base experiment, then the space's base,
        then the sampled values, then command-line overrides, resolved. Invalid values raise
        ConfigError naming the dotted field. Option keys among ``overrides`` select the space
        first."""
        space, rest = self.with_options(overrides)
        flow, down = space._merged(sample, rest)
        config = experiment_config(space.experiment, flow).resolved()
        downstream = None
        if space.kind == "downstream":
            from nfpi.downstream import DownstreamConfig

            downstream = DownstreamConfig.from_overrides(down)
        return Trial(dict(sample), config, downstream, trial_label(space, sample, config))

    def config_for(
        self, sample: dict[str, Any], overrides: dict[str, Any] | None = None
    ) -> ExperimentConfig:
        """The flow experiment of one trial (:meth:`trial`'s config)."""
        return self.trial(sample, overrides).config

    def downstream_for(
        self, sample: dict[str, Any], overrides: dict[str, Any] | None = None
    ) -> Any:
        """The :class:`nfpi.downstream.DownstreamConfig` of one trial of a downstream space
        (:meth:`trial`'s downstream)."""
        from nfpi.downstream import DownstreamConfig

        trial = self.trial(sample, overrides)
        if trial.downstream is None:  # a flow space: its (empty) downstream settings
            return DownstreamConfig.from_overrides({})
        return trial.downstream

    def samples(self, n_random: int = 3, seed: int = 0) -> list[dict[str, Any]]:
        """Every grid point, each with random domains drawn ``n_random`` times (for validation)."""
        rng = random.Random(seed)
        grid_keys = [
            k for k, v in self.params.items() if isinstance(v, dict) and "grid_search" in v
        ]
        grids = [self.params[k]["grid_search"] for k in grid_keys]
        out = []
        for combo in itertools.product(*grids) if grids else [()]:
            for _ in range(
                n_random if any(isinstance(v, Domain) for v in self.params.values()) else 1
            ):
                sample = dict(zip(grid_keys, combo, strict=True))
                for key, value in self.params.items():
                    if key in sample:
                        continue
                    if isinstance(value, Domain):
                        sample[key] = value.sample(random_state=rng.randrange(2**31))
                    else:
                        sample[key] = value
                out.append(sample)
        return out

    def trials(self, overrides: dict[str, Any] | None = None, n_random: int = 3) -> list[Trial]:
        """Every trial of :meth:`samples` (of the space the option keys among ``overrides``
        select); raises the first ConfigError (naming the field)."""
        space, _ = self.with_options(overrides)
        return [space.trial(sample, overrides) for sample in space.samples(n_random)]

    def validate(self, overrides: dict[str, Any] | None = None) -> list[ExperimentConfig]:
        """Build the config of every sample; raises the first ConfigError (naming the field)."""
        return [t.config for t in self.trials(overrides)]


def prior_comparison(name: str, reproduces: str, experiment: str) -> SearchSpace:
    """Table 1's comparison on ``experiment``: one trial per prior (data-init, GD, FPI), all at
    the experiment's objective and budget, grouped by method in the results table."""
    methods = [{"prior.method": m} for m in PRIOR_METHODS]
    return SearchSpace(
        name=name,
        reproduces=reproduces,
        experiment=experiment,
        base={},
        params={"variant": tune.grid_search(methods)},
        group_by=("prior.method",),
    )


def load_space(name: str) -> SearchSpace:
    """The ``SPACE`` of module ``search_spaces.<name>``."""
    if name not in SPACE_NAMES:
        raise ConfigError("space", name, f"one of {SPACE_NAMES}")
    space = importlib.import_module(f"search_spaces.{name}").SPACE
    if not isinstance(space, SearchSpace) or space.name != name:
        raise ConfigError(
            "space",
            name,
            f"search_spaces/{name}.py must define SPACE = SearchSpace(name={name!r}, ...)",
        )
    return space


def _preset_row(name: str) -> str:
    from nfpi.presets import EXPERIMENTS

    overrides = {} if EXPERIMENTS[name].get("data.name") not in (
        "cifar10", "cifar100", "imagefolder") else {"data.root": "/data"}  # fmt: skip
    if EXPERIMENTS[name].get("flow.init_required"):
        overrides["flow.init_from"] = "/pretrained-run"
    c = experiment_config(name, overrides).resolved()
    p = c.prior
    what = p.method
    if p.method == "fpi":
        what += f" {p.fpi.form} form, moves {p.fpi.update}, start variances {p.fpi.variance_init}"
    if p.method != "data-init":
        o = p.objective_for()
        what += f", lambda {o.lam:g}, alpha {o.alpha:g}, pi {o.pi}"
    solves = p.solve_epochs(c.optim.epochs)
    when = (
        "none"
        if not solves
        else f"after epoch {solves[0]}"
        if len(solves) == 1
        else f"after epochs {solves[0]}..{solves[-1]} ({len(solves)})"
    )
    size = f"{c.data.image_size} x {c.data.image_size}" if c.data.image_size else "native"
    subset = f", {c.data.items_per_class}/class" if c.data.items_per_class else ""
    ema = f"{c.ema.update_every} / {c.ema.update_after_step}" if c.ema.enabled else "off"
    flow = c.flow.preset + (" (fine-tunes `flow.init_from`)" if c.flow.init_required else "")
    return (
        f"| `{name}` | {c.data.name} ({size}{subset}) | {flow} | {c.optim.epochs} | "
        f"{what} | {when} | {ema} |"
    )


def catalogue_markdown() -> str:
    """Every search space (what it reproduces, its base experiment, its options) and every
    named experiment (its data, flow, budget, prior and schedule), read from the code."""
    from nfpi.presets import EXPERIMENTS

    lines = [
        "# Spaces and named experiments",
        "",
        "Generated from the code by `python -m search_spaces --write docs/spaces.md`;",
        "`tests/search_spaces/test_catalogue.py` fails when this page and the code differ.",
        "Options are given as `--set KEY=VALUE` (first value = default);",
        "`python ray_jobs/sweep.py --space table1 --plan` prints what each trial of a space runs and",
        "what it costs.",
        "",
        "## Search spaces (`search_spaces/`, `python ray_jobs/sweep.py --space digits`)",
        "",
        "| space | reproduces (default options) | base experiment | trials | kind | options |",
        "|---|---|---|---|---|---|",
    ]
    for name in SPACE_NAMES:
        space = load_space(name)
        options = (space.describe_options() or "-").replace("|", "\\|")
        trials = len(space.samples(n_random=1)) * space.num_samples
        lines.append(
            f"| `{name}` | {space.reproduces} | `{space.experiment}` | {trials} | {space.kind} | "
            f"{options} |"
        )
    lines += [
        "",
        "## Named experiments (`nfpi/presets.py`, `python -m nfpi train --experiment digits`)",
        "",
        "Paper-scale experiments need `--set data.root=/abs/path`. The column 'updated' gives",
        "the epochs after which the prior is updated; EMA is update-every / update-after-step.",
        "",
        "| experiment | data | flow | epochs | prior | updated | EMA |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [_preset_row(name) for name in EXPERIMENTS]
    return "\n".join(lines) + "\n"
