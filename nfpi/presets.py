"""Named experiments: small overrides of the base :class:`~nfpi.config.ExperimentConfig`.

Each entry of :data:`EXPERIMENTS` is a dict of dotted overrides named after what it runs::

    cfg = experiment_config("digits", {"prior.method": "gd", "optim.epochs": 5})

:func:`resolve_config` is what every command line uses: a named experiment (or a JSON config
file, e.g. a run's ``config.json``), then ``--set KEY=VALUE`` overrides parsed as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nfpi.config import ExperimentConfig
from nfpi.errors import ConfigError

__all__ = ["EXPERIMENTS", "experiment_config", "parse_override", "resolve_config"]


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
        "prior.objective.lam": 1000.0,
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
        "prior.objective.lam": 300.0,
    },
    "cifar100": {
        "name": "cifar100",
        "data.name": "cifar100",
        "flow.preset": "mef-cifar",
        "optim.epochs": 500,
        "prior.objective.lam": 300.0,
    },
}


def experiment_config(
    name: str = "digits", overrides: dict[str, Any] | None = None
) -> ExperimentConfig:
    """The named experiment with ``overrides`` (dotted keys) applied on top."""
    if name not in EXPERIMENTS:
        raise ConfigError("experiment", name, f"one of {sorted(EXPERIMENTS)}")
    return ExperimentConfig().with_overrides({**EXPERIMENTS[name], **(overrides or {})})


def parse_override(text: str) -> tuple[str, Any]:
    """``"prior.objective.lam=300"`` -> ``("prior.objective.lam", 300)``.

    The value is parsed as JSON when it is JSON (numbers, true/false, null, lists, objects);
    a bare word (``gd``) is taken as a string, but text that starts like JSON and does not parse
    (``[1, 2``) is an error naming the key.
    """
    if "=" not in text:
        raise ConfigError("--set", text, "KEY=VALUE, e.g. prior.objective.lam=300")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ConfigError("--set", text, "KEY=VALUE with a non-empty key")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError as err:
        if raw[:1] in '[{"' or raw[:1].isdigit() or raw[:1] == "-":
            raise ConfigError(
                key, raw, f"a JSON value ({err.msg} at character {err.pos}); quote strings"
            ) from None
        return key, raw


def resolve_config(
    experiment: str = "digits",
    sets: list[str] = (),
    config_file: str | None = None,  # type: ignore[assignment]
) -> ExperimentConfig:
    """A run's config: a JSON file (e.g. a run's ``config.json``) or a named experiment, then
    ``--set`` overrides."""
    overrides: dict[str, Any] = dict(parse_override(s) for s in sets)
    if config_file is not None:
        path = Path(config_file)
        try:
            values = json.loads(path.read_text())
        except OSError as err:
            raise ConfigError(
                "--config", config_file, f"a readable JSON file ({err.strerror})"
            ) from None
        except json.JSONDecodeError as err:
            raise ConfigError("--config", config_file, f"valid JSON ({err})") from None
        return ExperimentConfig.from_dict(values).with_overrides(overrides)
    return experiment_config(experiment, overrides)
