"""The epoch loop every model trains through: the flow (:class:`nfpi.training.Trainer`) and the
downstream classifier (:mod:`nfpi.downstream.classifier`).

A model's training is a *recipe* (:class:`Recipe`): it trains and evaluates one epoch and
says what its checkpoint holds. :func:`fit_epochs` runs the recipe's epochs from where it
stands to the last and does, after every epoch and in this order, what every model needs::

    metrics = recipe.run_epoch(epoch)      # + epoch_seconds
    refuse a diverged epoch                  # nothing of it saved (DivergenceError)
    history += metrics; checkpoint + metrics.jsonl (CheckpointStore, rank 0)
    sync (a barrier of all ranks), log the epoch's line, callbacks(EpochResult)

The checkpoint store (:class:`nfpi.checkpoint.CheckpointStore`) verifies before it writes, keeps
the last few, loads with ``weights_only=True`` and resumes exactly: a recipe restarted from its
checkpoint continues at the next epoch, bit-identical to an uninterrupted run, provided its
epoch's randomness is a function of ``(seed, epoch)`` (both recipes derive it so).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from nfpi.checkpoint import CheckpointStore, implausible, last_good_note
from nfpi.errors import DivergenceError
from nfpi.prior import PriorReport

__all__ = ["EpochResult", "Recipe", "fit_epochs", "refuse_divergence"]

log = logging.getLogger(__name__)


@dataclass
class EpochResult:
    """One finished epoch, handed to every callback (on every rank).

    Attributes:
        epoch: the epoch's index (0-based).
        metrics: its metrics, as logged and written to ``metrics.jsonl``.
        checkpoint_dir: the checkpoint just written (rank 0 with a store only).
        artifacts: the PNGs written this epoch.
        prior_report: the report of a prior update made this epoch (flows only).
        timings: seconds per phase beyond the metrics: ``checkpoint_s`` (the save),
            ``barrier_s`` (waiting for the other ranks) and whatever the recipe adds.
    """

    epoch: int
    metrics: dict[str, float]
    checkpoint_dir: Path | None = None
    artifacts: list[Path] = field(default_factory=list)
    prior_report: PriorReport | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Recipe(Protocol):
    """What :func:`fit_epochs` trains.

    ``epoch`` is the number of finished epochs (the next one to train) and ``history`` their
    metrics; the loop advances both. ``state_dict`` is the checkpoint of the recipe as it stands
    (``epoch`` and ``history`` included, plain values and tensors only); ``guarded_state`` the
    part of it that the divergence guard checks (weights, optimiser, ...).
    """

    epoch: int
    history: list[dict[str, float]]

    def run_epoch(self, epoch: int) -> EpochResult: ...

    def guarded_state(self) -> Mapping[str, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...


def refuse_divergence(
    epoch: int,
    state: Mapping[str, Any],
    metrics: Mapping[str, float],
    run_dir: str | Path | None,
) -> None:
    """Raise :class:`DivergenceError` if an epoch's metrics or state are not finite and
    plausible (:func:`nfpi.checkpoint.implausible`); the message says where the last good
    checkpoint of ``run_dir`` is (``None``: a run that keeps none)."""
    problems = implausible(state, metrics)
    if not problems:
        return
    if run_dir is None:
        last, note = (
            None,
            "this run keeps no checkpoints: start it again with a lower learning rate",
        )
    else:
        last, note = last_good_note(run_dir)
    raise DivergenceError(
        f"epoch {epoch} diverged ({'; '.join(problems)}); nothing of it was saved and {note}",
        None if last is None else str(last),
    )


def fit_epochs(
    recipe: Recipe,
    epochs: int,
    *,
    store: CheckpointStore | None = None,
    callbacks: Iterable[Callable[[EpochResult], None]] = (),
    sync: Callable[[], None] | None = None,
    name: str = "",
    main: bool = True,
) -> list[dict[str, float]]:
    """Train ``recipe`` from its ``epoch`` to ``epochs``; returns its history.

    Args:
        recipe: what trains (:class:`Recipe`).
        epochs: the last epoch + 1.
        store: where every finished epoch's checkpoint and ``metrics.jsonl`` go (``None``:
            nowhere; the divergence guard still runs).
        callbacks: called with each :class:`EpochResult` after its checkpoint is saved.
        sync: called by every rank after the save (a barrier under ``torch.distributed``).
        name: prefix of the epoch's log line (``"classifier "``).
        main: whether this process logs (rank 0).

    Raises:
        DivergenceError: an epoch diverged; nothing of it was saved.
    """
    callbacks = list(callbacks)
    for epoch in range(recipe.epoch, epochs):
        t0 = time.perf_counter()
        result = recipe.run_epoch(epoch)
        result.metrics["epoch_seconds"] = time.perf_counter() - t0
        refuse_divergence(
            epoch, recipe.guarded_state(), result.metrics, None if store is None else store.run_dir
        )
        recipe.epoch = epoch + 1
        recipe.history.append(result.metrics)
        t_save = time.perf_counter()
        if store is not None:
            result.checkpoint_dir = store.save(recipe.state_dict())
            store.write_metrics(recipe.history)
        t_sync = time.perf_counter()
        if sync is not None:
            sync()
        result.timings.update(checkpoint_s=t_sync - t_save, barrier_s=time.perf_counter() - t_sync)
        if main:
            log.info(
                "%sepoch %d: %s",
                name,
                epoch,
                ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if k != "epoch"),
            )
        for callback in callbacks:
            callback(result)
    return recipe.history
