"""One experiment as a data-parallel Ray Train run, with the prior actor and MLflow logging.

    python ray_jobs/train.py                                      # digits, 1 CPU worker
    python ray_jobs/train.py --num-workers 2 --set optim.epochs=5
    python ray_jobs/train.py --experiment cifar10 --set data.root=/data/cifar10 --use-gpu \\
        --num-workers 8 --results-dir /shared/nfpi
    python ray_jobs/train.py --smoke-test                         # seconds; what CI runs

Each worker runs :class:`nfpi.train.Trainer` (the library loop) under ``torch.distributed``
(gloo on CPU, nccl on GPU) set up by Ray Train; the global batch is split across workers. Rank 0
hands the all-reduced class statistics to the prior actor, reports every epoch's metrics and
checkpoint to Ray Train (``storage_path``) and logs metrics and pictures to MLflow. Re-running
with the same ``--run-name`` and ``--results-dir`` resumes from the latest checkpoint; a lost
worker restarts the group from it (``--max-failures``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from nfpi.cli import build_config
from nfpi.config import EXPERIMENTS, ExperimentConfig
from nfpi.errors import ConfigError
from nfpi.train import EpochResult, Trainer
from ray_jobs.prior_actor import ActorPriorClient, create_prior_actor
from ray_jobs.tracking import RunLogger, Tracking, resolve_tracking, start_run

__all__ = ["connect", "final_metrics", "main", "run_experiment", "train_loop_per_worker"]

log = logging.getLogger("nfpi.ray")


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    """What every Ray Train worker runs: the library loop plus Ray reporting and MLflow."""
    config = ExperimentConfig.from_dict(loop_config["experiment"])  # parsed once, at the top
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device() if loop_config["use_gpu"] else torch.device("cpu")
    # Pictures and the local copy of each checkpoint go to a fresh worker-local directory; the
    # checkpoints that count are the ones reported to Ray Train's storage.
    workdir = tempfile.mkdtemp(prefix=f"nfpi-{loop_config['run_name']}-rank{rank}-")
    config = config.with_overrides({"output_dir": workdir})
    logger = None
    if rank == 0 and loop_config.get("tracking") is not None:
        logger = RunLogger(loop_config["tracking"], loop_config["mlflow_run_id"])
    client = (
        ActorPriorClient(loop_config["prior_actor"], loop_config["actor_timeout"])
        if rank == 0
        else None
    )

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

    callbacks = [*loop_config.get("callbacks", ()), report]
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as resume_dir:
            trainer = Trainer(
                config,
                prior_client=client,
                callbacks=callbacks,
                device=device,
                resume_from=resume_dir,
            )
            history = trainer.fit()
    else:
        trainer = Trainer(config, prior_client=client, callbacks=callbacks, device=device)
        history = trainer.fit()
    if logger is not None:
        prior_file = Path(workdir) / "prior.pt"
        torch.save(trainer.prior.state_dict(), prior_file)
        logger.artifact(prior_file, "prior")
        logger.artifact(Path(workdir) / "metrics.jsonl")
        if client is not None and client.reseeds:
            logger.tag("prior_actor_reseeds", str(client.reseeds))
    return history[-1] if history else {}


def run_experiment(
    config: ExperimentConfig,
    *,
    storage_path: str | Path,
    run_name: str,
    num_workers: int = 1,
    use_gpu: bool = False,
    tracking: Tracking | None = None,
    parent_run_id: str | None = None,
    max_failures: int = 1,
    actor_timeout: float = 600.0,
    cpus_per_worker: float = 1.0,
    train_callbacks: list[Any] | None = None,
    worker_callbacks: list[Any] | None = None,
    prior_actor: Any = None,
    mlflow_run_id: str | None = None,
) -> ray.train.Result:
    """Run one experiment on the connected Ray cluster and return Ray Train's Result.

    ``num_workers=0`` runs Train's local mode in this process (unit tests). The prior actor is
    created here (owned by this driver) unless one is passed in. ``train_callbacks`` are Ray
    Train callbacks (driver side, e.g. ``TuneReportCallback``); ``worker_callbacks`` are
    picklable ``callback(trainer, EpochResult)`` run by every worker after each epoch, before the
    report (custom logging, fault injection in tests). With ``tracking`` the run logs to a new
    MLflow run (a child of ``parent_run_id``; the earlier run of the same name and parent when
    re-launched), or to ``mlflow_run_id`` if given (left open for the caller to finish).
    """
    if num_workers > 0 and config.optim.batch_size % num_workers:
        raise ConfigError(
            "optim.batch_size",
            config.optim.batch_size,
            f"a multiple of --num-workers ({num_workers})",
        )
    storage_path = Path(storage_path).expanduser().resolve()
    owns_run = mlflow_run_id is None
    if tracking is not None:
        if owns_run:
            # A re-launched run resumes from its last checkpoint, and logs to its earlier run.
            mlflow_run_id = start_run(tracking, run_name, parent_run_id=parent_run_id, resume=True)
        logger = RunLogger(tracking, mlflow_run_id)
        logger.params(config.flat())
        logger.params({"ray.num_workers": num_workers, "ray.use_gpu": use_gpu})
    loop_config = {
        "experiment": config.to_dict(),
        "use_gpu": use_gpu,
        "run_name": run_name,
        "tracking": tracking,
        "mlflow_run_id": mlflow_run_id,
        "actor_timeout": actor_timeout,
        "prior_actor": prior_actor,  # filled in below when created here
        "callbacks": list(worker_callbacks or []),
    }
    created = None
    if prior_actor is None:
        created = _create_actor_for(config)
        loop_config["prior_actor"] = created
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=train_callbacks or [],
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        if tracking is not None and owns_run:
            RunLogger(tracking, mlflow_run_id).finish("FAILED")
        raise
    finally:
        if created is not None:
            ray.kill(created)
    if tracking is not None:
        logger = RunLogger(tracking, mlflow_run_id)
        if result.checkpoint is not None:
            logger.tag("final_checkpoint", result.checkpoint.path)
            logger.text(f"{result.checkpoint.path}\n", "final_checkpoint.txt")
        if owns_run:
            logger.finish()
    return result


def final_metrics(result: ray.train.Result) -> dict[str, float]:
    """The last epoch's metrics of a Train result; read from its checkpoint when the run had
    nothing left to do (a finished run re-launched under the same name)."""
    if result.metrics:
        return dict(result.metrics)
    if result.checkpoint is None:
        return {}
    history = torch.load(
        Path(result.checkpoint.path) / "state.pt", map_location="cpu", weights_only=False
    )["history"]
    return dict(history[-1]) if history else {}


def _create_actor_for(config: ExperimentConfig) -> Any:
    """The prior actor for ``config``, sized (K, d) from the dataset's test split."""
    from nfpi.data import load_dataset

    _, info = load_dataset(config.data.name, "test", **config.data.dataset_kwargs())
    dim = info.shape[0] * info.shape[1] * info.shape[2]
    return create_prior_actor(
        config.prior.method,
        info.num_classes,
        dim,
        fpi=config.prior.fpi,
        gd=config.prior.gd,
        covariance=config.prior.covariance,
    )


def connect(address: str | None) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``, e.g. under ``ray job submit``) or start a local
    Ray; never both."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", log_to_driver=True)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results-dir",
        default="results",
        help="root for Ray storage, the MLflow store and run files (made absolute)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
        "else sqlite:////<results-dir>/mlflow.db)",
    )
    parser.add_argument("--mlflow-experiment", default="nfpi", help="MLflow experiment name")
    parser.add_argument(
        "--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)"
    )
    parser.add_argument("--num-workers", type=int, default=1, help="data-parallel workers per run")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl backend")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--max-failures", type=int, default=1, help="worker-group restarts per run")
    parser.add_argument(
        "--actor-timeout", type=float, default=600.0, help="seconds per prior-actor call"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. prior.fpi.lam=300 (repeatable)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="digits", choices=sorted(EXPERIMENTS))
    parser.add_argument("--config", dest="config_file", help="a JSON experiment config")
    parser.add_argument("--run-name", help="Ray/MLflow run name (default: the experiment name)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny run in seconds (CI)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    results = Path(args.results_dir).expanduser().resolve()
    sets = list(args.set)
    experiment = "smoke" if args.smoke_test else args.experiment
    config = build_config(
        experiment, sets, str(results / "runs" / (args.run_name or experiment)), args.config_file
    )
    run_name = args.run_name or config.name
    tracking = resolve_tracking(results, args.tracking_uri, args.mlflow_experiment)
    connect(args.address)
    result = run_experiment(
        config,
        storage_path=results / "ray",
        run_name=run_name,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        tracking=tracking,
        max_failures=args.max_failures,
        actor_timeout=args.actor_timeout,
        cpus_per_worker=args.cpus_per_worker,
    )
    final = result.metrics or {}
    keys = ("epoch", "train_bpd", "test_bpd", "nf_acc", "prior_version")
    print("final:", {k: round(float(final[k]), 4) for k in keys if k in final})
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    print(f"MLflow: {tracking.uri} (experiment {tracking.experiment!r})")
    return 0


if __name__ == "__main__":
    from ray_jobs.train import main as _main  # run as the module, so workers import it by name

    sys.exit(_main())
