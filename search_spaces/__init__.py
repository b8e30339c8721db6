"""Sweeps as code: one module per search space, named after what it reproduces.

A space is a base experiment (dataset, flow preset, budget) plus the Tune domains that vary.
Keys of ``params`` are dotted config keys (``"prior.objective.lam"``), or ``"variant"``-style keys whose
values are whole dicts of dotted overrides (so coupled settings, e.g. a method and its learning-rate
policy, vary together). Every space module defines ``SPACE``.

    from search_spaces import load_space
    space = load_space("table2")
    config = space.config_for({"prior.objective.lam": 300.0}, {"data.root": "/data/cifar100"})
"""

from __future__ import annotations

import importlib
import itertools
import pkgutil
import random
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search.sample import Domain

from nfpi.config import ExperimentConfig
from nfpi.errors import ConfigError
from nfpi.presets import experiment_config

__all__ = ["SPACE_NAMES", "SearchSpace", "load_space"]

# Every module of this package is a space: adding a file adds a space (no hand-kept list).
SPACE_NAMES: tuple[str, ...] = tuple(
    sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
)
DOWNSTREAM_PREFIXES = ("downstream.", "cnn.")


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
        flow = {k: v for k, v in merged.items() if not k.startswith(DOWNSTREAM_PREFIXES)}
        down = {k: v for k, v in merged.items() if k.startswith(DOWNSTREAM_PREFIXES)}
        if down and self.kind != "downstream":
            key = next(iter(down))
            raise ConfigError(
                key, down[key], f"downstream settings, but space {self.name!r} trains flows only"
            )
        return flow, down

    def config_for(
        self, sample: dict[str, Any], overrides: dict[str, Any] | None = None
    ) -> ExperimentConfig:
        """The flow experiment of one trial: base experiment, then the space's base, then the
        sampled values, then command-line overrides. Invalid values raise ConfigError naming the
        dotted field."""
        return experiment_config(self.experiment, self._merged(sample, overrides)[0])

    def downstream_for(
        self, sample: dict[str, Any], overrides: dict[str, Any] | None = None
    ) -> Any:
        """The :class:`nfpi.downstream.DownstreamConfig` of one trial of a downstream space."""
        from nfpi.downstream import DownstreamConfig

        return DownstreamConfig.from_overrides(self._merged(sample, overrides)[1])

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

    def validate(self, overrides: dict[str, Any] | None = None) -> list[ExperimentConfig]:
        """Build the config of every sample; raises the first ConfigError (naming the field)."""
        configs = []
        for sample in self.samples():
            configs.append(self.config_for(sample, overrides))
            if self.kind == "downstream":
                self.downstream_for(sample, overrides)
        return configs


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
