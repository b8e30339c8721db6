"""The prior as a Ray actor: :class:`nfpi.prior.PriorService` made remote, plus the client that
rank 0 of a Train run uses to talk to it.

One actor per experiment (per Tune trial), owned by the driver that starts the Train run (not
detached), ``num_cpus=0``: it only solves a K x d fixed point now and then. Ray restarts it if it
dies (``max_restarts``), but a restarted actor re-runs ``__init__`` and has lost its state; the
client notices (the version it gets back is not the one it expects) and re-seeds it from the last
service state it saw, which is also the state in the last Train checkpoint.

A hung actor (a call that never returns blocks every later call in its queue) is not waited on
again: on a call timeout, or when the actor is lost for good (e.g. replaced by an earlier attempt
of the same run), the client kills it, starts a fresh one from its factory
(:func:`prior_actor_factory`), re-seeds it from the last state it saw and retries the call, up
to ``max_replacements`` times per call. A replacement is owned by the worker that started it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from nfpi.config import PriorConfig
from nfpi.errors import NfpiError
from nfpi.prior import ClassStatistics, PriorService, PriorUpdate

__all__ = [
    "ActorPriorClient",
    "PriorActorTimeoutError",
    "create_prior_actor",
    "prior_actor_factory",
]

log = logging.getLogger(__name__)


class PriorActorTimeoutError(NfpiError, TimeoutError):
    """The prior actor did not answer in time (dead node, overloaded cluster, deadlock)."""

    retryable = True  # a fault of the cluster, not of the run: a restarted group may succeed


def create_prior_actor(
    config: PriorConfig, num_classes: int, dim: int, *, max_restarts: int = 3
) -> ray.actor.ActorHandle:
    """Start the PriorService actor of an experiment's prior section (K classes, d dims)."""
    remote = ray.remote(num_cpus=0, max_restarts=max_restarts, max_task_retries=max_restarts)(
        PriorService
    )
    return remote.remote(
        config.method,
        num_classes,
        dim,
        objective=config.objective_for(),
        fpi=config.fpi,
        gd=config.gd,
        covariance=config.covariance,
    )


def prior_actor_factory(
    config: PriorConfig, num_classes: int, dim: int
) -> Callable[[], ray.actor.ActorHandle]:
    """A picklable function starting a fresh actor like :func:`create_prior_actor` (what the
    client calls to replace a hung or lost actor; it travels to the Train workers)."""
    return functools.partial(create_prior_actor, config, num_classes, dim)


class ActorPriorClient:
    """The :class:`nfpi.training.PriorClient` of rank 0: every call has a timeout, a restarted
    (state-less) actor is re-seeded before its answer is used, and a hung or dead actor is
    replaced by a fresh one (re-seeded) when a ``factory`` is given.

    Args:
        actor: handle from :func:`create_prior_actor`.
        timeout_s: seconds to wait for any call (an FPI solve at K = 1000 takes seconds).
        factory: starts a replacement actor (:func:`prior_actor_factory`); ``None``: a timeout
            is an error at once.
        max_replacements: replacements per call before :class:`PriorActorTimeoutError`.
        start_timeout_s: seconds a fresh actor may take to come up (process start, imports).
    """

    def __init__(
        self,
        actor: ray.actor.ActorHandle,
        timeout_s: float = 600.0,
        *,
        factory: Callable[[], ray.actor.ActorHandle] | None = None,
        max_replacements: int = 2,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.actor, self.timeout_s, self.factory = actor, timeout_s, factory
        self.max_replacements, self.start_timeout_s = max_replacements, start_timeout_s
        self._state: dict[str, Any] | None = None  # last known service state
        self.reseeds = 0  # restarts by Ray noticed (state lost, re-seeded)
        self.replacements = 0  # hung or dead actors killed and replaced by this client

    def _ask(self, method: str, *args: Any) -> Any:
        """``actor.method(*args)`` within the timeout; a hung or permanently dead actor is
        replaced (then re-seeded) and the call retried."""
        for attempt in range(self.max_replacements + 1):
            ref = getattr(self.actor, method).remote(*args)
            try:
                return ray.get(ref, timeout=self.timeout_s)
            except GetTimeoutError as err:
                reason, error = f"did not answer {method} within {self.timeout_s:.0f} s", err
            except RayActorError as err:
                if self.factory is None:
                    raise  # Ray may restart it: the caller re-seeds and retries
                # Ray retries a call on a restarted actor by itself (max_task_retries): an error
                # here means the actor is gone for good (killed, out of restarts, node lost).
                reason, error = f"is lost ({type(err).__name__})", err
            if self.factory is None or attempt == self.max_replacements:
                raise PriorActorTimeoutError(
                    f"the prior actor {reason}; check that the actor's node is alive (ray "
                    "status) and its logs (ray logs actor), or raise the timeout "
                    "(--actor-timeout)"
                ) from error
            self._replace(reason)
        raise AssertionError("unreachable")

    def _replace(self, reason: str) -> None:
        """Kill the current actor (its queue may be blocked by the hung call), start a fresh
        one and re-seed it from the last state this client saw."""
        log.warning("prior actor %s: killing it and starting a fresh one", reason)
        ray.kill(self.actor, no_restart=True)
        assert self.factory is not None
        self.actor = self.factory()
        # Bringing it up (process start, imports, first call) may take longer than a call.
        ray.get(self.actor.state_dict.remote(), timeout=self.start_timeout_s)
        if self._state is not None:
            ray.get(self.actor.load_state_dict.remote(self._state), timeout=self.start_timeout_s)
        self.replacements += 1

    def _version(self) -> int:
        return int(self._ask("state_dict")["version"])

    def _reseed_if_needed(self) -> None:
        if self._state is not None and self._version() != self._state["version"]:
            log.warning(
                "prior actor restarted (state lost): re-seeding it at version %d",
                self._state["version"],
            )
            self._ask("load_state_dict", self._state)
            self.reseeds += 1

    def _call(self, method: str, stats: ClassStatistics) -> PriorUpdate:
        expected = (self._state["version"] if self._state is not None else 0) + 1
        for _ in range(3):
            try:
                self._reseed_if_needed()
                update = self._ask(method, stats)
            except RayActorError:
                continue  # died mid-call; Ray restarts it, we re-seed and retry
            if update.version == expected:
                self._state = self._ask("state_dict")
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
        self._state = None
        self._ask("reset")
        return self._call("initialize", stats)

    def update(self, stats: ClassStatistics) -> PriorUpdate:
        return self._call("update", stats)

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:
            self._state = self._ask("state_dict")
        return self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = state
        self._ask("load_state_dict", state)
