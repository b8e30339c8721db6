"""Cheap checks an entry point runs before any work starts (before Ray is started).

:func:`preflight` turns the mistakes that used to surface minutes into a run (a missing data
path, a global batch that the workers cannot split, a batch larger than the training set) into
a named error at once, and returns warnings about schedules that do not fit the run's length:
a long-run default such as the paper's 1000 warm-up steps or its EMA (beta 0.9999, one update
every 10 steps) makes a short run meaningless (the learning rate is still rising when it ends,
the evaluated EMA flow still mostly holds early weights).

Nothing here loads a dataset: training-set sizes are known for the built-in datasets
(:func:`train_set_size`) and unknown (no size check, no warning) for image folders.
"""

from __future__ import annotations

import math
from pathlib import Path

from nfpi.config import ExperimentConfig
from nfpi.errors import ConfigError, DatasetNotFoundError

__all__ = [
    "check_batch_split",
    "check_data_paths",
    "ema_window_steps",
    "preflight",
    "schedule_warnings",
    "train_set_size",
]

# Training-set sizes of the built-in datasets: (classes, items per class of the train split).
_KNOWN_TRAIN = {"cifar10": (10, 5000), "cifar100": (100, 500)}
DIGITS_TRAIN = 1437  # nfpi.data.load: the fixed stratified 80/20 split of 1797 digits
SYNTHETIC_TRAIN_PER_CLASS = 64
# A schedule "fits" a run when warm-up takes at most half of its optimiser steps and the EMA's
# averaging window at the end is shorter than the steps the EMA ran for (the paper's EMA over its
# 500 epochs averages about two thirds of them: a long window, but not one longer than the run).
MAX_WARMUP_FRACTION = 0.5
MAX_EMA_FRACTION = 1.0


def check_batch_split(batch_size: int, num_workers: int) -> None:
    """The global batch splits evenly across ``num_workers`` data-parallel workers (``0``: Ray
    Train's local mode, one process). The one statement of this rule: :func:`preflight`, a Ray
    run (``ray_jobs.train.run_experiment``) and the training loop each call it.

    Raises:
        ConfigError: naming ``optim.batch_size``, the worker count and the fix.
    """
    if num_workers > 0 and batch_size % num_workers:
        raise ConfigError(
            "optim.batch_size",
            batch_size,
            f"a multiple of the number of workers ({num_workers}): the global batch is split "
            "evenly across them; change --set optim.batch_size or --num-workers",
        )


def check_data_paths(config: ExperimentConfig) -> None:
    """The dataset's ``data.root`` exists (folder or archive), unless it is to be downloaded.

    Raises:
        DatasetNotFoundError: naming the path and the fix.
    """
    data = config.data
    if data.name not in ("cifar10", "cifar100", "imagefolder") or data.root is None:
        return
    root = Path(data.root).expanduser()
    if data.download and data.name != "imagefolder":
        return
    if not root.exists():
        what = (
            "an image tree {train,test|val}/<class>/<images> or a .tar.gz of one"
            if data.name == "imagefolder"
            else f"the folder holding the {data.name} python-version files (or "
            "--set data.download=true when online)"
        )
        raise DatasetNotFoundError(
            f"data.root {str(root)!r} does not exist: --set data.root=/abs/path to {what}"
        )


def train_set_size(config: ExperimentConfig) -> int | None:
    """Images in the training split (after ``data.items_per_class``), or ``None`` when it is
    not known without reading the data (image folders)."""
    data = config.data
    per_class = data.items_per_class
    if data.name == "digits":
        return DIGITS_TRAIN if per_class is None else min(DIGITS_TRAIN, 10 * per_class)
    if data.name in _KNOWN_TRAIN:
        k, n = _KNOWN_TRAIN[data.name]
        return k * (n if per_class is None else min(n, per_class))
    if data.name == "synthetic":
        k = data.num_classes or 10
        return k * (per_class or SYNTHETIC_TRAIN_PER_CLASS)
    return None


def ema_window_steps(config: ExperimentConfig, steps: int) -> float:
    """How many optimiser steps the EMA flow averages over at the end of a run whose EMA ran
    for ``steps`` steps: ema-pytorch's decay ``min(beta, 1 - (1 + t)^-power)`` after
    ``t = steps - update_after_step`` steps, one update every ``update_every`` steps, so about
    ``update_every / (1 - decay)`` steps (infinite when the EMA never updated)."""
    ema = config.ema
    t = steps - ema.update_after_step - 1
    if t <= 0:
        return math.inf
    decay = min(ema.beta, 1.0 - (1.0 + t) ** -ema.power)
    return ema.update_every / (1.0 - decay)


def schedule_warnings(config: ExperimentConfig, train_size: int | None) -> list[str]:
    """Warnings for a warm-up or an EMA sized for a much longer run than this one."""
    if train_size is None:
        return []
    o = config.optim
    per_epoch = train_size // o.batch_size
    total = o.epochs * per_epoch
    if total <= 0:
        return []
    out = []
    if o.warmup_steps > MAX_WARMUP_FRACTION * total:
        out.append(
            f"optim.warmup_steps={o.warmup_steps} spans {o.warmup_steps / total:.0%} of this "
            f"run's {total} optimiser steps ({o.epochs} epochs x {per_epoch} batches of "
            f"{o.batch_size}): the learning rate is still rising for most of it. For a short "
            f"run --set optim.warmup_steps={max(1, total // 10)} (or use a -quick experiment)"
        )
    # The FPI's EMA starts after its first solve (the release); the other methods' at step 0.
    start = per_epoch * (config.prior.solve_epoch + 1) if config.prior.method == "fpi" else 0
    ema_steps = total - start
    window = ema_window_steps(config, ema_steps)
    if ema_steps > 0 and window > MAX_EMA_FRACTION * ema_steps:
        e = config.ema
        span = "never updates" if math.isinf(window) else f"averages ~{window:.0f} steps"
        out.append(
            f"the EMA (ema.beta={e.beta:g}, ema.update_every={e.update_every}, "
            f"ema.update_after_step={e.update_after_step}) {span} at the end of a run whose EMA "
            f"runs {ema_steps} steps: the evaluated flow is mostly early weights. For a short "
            "run --set ema.beta=0.999 --set ema.update_every=1 --set ema.update_after_step=100 "
            "(or use a -quick experiment)"
        )
    return out


def preflight(config: ExperimentConfig, num_workers: int = 1) -> list[str]:
    """Every cheap check of a run of ``config`` on ``num_workers`` data-parallel workers;
    returns the schedule warnings.

    Raises:
        ConfigError: a global batch that ``num_workers`` cannot split evenly, or larger than
            the training set.
        DatasetNotFoundError: ``data.root`` does not exist.
    """
    o = config.optim
    check_batch_split(o.batch_size, num_workers)
    check_data_paths(config)
    size = train_set_size(config)
    if size is not None and o.batch_size > size:
        raise ConfigError("optim.batch_size", o.batch_size, f"<= the training set size ({size})")
    return schedule_warnings(config, size)
