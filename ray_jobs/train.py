"""One experiment as a data-parallel Ray Train run, with the prior actor and MLflow logging.

    python ray_jobs/train.py                                      # digits, 1 CPU worker
    python ray_jobs/train.py --num-workers 2 --set optim.epochs=5
    python ray_jobs/train.py --experiment cifar10 --set data.root=/data/cifar10 --use-gpu \\
        --num-workers 8 --results-dir /shared/nfpi
    python ray_jobs/train.py --smoke-test                         # seconds; what CI runs

Each worker runs :class:`nfpi.training.Trainer` (the library loop) under ``torch.distributed``
(gloo on CPU, nccl on GPU) set up by Ray Train; the global batch is split across workers. Rank 0
hands the all-reduced class statistics to the prior actor, writes the run's files under
``<results-dir>/runs/<run name>/``, reports every epoch's metrics and checkpoint to Ray Train and
logs metrics and pictures to MLflow. Re-running with the same ``--run-name`` and
``--results-dir`` resumes from the latest checkpoint; a lost worker restarts the group from it
(``--max-failures``); ``--resume-with optim.lr=...`` resumes a diverged run with other optimiser
knobs; ``--resume-from EPOCH|PATH`` resumes from a chosen checkpoint and ``--fresh`` starts again
at epoch 0 on purpose (a run directory with history but no checkpoint that verifies is refused
in one line naming both).

Nothing lost, nothing twice: the driver holds the run directory's lock for the whole run; each
(re)started rank 0 logs to MLflow every epoch of the checkpoint's history after the last step the
MLflow run holds, then each new epoch after its checkpoint is saved, so every step is written
once whatever was interrupted (epochs trained again replace their values: the MLflow run is
superseded by a new one, :func:`supersede_run`); Ray checkpoints uploaded but never registered
(a crash between the two) are removed before and after a run. A deterministic error (any
``NfpiError`` that is not ``retryable``: config, shape, divergence, FPI) ends the run at once,
whatever ``--max-failures`` says, with the error recorded in MLflow (``nfpi.error`` tag,
``error.txt``); the worker count is logged per attempt (metric and tag ``ray.num_workers``), not
as a param, so a run may resume on another number of workers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import ray
import ray.train
import ray.train.collective
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from nfpi.checkpoint import (
    checkpoint_epoch,
    find_checkpoint,
    load_checkpoint,
    lock_run_dir,
    resolve_resume_from,
    resume_checkpoint,
    select_checkpoint,
    set_aside_history,
)
from nfpi.checks import check_batch_split, train_set_size
from nfpi.config import ExperimentConfig
from nfpi.data import load_dataset
from nfpi.entry import Parser, add_resume_args, run_cli, setup_logging
from nfpi.errors import NfpiError
from nfpi.presets import EXPERIMENTS, parse_override, resolve_config
from nfpi.training import Callback, EpochResult, Trainer, is_wall_clock
from ray_jobs._ray_compat import ControllerCallback, FailureDecision, WorkerGroupCallback
from ray_jobs.mlflow_logging import log_datasets, log_flow_model
from ray_jobs.prior_actor import ActorPriorClient, prior_actor_factory
from ray_jobs.progress import TrainProgress
from ray_jobs.settings import (
    RaySettings,
    add_common_args,
    check_before_ray,
    connect,
    describe_outputs,
)
from ray_jobs.tracking import RunLogger, Tracking, start_run, system_metrics, ui_command, ui_url

__all__ = [
    "StopOnDeterministicError",
    "WorkerSpec",
    "deterministic_cause",
    "final_metrics",
    "main",
    "remove_unregistered_checkpoints",
    "run_experiment",
    "train_loop_per_worker",
]

log = logging.getLogger("nfpi.ray")
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's registry of a run's checkpoints


@dataclass(frozen=True)
class WorkerSpec:
    """What every Train worker of one run needs besides the experiment config."""

    run_name: str
    run_dir: Path
    use_gpu: bool
    actor: Any  # the prior actor's handle
    actor_timeout: float
    tracking: Tracking | None = None
    mlflow_run_id: str | None = None
    callbacks: tuple[Callback, ...] = field(default_factory=tuple)
    actor_factory: Any = None  # starts a replacement prior actor (prior_actor_factory)
    resume_overrides: Mapping[str, Any] = field(default_factory=dict)
    owns_run: bool = True  # the MLflow run is this run's own (it may be superseded)


def deterministic_cause(error: BaseException | None) -> NfpiError | None:
    """The non-retryable :class:`NfpiError` behind ``error`` (unwrapping Ray Train's worker-group
    and controller errors, Ray task errors and exception chains), or ``None``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NfpiError):
            return None if error.retryable else error
        failures = getattr(error, "worker_failures", None)  # ray.train.WorkerGroupError
        if isinstance(failures, Mapping):
            found = [deterministic_cause(e) for _, e in sorted(failures.items())]
            return next((c for c in found if c is not None), None)
        error = (
            getattr(error, "controller_failure", None)  # ray.train.ControllerError
            or getattr(error, "_base_exc", None)  # a worker's UserExceptionWithTraceback
            or getattr(error, "cause", None)  # ray.exceptions.RayTaskError
            or error.__cause__
        )
    return None


# Ray Train 2.60 has no public hook to fail a run without retrying it; its controller runs these
# developer-API callbacks (RunConfig(callbacks=...) passes them through "for custom workarounds
# built on top of internal callbacks"). tests/ray_jobs/test_recovery.py fails if this stops working,
# tests/ray_jobs/test_ray_compat.py if Ray moves them.
class StopOnDeterministicError(ControllerCallback, WorkerGroupCallback):
    """Ends a Ray Train run at once when a worker fails with a deterministic error.

    Ray Train 2.60's failure policy retries every worker error up to ``max_failures`` (``-1``:
    forever); a config, shape or divergence error would just repeat. This callback, run by the
    controller, remembers such an error from the worker group's poll and, when the policy decides
    to retry, raises it instead: the controller turns a callback error into a non-retried
    ``ControllerError`` whose ``controller_failure`` is the worker's error.
    """

    def __init__(self) -> None:
        self.error: NfpiError | None = None

    def after_worker_group_poll_status(self, worker_group_status: Any) -> None:
        for _, error in sorted(worker_group_status.errors.items()):
            cause = deterministic_cause(error)
            if cause is not None and self.error is None:
                self.error = cause

    def before_controller_execute_failure_decision(self, failure_decision: Any) -> None:
        if self.error is not None and failure_decision == FailureDecision.RETRY:
            raise self.error


def remove_unregistered_checkpoints(train_dir: Path) -> list[Path]:
    """Delete the ``checkpoint_*`` folders of a Ray Train run (``<storage>/<run name>``) that its
    checkpoint registry does not name: uploaded by rank 0 but never registered, because a worker
    or the driver died between the upload and the registration. Call it only while no Train run
    of this name is active (the driver holds the run directory's lock). Returns what it removed.
    """
    if not train_dir.is_dir():
        return []
    snapshot = train_dir / SNAPSHOT
    text = snapshot.read_text() if snapshot.is_file() else ""
    registered = set(re.findall(r'"(checkpoint_[^"/]+)"', text))
    orphans = sorted(
        p for p in train_dir.glob("checkpoint_*") if p.is_dir() and p.name not in registered
    )
    for path in orphans:
        log.warning("removing checkpoint %s: uploaded but never registered by Ray Train", path)
        shutil.rmtree(path, ignore_errors=True)
    return orphans


SUPERSEDED_BY = "nfpi.superseded_by"  # tag of an MLflow run replaced by a re-run of its epochs


def current_run(tracking: Tracking, run_id: str) -> str:
    """The run that replaced ``run_id`` (following :data:`SUPERSEDED_BY`), else ``run_id``."""
    client, seen = tracking.client(), {run_id}
    while True:
        successor = client.get_run(run_id).data.tags.get(SUPERSEDED_BY)
        if not successor or successor in seen:
            return run_id
        seen.add(successor)
        run_id = successor


def supersede_run(tracking: Tracking, run_id: str, reason: str) -> str:
    """A new MLflow run in place of ``run_id`` (same name, parent, tags and params; tag
    ``nfpi.supersedes``), for a resume that trains epochs again which ``run_id`` logged: MLflow
    cannot delete logged metric values, and logging them again would give two values per step.
    The old run keeps everything it logged, is tagged :data:`SUPERSEDED_BY` and ``reason`` and
    is moved to MLflow's trash (deleted runs are restorable; ``mlflow gc`` alone removes them).
    Returns the new run's id."""
    client = tracking.client()
    old = client.get_run(run_id)
    tags = {
        k: v
        for k, v in old.data.tags.items()
        if not k.startswith("mlflow.") or k == "mlflow.parentRunId"
    }
    tags["nfpi.supersedes"] = run_id
    new = client.create_run(old.info.experiment_id, run_name=old.info.run_name, tags=tags)
    params = [mlflow.entities.Param(k, v) for k, v in old.data.params.items()]
    for i in range(0, len(params), 100):  # the batch API takes at most 100 params
        client.log_batch(new.info.run_id, params=params[i : i + 100])
    client.set_tag(run_id, SUPERSEDED_BY, new.info.run_id)
    client.set_tag(run_id, "nfpi.superseded", reason[:5000])
    client.set_terminated(run_id, status="KILLED")
    client.delete_run(run_id)
    log.warning("MLflow run %s superseded by %s: %s", run_id, new.info.run_id, reason)
    return new.info.run_id


class _EpochsToMLflow:
    """Rank 0's MLflow metrics: every history epoch after the last step the run holds, once.

    An epoch trained again (a resume from an earlier checkpoint, ``--resume-from``, ``--fresh``)
    replaces the run's values: the run is superseded by a new one (:func:`supersede_run`) that
    gets the checkpoint's history and then each new epoch, so every step has one value, the
    current one. A run the caller owns (``supersede=False``) keeps its values and says so in
    the tag ``nfpi.rerun_epochs``."""

    def __init__(self, logger: RunLogger, supersede: bool = True) -> None:
        self.logger = logger
        self.supersede = supersede
        self.last = logger.last_step("epoch")  # the "epoch" metric is in every epoch's metrics

    def trained(self, epoch: int, history: Sequence[dict[str, float]], workers: int) -> None:
        """Called once ``epoch`` is trained and checkpointed (``history`` up to it). An epoch
        the run holds already with the same values (a deterministic re-run after a lost
        worker; wall-clock times aside) is left as it is."""
        if self.last is not None and epoch <= self.last and not self._as_logged(epoch, history):
            reason = f"epochs {epoch}..{self.last} trained again from the checkpoint"
            if not self.supersede:
                self.logger.tag("nfpi.rerun_epochs", f"{reason}; MLflow holds the first values")
            else:
                new = supersede_run(self.logger.tracking, self.logger.run_id, reason)
                self.logger = RunLogger(self.logger.tracking, new)
                self.logger.metrics({"ray.num_workers": workers}, step=0)
                self.logger.tag("ray.num_workers", str(workers))
                self.last = None
        self.log_new(history)

    def _as_logged(self, epoch: int, history: Sequence[dict[str, float]]) -> bool:
        """Whether the run holds exactly ``history[epoch]``'s values at step ``epoch``."""
        client, run_id = self.logger.client, self.logger.run_id
        for key, value in history[epoch].items():
            if is_wall_clock(key) or not isinstance(value, (int, float)):
                continue
            logged = [m.value for m in client.get_metric_history(run_id, key) if m.step == epoch]
            if logged != ([float(value)] if math.isfinite(value) else []):
                return False
        return True

    def log_new(self, history: Sequence[dict[str, float]]) -> None:
        for epoch, metrics in enumerate(history):
            if self.last is None or epoch > self.last:
                self.logger.metrics(metrics, step=epoch)
                self.last = epoch


def _resume_source(run_dir: Path) -> Path | None:
    """The checkpoint a (re)started worker group resumes from (decided on rank 0): the run
    directory's own last good one, or the one Ray Train registered (e.g. after the loss of a node
    whose local disk held the run directory), whichever holds more epochs; ``None`` for a fresh
    start. A registered checkpoint is copied into the run directory first, which every worker
    reads (the results directory is shared storage on a cluster)."""
    registered = ray.train.get_checkpoint()
    if registered is None:
        return resume_checkpoint(run_dir)[0]  # a run dir with history but none: refused
    try:
        local = resume_checkpoint(run_dir)[0]
    except NfpiError as err:  # the registered one is the history to resume
        log.warning("%s; resuming from Ray Train's registered checkpoint instead", err)
        local = None
    local_epoch = checkpoint_epoch(run_dir) if local is not None else None
    with registered.as_directory() as path:
        ray_epoch = checkpoint_epoch(path)
        if local is not None and (ray_epoch is None or (local_epoch or 0) >= ray_epoch):
            return local
        target = run_dir / "checkpoints" / "from-ray"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(path, target)
    return target


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    """What every Ray Train worker runs: the library loop plus Ray reporting and MLflow."""
    config = ExperimentConfig.from_dict(loop_config["experiment"])  # parsed once, at the top
    spec: WorkerSpec = loop_config["spec"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    logger = epochs = None
    watch = contextlib.ExitStack()
    workers = context.get_world_size()
    if rank == 0 and spec.tracking is not None and spec.mlflow_run_id is not None:
        logger = RunLogger(spec.tracking, current_run(spec.tracking, spec.mlflow_run_id))
        # One value per attempt (a restarted worker group is a new attempt): params are
        # immutable, and a resumed run may use another number of workers.
        logger.metrics({"ray.num_workers": workers}, step=logger.count("ray.num_workers"))
        logger.tag("ray.num_workers", str(workers))
        epochs = _EpochsToMLflow(logger, supersede=spec.owns_run)
        # Rank 0's node's CPU, memory, disk, network and GPU as MLflow system metrics, from
        # here (data loading and the flow's initialisation included) to the end of training.
        watch.enter_context(system_metrics(spec.tracking, spec.mlflow_run_id))
    client = (
        ActorPriorClient(spec.actor, spec.actor_timeout, factory=spec.actor_factory)
        if rank == 0
        else None
    )

    def report(trainer: Trainer, result: EpochResult) -> None:
        if epochs is not None:
            epochs.trained(result.epoch, trainer.history, workers)  # its checkpoint is saved
            for path in result.artifacts:
                epochs.logger.artifact(path, "plots")
        checkpoint = name = None
        if result.checkpoint_dir is not None:
            checkpoint = Checkpoint.from_directory(str(result.checkpoint_dir))
            name = f"checkpoint_{result.checkpoint_dir.name}"  # one name per epoch
        ray.train.report(
            result.metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            delete_local_checkpoint_after_upload=False,
        )

    resume = ray.train.collective.broadcast_from_rank_zero(
        _resume_source(spec.run_dir) if rank == 0 else None
    )
    trainer = Trainer(
        config,
        spec.run_dir,
        prior_client=client,
        callbacks=[*spec.callbacks, report],
        device=device,
        resume_from=resume,
        resume_overrides=spec.resume_overrides,
        lock_run_dir=False,  # the driver holds the run directory's lock for all attempts
    )
    with watch:
        history = trainer.fit()
    if epochs is not None:
        logger = epochs.logger  # the run that holds this run's epochs now
        epochs.log_new(history)  # a finished run re-launched, or epochs of a cut-off attempt
        logger.artifact(spec.run_dir / "metrics.jsonl")
        if (spec.run_dir / "plots").is_dir():
            logger.artifacts(spec.run_dir / "plots", "plots")  # also those of cut-off epochs
        if client is not None and client.reseeds:
            logger.tag("prior_actor_reseeds", str(client.reseeds))
        if client is not None and client.replacements:
            logger.tag("prior_actor_replacements", str(client.replacements))
    return history[-1] if history else {}


def _actor_for(config: ExperimentConfig, settings: RaySettings) -> tuple[Any, Any, Any, int]:
    """The prior actor for ``config``, sized (K, d) from the dataset's test split, the factory
    of a replacement (both on the driver's node unless ``settings.prior_actor_node`` says
    ``any``), and the split's info and size."""
    test, info = load_dataset(
        config.data.name, "test", seed=config.seed, **config.data.split_kwargs("test")
    )
    dim = info.shape[0] * info.shape[1] * info.shape[2]
    node = (
        ray.get_runtime_context().get_node_id() if settings.prior_actor_node == "driver" else None
    )
    factory = prior_actor_factory(config.prior, info.num_classes, dim, node_id=node)
    return factory(), factory, info, len(test)


def run_experiment(
    config: ExperimentConfig,
    settings: RaySettings,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    mlflow_run_id: str | None = None,
    storage: Path | None = None,
    train_callbacks: Sequence[Any] = (),
    worker_callbacks: Sequence[Callback] = (),
    display_name: str | None = None,
    resume_overrides: Mapping[str, Any] | None = None,
    resume_from: str | Path | None = None,
    fresh: bool = False,
) -> ray.train.Result:
    """Run one experiment on the connected Ray cluster and return Ray Train's Result.

    ``settings.num_workers=0`` runs Train's local mode in this process (unit tests). The prior
    actor is created here, owned by this driver. ``train_callbacks`` are Ray Train callbacks
    (driver side, e.g. ``TuneReportCallback``); ``worker_callbacks`` are picklable
    ``callback(trainer, EpochResult)`` run by every worker after each epoch, before the report
    (custom logging, fault injection in tests). With ``settings.tracking`` the run logs to a new
    MLflow run (a child of ``parent_run_id``; the earlier run of the same name and parent when
    re-launched), or to ``mlflow_run_id`` if given (left open for the caller to finish).
    ``storage`` overrides where Ray Train keeps the run (default ``settings.storage``).
    A run it owns ends with its final flow and prior logged as an MLflow model
    (:func:`ray_jobs.mlflow_logging.log_flow_model`; registered under
    ``settings.registered_model`` when set); ``display_name`` names the MLflow run in the UI.
    ``resume_overrides`` (``--resume-with``) change optimiser knobs of a resumed run (see
    :class:`nfpi.training.Trainer`). ``resume_from`` (``--resume-from EPOCH|PATH``) makes that
    checkpoint the run directory's newest before Train starts; ``fresh`` (``--fresh``) moves an
    earlier run's files aside and starts at epoch 0. Either way Ray Train's own folder of the run
    is moved aside too (``<storage>/<run name>.previous-<time>``), so that its registered
    checkpoints of later epochs are not resumed instead; epochs trained again supersede the
    MLflow run that logged them (:func:`supersede_run`).

    Raises:
        RunDirectoryLockedError: another live run uses this run's directory.
        NfpiError: a deterministic error of a worker (not retried), with the run's MLflow
            record (``nfpi.error``, ``error.txt``) written first.
    """
    check_batch_split(config.optim.batch_size, settings.num_workers)
    config = config.resolved()  # the config that runs is the one logged (GD horizon filled)
    with lock_run_dir(settings.run_dir(run_name)):
        if fresh or resume_from is not None:
            _rewind(settings.run_dir(run_name), (storage or settings.storage) / run_name,
                    resume_from, fresh)  # fmt: skip
        return _run_locked(
            config,
            settings,
            run_name,
            parent_run_id=parent_run_id,
            mlflow_run_id=mlflow_run_id,
            storage=storage or settings.storage,
            train_callbacks=train_callbacks,
            worker_callbacks=worker_callbacks,
            resume_overrides=dict(resume_overrides or {}),
            display_name=display_name,
        )


def _rewind(run_dir: Path, train_dir: Path, resume_from: str | Path | None, fresh: bool) -> None:
    """``--fresh`` / ``--resume-from`` in the driver, under the run directory's lock (see
    :func:`run_experiment`)."""
    if fresh:
        set_aside_history(run_dir)
    else:
        select_checkpoint(run_dir, resolve_resume_from(run_dir, resume_from))
    if train_dir.is_dir():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside = train_dir.with_name(f"{train_dir.name}.previous-{stamp}")
        train_dir.rename(aside)
        log.warning("Ray Train's folder of the run moved to %s (its checkpoints stay)", aside)


def _run_locked(
    config: ExperimentConfig,
    settings: RaySettings,
    run_name: str,
    *,
    parent_run_id: str | None,
    mlflow_run_id: str | None,
    storage: Path,
    train_callbacks: Sequence[Any],
    worker_callbacks: Sequence[Callback],
    resume_overrides: dict[str, Any],
    display_name: str | None,
) -> ray.train.Result:
    tracking = settings.tracking
    owns_run = mlflow_run_id is None
    if tracking is not None:
        if owns_run:
            # A re-launched run resumes from its last checkpoint, and logs to its earlier run.
            mlflow_run_id = start_run(
                tracking,
                run_name,
                parent_run_id=parent_run_id,
                resume=True,
                display_name=display_name,
            )
        logger = RunLogger(tracking, mlflow_run_id)
        # Params keep the first launch's values (a changed one becomes a nfpi.changed.* tag);
        # what may differ per launch or attempt is a tag.
        logger.params(config.with_overrides(resume_overrides).flat())
        logger.tag("ray.use_gpu", str(settings.use_gpu))
        logger.tag("ray.placement_strategy", settings.placement_strategy)
        if resume_overrides:
            logger.tag("nfpi.resume_with", str(resume_overrides))
    remove_unregistered_checkpoints(storage / run_name)
    actor, factory, info, test_size = _actor_for(config, settings)
    if tracking is not None:
        log_datasets(
            tracking,
            mlflow_run_id,
            config,
            shape=info.shape,
            num_classes=info.num_classes,
            train_size=train_set_size(config),
            test_size=test_size,
        )
    spec = WorkerSpec(
        run_name=run_name,
        run_dir=settings.run_dir(run_name),
        use_gpu=settings.use_gpu,
        actor=actor,
        actor_timeout=settings.actor_timeout,
        tracking=tracking,
        mlflow_run_id=mlflow_run_id,
        callbacks=tuple(worker_callbacks),
        actor_factory=factory,
        resume_overrides=resume_overrides,
        owns_run=owns_run,
    )
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": config.to_dict(), "spec": spec},
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=resources,
            placement_strategy=settings.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[*train_callbacks, StopOnDeterministicError()],
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:
        cause = deterministic_cause(err)
        if tracking is not None:
            logger = RunLogger(tracking, current_run(tracking, mlflow_run_id))
            logger.error(cause if cause is not None else err)
            if owns_run:
                logger.finish("FAILED")
        if cause is not None and cause is not err:
            raise cause from err  # the named error itself, not Ray's wrapper around it
        raise
    except BaseException:  # Ctrl-C / SystemExit: the run is not left RUNNING forever
        if tracking is not None and owns_run:
            RunLogger(tracking, current_run(tracking, mlflow_run_id)).finish("KILLED")
        raise
    finally:
        ray.kill(actor)
        remove_unregistered_checkpoints(storage / run_name)
    if tracking is not None:
        mlflow_run_id = current_run(tracking, mlflow_run_id)  # superseded by a re-run?
        logger = RunLogger(tracking, mlflow_run_id)
        if result.checkpoint is not None:
            logger.tag("final_checkpoint", result.checkpoint.path)
            logger.text(f"{result.checkpoint.path}\n", "final_checkpoint.txt")
        if owns_run:
            final = find_checkpoint(settings.run_dir(run_name)) or (
                result.checkpoint.path if result.checkpoint is not None else None
            )
            if final is not None:
                log_flow_model(
                    tracking,
                    mlflow_run_id,
                    final,
                    settings.registered_model,
                    alias=display_name or run_name,
                )
            logger.finish()
    return result


def final_metrics(result: ray.train.Result) -> dict[str, float]:
    """The last epoch's metrics of a Train result; read from its checkpoint when the run had
    nothing left to do (a finished run re-launched under the same name)."""
    if result.metrics:
        return dict(result.metrics)
    if result.checkpoint is None:
        return {}
    history = load_checkpoint(result.checkpoint.path)["history"]
    return dict(history[-1]) if history else {}


def main(argv: list[str] | None = None) -> int:
    parser = Parser(
        description=__doc__.split("\n\n")[0],
        epilog="experiments: " + ", ".join(EXPERIMENTS),
    )
    parser.add_argument(
        "--experiment",
        default="digits",
        choices=list(EXPERIMENTS),
        metavar="NAME",
        help="a named experiment (listed below)",
    )
    parser.add_argument("--config", dest="config_file", help="a JSON experiment config")
    parser.add_argument("--run-name", help="Ray/MLflow run name (default: the experiment name)")
    parser.add_argument(
        "--resume-with",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="resume the run's checkpoint with a new optim.lr, optim.grad_clip, "
        "optim.warmup_steps or optim.epochs (repeatable; what a diverged run needs)",
    )
    add_resume_args(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    experiment = "smoke" if args.smoke_test else args.experiment
    config = resolve_config(experiment, args.set, args.config_file)
    settings = RaySettings.from_args(args)
    for line in describe_outputs(settings):
        log.info(line)
    for warning in check_before_ray([config], settings, args.address):  # before Ray starts
        log.warning(warning)
    run_name = args.run_name or config.name
    resume_with = dict(parse_override(s) for s in args.resume_with)
    log.info(connect(args.address, verbose=args.verbose))
    progress = TrainProgress(run_name, config.optim.epochs)
    progress.listen()
    try:
        result = run_experiment(
            config,
            settings,
            run_name,
            train_callbacks=[progress],
            resume_overrides=resume_with,
            resume_from=args.resume_from,
            fresh=args.fresh,
        )
    except BaseException:
        progress.close(failed=True)
        raise
    final = result.metrics or {}
    progress.close(final)
    keys = ("epoch", "train_bpd", "test_bpd", "nf_acc", "prior_version")
    print("final:", {k: round(float(final[k]), 4) for k in keys if k in final})
    print(f"run directory: {settings.run_dir(run_name)}")
    tracking = settings.tracking
    if tracking is not None:
        run = tracking.client().search_runs(
            [tracking.experiment_id()],
            f"tags.`nfpi.run_name` = '{run_name}'",
            order_by=["start_time DESC"],
            max_results=1,
        )
        link = ui_url(tracking.experiment_id(), run[0].info.run_id if run else None)
        print(f"MLflow: {ui_command(tracking.uri)}, then open {link}")
    return 0


if __name__ == "__main__":
    from ray_jobs.train import main as _main  # run as the module, so workers import it by name

    sys.exit(run_cli(_main, prog="ray_jobs/train.py"))
