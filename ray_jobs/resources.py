"""What a sweep's trial reserves, and how many trials run at once on the cluster as it is now.

A Tune trial of this project is a driver (the Tune function that owns the prior actor and starts
the Train run; it reserves memory, no CPU) plus the Train run's workers, which Ray Train V2 places in a
placement group of its own (``resources_per_worker`` x ``num_workers``), outside the trial's.
Tune therefore only sees the driver: left alone it would start every trial at once, and the
Train runs that do not fit wait for their workers, failing with Train's startup timeout every
60 s. The driver sleeps in ``trainer.fit()``, so it reserves memory, not CPU: with a token CPU
share two 1-worker trials needed 2 x (1 + 0.01) = 2.02 CPUs, and a 2-core machine ran one trial
at a time with one core idle.

:class:`ClusterConcurrency` starts a trial only when its whole :class:`TrialFootprint` fits on
the cluster's alive nodes next to the trials already running (driver and worker bundles packed
node by node, GPUs counted), recomputed whenever Tune asks for the next trial: when an
autoscaling cluster adds nodes, more trials start. On such a cluster :func:`request_capacity`
asks the autoscaler for the sweep's whole footprint up front (and releases the request at the
end), so that the nodes are added without waiting for a pending trial to ask for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import ray
from ray.tune.search.basic_variant import BasicVariantGenerator

from ray_jobs._ray_compat import cluster_max_resources
from ray_jobs.settings import RaySettings

__all__ = [
    "DRIVER_MEMORY",
    "ClusterConcurrency",
    "TrialFootprint",
    "alive_node_resources",
    "request_capacity",
    "trials_that_fit",
]

log = logging.getLogger("nfpi.sweep")

# What the trial driver reserves: no CPU (it sleeps in ``trainer.fit()`` while the workers
# compute), some memory (a Ray placement-group bundle cannot be empty; the driver process does
# hold torch, MLflow and the run's bookkeeping).
DRIVER_MEMORY = 256 * 1024**2
# Resources a placement-group bundle may request that Ray reports per node.
_KEYS = ("CPU", "GPU", "memory")


@dataclass(frozen=True)
class TrialFootprint:
    """The resources one trial holds while it runs: its driver's bundle and its Train workers'
    bundles (``num_workers`` of ``worker``)."""

    driver: Mapping[str, float]
    worker: Mapping[str, float]
    num_workers: int

    @classmethod
    def of(cls, settings: RaySettings) -> TrialFootprint:
        worker = {"CPU": settings.cpus_per_worker, **({"GPU": 1.0} if settings.use_gpu else {})}
        return cls({"memory": DRIVER_MEMORY}, worker, max(settings.num_workers, 1))

    def bundles(self) -> list[dict[str, float]]:
        """The driver's bundle, then one per worker."""
        return [dict(self.driver)] + [dict(self.worker)] * self.num_workers

    def describe(self) -> str:
        per = ", ".join(f"{v:g} {k}" for k, v in self.worker.items())
        driver = ", ".join(
            f"{v / 1024**2:g} MiB memory" if k == "memory" else f"{v:g} {k}"
            for k, v in self.driver.items()
        )
        return f"{self.num_workers} worker(s) x ({per}) + driver ({driver})"


def _fits(free: dict[str, float], bundle: Mapping[str, float]) -> bool:
    # A tolerance for float sums such as 2 - 0.01 - 0.99.
    return all(free.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items() if v > 0)


def trials_that_fit(
    nodes: Iterable[Mapping[str, float]], footprint: TrialFootprint, limit: int | None = None
) -> int:
    """How many trials of ``footprint`` fit on ``nodes`` (each a node's total resources) at
    once: bundles packed first-fit, the largest node first, each bundle on one node (a worker
    needs its CPU and its GPU on the same machine), at most ``limit``."""
    free = sorted(
        ({k: float(v) for k, v in n.items()} for n in nodes),
        key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)),
        reverse=True,
    )
    count = 0
    while limit is None or count < limit:
        trial = [dict(f) for f in free]
        for bundle in footprint.bundles():
            node = next((n for n in trial if _fits(n, bundle)), None)
            if node is None:
                return count
            for k, v in bundle.items():
                node[k] = node.get(k, 0.0) - v
        free, count = trial, count + 1
    return count


def alive_node_resources() -> list[dict[str, float]]:
    """The total resources of every alive node of the connected cluster."""
    return [
        {k: float(v) for k, v in node["Resources"].items() if k in _KEYS}
        for node in ray.nodes()
        if node.get("Alive")
    ]


class ClusterConcurrency(BasicVariantGenerator):
    """Tune's default search algorithm (grid and random sampling), starting a trial only while
    the trials running and the new one fit the cluster as it is now (:func:`trials_that_fit`),
    never fewer than one at a time, at most ``cap`` (``--max-concurrent``).

    Args:
        footprint: what each trial holds.
        cap: an upper bound on parallel trials (``None``: what fits).
        nodes: where node resources come from (default: the connected cluster's alive nodes).
        refresh_s: how long a computed limit is reused before the nodes are read again (Tune
            asks for the next trial on every step of its loop).
    """

    def __init__(
        self,
        footprint: TrialFootprint,
        cap: int | None = None,
        nodes: Callable[[], list[dict[str, float]]] | None = None,
        refresh_s: float = 5.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.footprint, self.cap, self.refresh_s = footprint, cap, refresh_s
        self._nodes = nodes
        self._limit, self._checked = 1, -float("inf")

    @property
    def max_concurrent(self) -> int:  # read by BasicVariantGenerator.next_trial
        now = time.monotonic()
        if now - self._checked >= self.refresh_s:
            nodes = (self._nodes or alive_node_resources)()
            limit = max(1, trials_that_fit(nodes, self.footprint, self.cap))
            if limit != self._limit:
                log.debug("trials at once: %d (cluster: %s)", limit, nodes)
            self._limit, self._checked = limit, now
        return self._limit

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:  # BasicVariantGenerator.__init__ sets it
        pass


def request_capacity(footprint: TrialFootprint, trials: int) -> bool:
    """Ask an autoscaling cluster for room for ``trials`` trials at once (no-op elsewhere);
    returns whether a request was made (release it with :func:`release_capacity`)."""
    if cluster_max_resources() is None:
        return False  # no autoscaler (a local Ray, a fixed cluster)
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=footprint.bundles() * trials)
    return True


def release_capacity() -> None:
    """Withdraw :func:`request_capacity`'s request (the autoscaler may scale down again)."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[])
