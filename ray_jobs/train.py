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
(``--max-failures``).
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.collective
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from nfpi.checkpoint import checkpoint_epoch, find_checkpoint, load_checkpoint
from nfpi.checks import train_set_size
from nfpi.config import ExperimentConfig
from nfpi.data import load_dataset
from nfpi.entry import Parser, run_cli, setup_logging
from nfpi.errors import ConfigError
from nfpi.presets import EXPERIMENTS, resolve_config
from nfpi.training import Callback, EpochResult, Trainer
from ray_jobs.mlflow_logging import log_datasets, log_flow_model
from ray_jobs.prior_actor import ActorPriorClient, create_prior_actor
from ray_jobs.progress import TrainProgress
from ray_jobs.settings import RaySettings, add_common_args, check_before_ray, connect
from ray_jobs.tracking import RunLogger, Tracking, start_run, ui_url

__all__ = ["WorkerSpec", "final_metrics", "main", "run_experiment", "train_loop_per_worker"]

log = logging.getLogger("nfpi.ray")


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


def _resume_source(run_dir: Path) -> Path | None:
    """The checkpoint a (re)started worker group resumes from (decided on rank 0): the run
    directory's own last good one, or the one Ray Train registered (e.g. after the loss of a node
    whose local disk held the run directory), whichever holds more epochs; ``None`` for a fresh
    start. A registered checkpoint is copied into the run directory first, which every worker
    reads (the results directory is shared storage on a cluster)."""
    local = find_checkpoint(run_dir)
    registered = ray.train.get_checkpoint()
    if registered is None:
        return local
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
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")
    logger = None
    if rank == 0 and spec.tracking is not None and spec.mlflow_run_id is not None:
        logger = RunLogger(spec.tracking, spec.mlflow_run_id)
    client = ActorPriorClient(spec.actor, spec.actor_timeout) if rank == 0 else None

    def report(trainer: Trainer, result: EpochResult) -> None:
        if logger is not None:
            logger.metrics(result.metrics, step=result.epoch)
            for path in result.artifacts:
                logger.artifact(path, "plots")
        checkpoint = (
            None
            if result.checkpoint_dir is None
            else Checkpoint.from_directory(str(result.checkpoint_dir))
        )
        ray.train.report(
            result.metrics, checkpoint=checkpoint, delete_local_checkpoint_after_upload=False
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
    )
    history = trainer.fit()
    if logger is not None:
        logger.artifact(spec.run_dir / "metrics.jsonl")
        if client is not None and client.reseeds:
            logger.tag("prior_actor_reseeds", str(client.reseeds))
    return history[-1] if history else {}


def _actor_for(config: ExperimentConfig) -> tuple[Any, Any, int]:
    """The prior actor for ``config``, sized (K, d) from the dataset's test split; also the
    split's info and size."""
    test, info = load_dataset(
        config.data.name,
        "test",
        items_per_class=config.data.test_items_per_class,
        seed=config.seed,
        **config.data.dataset_kwargs(),
    )
    dim = info.shape[0] * info.shape[1] * info.shape[2]
    return create_prior_actor(config.prior, info.num_classes, dim), info, len(test)


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
    """
    if settings.num_workers > 0 and config.optim.batch_size % settings.num_workers:
        raise ConfigError(
            "optim.batch_size",
            config.optim.batch_size,
            f"a multiple of --num-workers ({settings.num_workers})",
        )
    tracking = settings.tracking
    owns_run = mlflow_run_id is None
    actor, info, test_size = _actor_for(config)
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
        logger.params(config.flat())
        logger.params({"ray.num_workers": settings.num_workers, "ray.use_gpu": settings.use_gpu})
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
    )
    resources = {"CPU": settings.cpus_per_worker, **({"GPU": 1} if settings.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": config.to_dict(), "spec": spec},
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=resources,
        ),
        torch_config=TorchConfig(backend="nccl" if settings.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage or settings.storage),
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(train_callbacks),
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        if tracking is not None and owns_run:
            RunLogger(tracking, mlflow_run_id).finish("FAILED")
        raise
    finally:
        ray.kill(actor)
    if tracking is not None:
        logger = RunLogger(tracking, mlflow_run_id)
        if result.checkpoint is not None:
            logger.tag("final_checkpoint", result.checkpoint.path)
            logger.text(f"{result.checkpoint.path}\n", "final_checkpoint.txt")
        if owns_run:
            final = find_checkpoint(settings.run_dir(run_name)) or (
                result.checkpoint.path if result.checkpoint is not None else None
            )
            if final is not None:
                log_flow_model(tracking, mlflow_run_id, final, settings.registered_model)
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
    parser.add_argument("--experiment", default="digits", choices=list(EXPERIMENTS))
    parser.add_argument("--config", dest="config_file", help="a JSON experiment config")
    parser.add_argument("--run-name", help="Ray/MLflow run name (default: the experiment name)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    experiment = "smoke" if args.smoke_test else args.experiment
    config = resolve_config(experiment, args.set, args.config_file)
    settings = RaySettings.from_args(args)
    for warning in check_before_ray([config], settings, args.address):  # before Ray starts
        log.warning(warning)
    run_name = args.run_name or config.name
    log.info(connect(args.address, verbose=args.verbose))
    progress = TrainProgress(run_name, config.optim.epochs)
    progress.listen()
    try:
        result = run_experiment(config, settings, run_name, train_callbacks=[progress])
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
        print(
            f"MLflow: mlflow ui --backend-store-uri {tracking.uri} --host 127.0.0.1 "
            f"--port 5000, then open {link}"
        )
    return 0


if __name__ == "__main__":
    from ray_jobs.train import main as _main  # run as the module, so workers import it by name

    sys.exit(run_cli(_main, prog="ray_jobs/train.py"))
