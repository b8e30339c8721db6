"""The prior as a Ray actor: :class:`nfpi.prior.PriorService` made remote, plus the client that
rank 0 of a Train run uses to talk to it.

One actor per experiment (per Tune trial), owned by the driver that starts the Train run (not
detached), ``num_cpus=0``: it only solves a K x d fixed point now and then. Ray restarts it if it
dies (``max_restarts``), but a restarted actor re-runs ``__init__`` and has lost its state; the
client notices (the version it gets back is not the one it expects) and re-seeds it from the last
service state it saw, which is also the state in the last Train checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from nfpi.config import PriorConfig
from nfpi.errors import NfpiError
from nfpi.prior import ClassStatistics, PriorService, PriorUpdate

__all__ = ["ActorPriorClient", "PriorActorTimeoutError", "create_prior_actor"]

log = logging.getLogger(__name__)


class PriorActorTimeoutError(NfpiError, TimeoutError):
    """The prior actor did not answer in time (dead node, overloaded cluster, deadlock)."""


def create_prior_actor(
    config: PriorConfig,
    num_classes: int,
    dim: int,
    *,
    max_restarts: int = 3,
    node_id: str | None = None,
) -> ray.actor.ActorHandle:
    """Start the PriorService actor of an experiment's prior section (K classes, d dims), on
    node ``node_id`` if given (hard affinity: it restarts there, and fails with that node)."""
    placement = (
        {}
        if node_id is None
        else {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
    )
    remote = ray.remote(
        num_cpus=0, max_restarts=max_restarts, max_task_retries=max_restarts, **placement
    )(PriorService)
    return remote.remote(
        config.method,
        num_classes,
        dim,
        objective=config.objective_for(),
        fpi=config.fpi,
        gd=config.gd,
        covariance=config.covariance,
    )


class ActorPriorClient:
    """The :class:`nfpi.training.PriorClient` of rank 0: every call has a timeout, and a restarted
    (state-less) actor is re-seeded before its answer is used.

    Args:
        actor: handle from :func:`create_prior_actor`.
        timeout_s: seconds to wait for any call (an FPI solve at K = 1000 takes seconds).
    """

    def __init__(self, actor: ray.actor.ActorHandle, timeout_s: float = 600.0) -> None:
        self.actor, self.timeout_s = actor, timeout_s
        self._state: dict[str, Any] | None = None  # last known service state
        self.reseeds = 0

    def _get(self, ref: ray.ObjectRef, what: str) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except GetTimeoutError as err:
            raise PriorActorTimeoutError(
                f"the prior actor did not answer {what} within {self.timeout_s:.0f} s; check that "
                "the actor's node is alive (ray status) or raise the timeout (--actor-timeout)"
            ) from err

    def _version(self) -> int:
        return int(self._get(self.actor.state_dict.remote(), "state_dict")["version"])

    def _reseed_if_needed(self) -> None:
        if self._state is not None and self._version() != self._state["version"]:
            log.warning(
                "prior actor restarted (state lost): re-seeding it at version %d",
                self._state["version"],
            )
            self._get(self.actor.load_state_dict.remote(self._state), "load_state_dict")
            self.reseeds += 1

    def _call(self, method: str, stats: ClassStatistics) -> PriorUpdate:
        expected = (self._state["version"] if self._state is not None else 0) + 1
        for _ in range(3):
            self._reseed_if_needed()
            try:
                update = self._get(getattr(self.actor, method).remote(stats), method)
            except RayActorError:
                continue  # died mid-call; Ray restarts it, we re-seed and retry
            if update.version == expected:
                self._state = self._get(self.actor.state_dict.remote(), "state_dict")
                return update
            # The call ran on a freshly restarted actor: its answer is not the next version.
            log.warning(
                "prior actor answered v%d, expected v%d: retrying", update.version, expected
            )
        raise PriorActorTimeoutError(
            f"the prior actor could not complete {method} after 3 attempts (expected prior "
            f"version {expected}); it keeps restarting or answering from another run's state: "
            "check its logs (ray logs actor) and that no other run shares it"
        )

    def initialize(self, stats: ClassStatistics) -> PriorUpdate:
        # A run starting from scratch (also a restart before its first checkpoint registered)
        # begins with a fresh service, whatever an earlier attempt left in the actor.
        self._get(self.actor.reset.remote(), "reset")
        self._state = None
        return self._call("initialize", stats)

    def update(self, stats: ClassStatistics) -> PriorUpdate:
        return self._call("update", stats)

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:
            self._state = self._get(self.actor.state_dict.remote(), "state_dict")
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state
        self._get(self.actor.load_state_dict.remote(state), "load_state_dict")
