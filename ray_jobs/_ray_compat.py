"""Every use of Ray's private modules, in one place.

Ray promises nothing about ``ray.train.v2._internal``, ``ray.autoscaler._private`` or
``ray._private``: any release may move or rename what is there. The service, the rehearsals and
the tests reach them only through this module, and ``tests/ray_jobs/test_ray_compat.py`` checks
every name in :data:`PRIVATE` (and the callback hooks the service overrides) against the
installed Ray, naming its version when one is gone. Where Ray 2.60 offers a public API it is
used instead (``ray.util.get_node_ip_address``, ``ray.autoscaler.sdk.request_resources``); its
public ``ray.train.UserCallback`` has no hook that can stop a retry, hence the private callbacks.

What stays private, and why:

- Ray Train's controller callbacks and ``FailureDecision``: the only way to end a run at once on
  a deterministic worker error instead of retrying it ``max_failures`` times
  (``ray_jobs.train.StopOnDeterministicError``).
- ``fillout_defaults`` / ``validate_config``: validate ``cluster.yaml`` offline, as ``ray up``
  does (no credentials needed).
- ``FAKE_HEAD_NODE_ID``: the fake multi-node provider's head node (the autoscaler rehearsal).
- ``ray._private.utils.write_ray_address``: ``ray.cluster_utils.Cluster`` records its address as
  the machine's default cluster; the rehearsals keep that file untouched.
- ``ray._private.utils.get_num_cpus``: the CPUs a local Ray gets (cgroup limits honoured).
- ``ray._private.worker._global_node``: the session's log folder (a hint in a log line).
- ``ray._private.state``: whether the cluster has an autoscaler (its cluster config's limits).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from typing import Any
from unittest import mock

import ray

try:
    from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
except ImportError as err:  # pragma: no cover - a Ray release that moved them
    raise ImportError(
        f"Ray {ray.__version__} moved Ray Train's private controller callbacks ({err}); "
        "ray_jobs/_ray_compat.py was written against Ray 2.60: update its imports"
    ) from err

__all__ = [
    "HOOKS",
    "PRIVATE",
    "ControllerCallback",
    "FailureDecision",
    "WorkerGroupCallback",
    "cluster_max_resources",
    "fake_head_node_id",
    "fillout_defaults",
    "keep_default_cluster_file",
    "local_cpus",
    "missing",
    "session_logs",
    "user_exception_type",
    "validate_config",
]

#: Every private module this project uses and the names it takes from each.
PRIVATE: dict[str, tuple[str, ...]] = {
    "ray.train.v2._internal.execution.callback": ("ControllerCallback", "WorkerGroupCallback"),
    "ray.train.v2._internal.execution.failure_handling": ("FailureDecision",),
    "ray.train.v2._internal.exceptions": ("UserExceptionWithTraceback",),
    "ray.autoscaler._private.util": ("fillout_defaults", "validate_config"),
    "ray.autoscaler._private.fake_multi_node.node_provider": ("FAKE_HEAD_NODE_ID",),
    "ray._private.utils": ("get_num_cpus", "write_ray_address"),
    "ray._private.worker": ("_global_node",),
    "ray._private.state": ("state",),
}
#: Methods of private classes that the service overrides or calls: a renamed hook would never
#: be called, silently, so they are checked too.
HOOKS: dict[str, tuple[str, ...]] = {
    "ray.train.v2._internal.execution.callback.WorkerGroupCallback": (
        "after_worker_group_poll_status",
    ),
    "ray.train.v2._internal.execution.callback.ControllerCallback": (
        "before_controller_execute_failure_decision",
    ),
    "ray.train.v2._internal.execution.failure_handling.FailureDecision": ("RETRY",),
    "ray._private.state.state": ("get_max_resources_from_cluster_config",),
}


def missing() -> list[str]:
    """The names of :data:`PRIVATE` and :data:`HOOKS` that the installed Ray lacks (``[]``: all
    present), each as ``module.name``."""
    gone = []
    for module_name, names in PRIVATE.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            gone += [f"{module_name}.{n}" for n in names]
            continue
        gone += [f"{module_name}.{n}" for n in names if not hasattr(module, n)]
    for owner, attributes in HOOKS.items():
        module_name, _, name = owner.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError):
            continue  # reported above
        gone += [f"{owner}.{a}" for a in attributes if not hasattr(obj, a)]
    return gone


def user_exception_type() -> type[BaseException]:
    """Ray Train's wrapper of a worker's exception (``_base_exc`` holds the original)."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    return UserExceptionWithTraceback


def fillout_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A cluster config with Ray's defaults filled in, as ``ray up`` reads it."""
    from ray.autoscaler._private.util import fillout_defaults as fill

    return fill(config)


def validate_config(config: dict[str, Any]) -> None:
    """Ray's schema check of a cluster config (raises on an invalid one)."""
    from ray.autoscaler._private.util import validate_config as validate

    validate(config)


def fake_head_node_id() -> str:
    """The node id the fake multi-node provider gives its head."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID

    return FAKE_HEAD_NODE_ID


@contextlib.contextmanager
def keep_default_cluster_file() -> Iterator[None]:
    """Within: ``ray.cluster_utils.Cluster`` does not record its address as this machine's
    default cluster (``/tmp/ray``), where any other process's ``ray.init()`` would attach."""
    with mock.patch("ray._private.utils.write_ray_address"):
        yield


def local_cpus() -> int:
    """The CPUs a local Ray gets on this machine (its own count, which honours cgroup limits;
    the affinity mask if that moved)."""
    try:
        from ray._private.utils import get_num_cpus

        return int(get_num_cpus())
    except (ImportError, AttributeError):
        return len(os.sched_getaffinity(0))


def session_logs() -> str | None:
    """The connected Ray session's log folder on this node, or ``None`` (only a hint)."""
    node = getattr(getattr(ray._private, "worker", None), "_global_node", None)
    try:
        return os.path.join(node.get_session_dir_path(), "logs") if node is not None else None
    except Exception:  # noqa: BLE001 - only a hint in a log line
        return None


def cluster_max_resources() -> dict[str, int] | None:
    """The resource limits of the connected cluster's autoscaler config (``None``: no
    autoscaler: a local Ray, a fixed cluster)."""
    from ray._private.state import state

    return state.get_max_resources_from_cluster_config()
