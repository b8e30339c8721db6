"""How the Ray entry points use the cluster and where they write: one frozen object.

``RaySettings`` replaces the loose keyword arguments and dicts that used to travel between the
command line, the sweep driver, each trial and each Train worker. It is picklable (Ray ships it to
trials and workers) and every path in it is absolute (workers, trials and jobs run in other
directories).

Layout of a results directory::

    results/
      mlflow.db, mlartifacts/     the MLflow store (unless a tracking URI is given)
      ray/                        Ray Train / Tune storage (registered checkpoints, Tune state)
      runs/<run name>/            a run's files: config.json, metrics.jsonl, plots/, checkpoints/
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import ray

from nfpi.errors import ConfigError
from ray_jobs.tracking import Tracking, resolve_tracking

__all__ = [
    "PLACEMENT_STRATEGIES",
    "PRIOR_ACTOR_NODES",
    "PlacementStrategy",
    "PriorActorNode",
    "RaySettings",
    "add_common_args",
    "connect",
]

# Ray placement-group strategies for a run's Train workers (one bundle per worker).
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
PLACEMENT_STRATEGIES: tuple[str, ...] = get_args(PlacementStrategy)
# Where a run's prior actor lives: the driver's node (on a cluster, the head node that runs
# `ray job submit`'s entrypoint) or wherever Ray finds room.
PriorActorNode = Literal["driver", "any"]
PRIOR_ACTOR_NODES: tuple[str, ...] = get_args(PriorActorNode)


@dataclass(frozen=True)
class RaySettings:
    """Cluster use and output locations of a run or sweep.

    Attributes:
        results_dir: root of everything written (absolute).
        tracking: the MLflow store, or None to log nothing.
        num_workers: data-parallel Train workers per run (0: Train's local mode, tests only).
        use_gpu: one GPU per worker (nccl).
        cpus_per_worker: CPUs each worker reserves.
        max_failures: worker-group restarts per run. The worker count is fixed: a group that
            lost a worker (or its node) restarts with ``num_workers`` workers from the last
            checkpoint, on whatever nodes have room (it waits for the autoscaler otherwise).
        actor_timeout: seconds to wait for any prior-actor call.
        placement_strategy: Ray placement-group strategy of the Train workers: ``PACK`` (fill a
            node first; the default), ``SPREAD`` (one worker per node where possible, e.g. one
            per GPU node), ``STRICT_PACK`` / ``STRICT_SPREAD`` (fail to schedule otherwise: a
            strict spread cannot restart on fewer nodes than workers).
        prior_actor_node: ``driver`` pins the prior actor to the driver's node (on a cluster the
            head, where ``ray job submit`` runs the entrypoint; the Train controller lives
            there too); ``any`` lets Ray place it.
    """

    results_dir: Path
    tracking: Tracking | None = None
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    actor_timeout: float = 600.0
    placement_strategy: PlacementStrategy = "PACK"
    prior_actor_node: PriorActorNode = "driver"

    def __post_init__(self) -> None:
        object.__setattr__(self, "results_dir", Path(self.results_dir).expanduser().resolve())
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(
                "placement_strategy", self.placement_strategy, f"one of {PLACEMENT_STRATEGIES}"
            )
        if self.prior_actor_node not in PRIOR_ACTOR_NODES:
            raise ConfigError(
                "prior_actor_node", self.prior_actor_node, f"one of {PRIOR_ACTOR_NODES}"
            )

    @property
    def storage(self) -> Path:
        """Ray Train / Tune storage."""
        return self.results_dir / "ray"

    def run_dir(self, run_name: str) -> Path:
        """Where a run's own files go."""
        return self.results_dir / "runs" / run_name

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RaySettings:
        results = Path(args.results_dir).expanduser().resolve()
        return cls(
            results_dir=results,
            tracking=resolve_tracking(results, args.tracking_uri, args.mlflow_experiment),
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            cpus_per_worker=args.cpus_per_worker,
            max_failures=args.max_failures,
            actor_timeout=args.actor_timeout,
            placement_strategy=args.placement_strategy,
            prior_actor_node=args.prior_actor_node,
        )


def connect(address: str | None) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``, e.g. under ``ray job submit``) or start a local
    Ray; never both."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", log_to_driver=True)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags ``ray_jobs/train.py`` and ``ray_jobs/sweep.py`` share."""
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
        "--placement-strategy",
        default="PACK",
        choices=PLACEMENT_STRATEGIES,
        help="placement of a run's Train workers: PACK fills a node first, SPREAD puts them on "
        "different nodes where possible",
    )
    parser.add_argument(
        "--prior-actor-node",
        default="driver",
        choices=PRIOR_ACTOR_NODES,
        help="pin each run's prior actor to the driver's node (the head under ray job submit), "
        "or let Ray place it",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. prior.objective.lam=300 (repeatable)",
    )
    parser.add_argument(
        "--smoke-test", action="store_true", help="a tiny run in seconds (what CI runs)"
    )
