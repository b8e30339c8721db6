"""cluster.yaml's autoscaling rehearsed on one machine with Ray's fake multi-node provider.

    python rehearsals/autoscaler.py --out autoscaler.json

What runs (``ray.autoscaler._private.fake_multi_node``, the provider Ray's own autoscaler tests
use: "nodes" are raylets started on this machine by the autoscaler):

1. ``cluster.yaml`` is filled out and validated with Ray's schema, and every setup and start
   command is parsed by ``bash -n`` (syntax only: running them needs the AWS nodes).
2. Its node types become a ``fake_multinode`` config: the head type (as the provider's
   ``ray.head.default``) and ``gpu_worker`` with their ``resources`` (the GPU is a logical
   resource: no device), ``min_workers``/``max_workers`` (capped by ``--max-workers``),
   ``upscaling_speed``; ``idle_timeout_minutes`` shortened to ``--idle-timeout-min``. Setup
   commands and file mounts are left out: the fake provider starts its nodes up to date and
   would otherwise try to reach them over SSH.
3. A head node starts with the autoscaler (Ray's monitor process) reading that config; with
   ``min_workers: 0`` it starts alone.
4. The demand of a 2-worker GPU run spread over nodes (``--use-gpu --num-workers 2
   --placement-strategy SPREAD``: a placement group of 2 x {CPU: 1, GPU: 1}, SPREAD) is
   pending until the autoscaler has launched ``gpu_worker`` nodes; a task in each bundle then
   reports its node and node type.
5. The placement group removed, the autoscaler terminates the idle ``gpu_worker`` nodes after
   the idle timeout and the cluster is back to its head.

Checks (exit status 1 if any fails, each named): the config validates, every command parses,
only the head before the demand, the bundles on distinct ``gpu_worker`` nodes, no more workers
than ``max_workers``, back to the head alone afterwards. The cluster is private (its own
temporary directory and GCS port; this machine's default cluster address is left alone) and
every process of it is ended, by process id, before the script returns.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from ray_jobs._ray_compat import (
    fake_head_node_id,
    fillout_defaults,
    keep_default_cluster_file,
    validate_config,
)
from rehearsals.multinode import end_processes, report_checks

__all__ = ["check_commands", "fake_config", "main", "rehearse"]

log = logging.getLogger("nfpi.rehearsal")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"
COMMAND_KEYS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
FAKE_HEAD = "ray.head.default"  # the fake provider's head node type


def check_commands(cluster: dict[str, Any]) -> list[str]:
    """``bash -n`` over every setup and start command of a cluster config; the failures."""
    errors = []
    for key in COMMAND_KEYS:
        for i, command in enumerate(cluster.get(key) or []):
            proc = subprocess.run(
                ["bash", "-n", "-c", command], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                errors.append(f"{key}[{i}] does not parse: {proc.stderr.strip()}")
    return errors


def fake_config(
    cluster: dict[str, Any], gcs_address: str, *, max_workers: int, idle_timeout_min: float
) -> dict[str, Any]:
    """``cluster`` (a filled-out cluster.yaml) as a ``fake_multinode`` autoscaler config."""
    out = copy.deepcopy(cluster)
    types = out["available_node_types"]
    head = types.pop(out["head_node_type"])
    workers = {}
    for name, spec in types.items():
        workers[name] = {
            "resources": dict(spec["resources"]),
            "node_config": {},
            "min_workers": int(spec.get("min_workers", 0)),
            "max_workers": min(int(spec.get("max_workers", 0)), max_workers),
        }
    workers[FAKE_HEAD] = {"resources": {}, "node_config": {}, "max_workers": 0}
    out.update(
        {
            # As Ray's own fake-cluster config: nodes are told apart by node id (they share
            # one IP), and nothing is set up over SSH (no node updaters).
            "provider": {
                "type": "fake_multinode",
                "gcs_address": gcs_address,
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": workers,
            "head_node_type": FAKE_HEAD,
            "max_workers": min(int(cluster["max_workers"]), max_workers),
            "idle_timeout_minutes": idle_timeout_min,
            "auth": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "rsync_exclude": [],
            "rsync_filter": [],
            **{key: [] for key in COMMAND_KEYS},
        }
    )
    out["_head_resources"] = dict(head["resources"])  # what the real head advertises
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive_workers(head_id: str) -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != head_id]


def _poll(what: str, done: Any, timeout_s: float, errors: list[str]) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            errors.append(f"timed out after {timeout_s:.0f} s waiting for {what}")
            return False
        time.sleep(1.0)
    return True


def _where(_: int) -> dict[str, Any]:
    import ray

    return {
        "node": ray.get_runtime_context().get_node_id(),
        "node_type": os.environ.get("RAY_NODE_TYPE_NAME"),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


def _start_head(
    cluster: dict[str, Any], folder: Path, max_workers: int, idle_timeout_min: float
) -> tuple[Any, dict[str, Any]]:
    """The head node (and Ray's autoscaler on it) of the fake cluster made from ``cluster``."""
    import ray
    from ray.cluster_utils import Cluster

    folder.mkdir(parents=True)
    port = _free_port()
    gcs = f"{ray.util.get_node_ip_address()}:{port}"
    config = fake_config(cluster, gcs, max_workers=max_workers, idle_timeout_min=idle_timeout_min)
    head_resources = config.pop("_head_resources")
    config_path = folder / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config))
    # What ray.cluster_utils.AutoscalingCluster gives its head (which also runs `ray stop
    # --force`, ending every Ray on the machine: not used here).
    env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    # Cluster() records its address as this machine's default cluster (/tmp/ray), where any
    # other process's ray.init() would then attach: keep that file untouched.
    with mock.patch.dict(os.environ, env), keep_default_cluster_file():
        head = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": int(head_resources.get("CPU", 1)),
                "gcs_server_port": port,
                "autoscaling_config": str(config_path),
                "temp_dir": str(folder),
                "object_store_memory": 100 * 1024**2,
                "include_dashboard": False,
                # The head is the provider's node FAKE_HEAD_NODE_ID (as in Ray's tests).
                "env_vars": {"RAY_OVERRIDE_NODE_ID_FOR_TESTING": fake_head_node_id()},
            },
        )
    return head, config


def rehearse(
    *, max_workers: int, idle_timeout_min: float, timeout_s: float
) -> tuple[dict[str, Any], list[str]]:
    """Steps 1-5 of the module docstring; returns the record and the failed checks."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    errors: list[str] = []
    cluster = fillout_defaults(yaml.safe_load(CLUSTER.read_text()))
    validate_config(cluster)
    errors += check_commands(cluster)
    temp_dir = tempfile.mkdtemp(prefix="nfpi-as-", dir="/tmp")  # short: unix socket paths
    record: dict[str, Any] = {
        "idle_timeout_minutes": idle_timeout_min,
        "commands_checked": sum(len(cluster.get(k) or []) for k in COMMAND_KEYS),
    }
    os.environ.pop("RAY_ADDRESS", None)
    head = None
    t0 = time.perf_counter()
    try:
        # A head starting on a loaded machine can miss Ray's fixed 30 s raylet registration
        # window ("The current node timed out during startup"): up to 3 attempts, each on a
        # fresh port and folder, what is left of a failed one ended first.
        for attempt in range(3):
            try:
                head, config = _start_head(
                    cluster, Path(temp_dir) / f"try{attempt}", max_workers, idle_timeout_min
                )
                break
            except Exception as err:  # Ray raises a bare Exception on this timeout
                log.warning("head start failed (attempt %d): %s", attempt + 1, err)
                end_processes(temp_dir)
                if attempt == 2:
                    raise
        record["node_types"] = {
            k: v["resources"] for k, v in config["available_node_types"].items()
        }
        record["max_workers"] = config["max_workers"]
        record["head_attempts"] = attempt + 1
        ray.init(address=head.address, log_to_driver=False)
        head_id = head.head_node.node_id
        record["workers_before"] = len(_alive_workers(head_id))
        if record["workers_before"]:
            errors.append(f"{record['workers_before']} worker nodes before any demand")
        pg = placement_group([{"CPU": 1, "GPU": 1}] * 2, strategy="SPREAD")
        t1 = time.perf_counter()
        try:
            ray.get(pg.ready(), timeout=timeout_s)
            placed_pg = True
        except ray.exceptions.GetTimeoutError:
            placed_pg = False
            errors.append(f"the autoscaler did not place 2 GPU bundles within {timeout_s:.0f} s")
        record["scale_up_s"] = round(time.perf_counter() - t1, 1)
        workers = _alive_workers(head_id)
        record["workers_launched"] = len(workers)
        record["worker_resources"] = [
            {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")} for n in workers
        ]
        # From pg.ready() above: pg.wait(0) right after it sometimes said "not ready", and the
        # bundle checks were skipped with no error (a PASS that checked nothing).
        if placed_pg:
            task = ray.remote(num_cpus=1, num_gpus=1)(_where)
            placed = ray.get(
                [
                    task.options(
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            pg, placement_group_bundle_index=i
                        )
                    ).remote(i)
                    for i in range(2)
                ],
                timeout=timeout_s,
            )
            record["bundles"] = placed
            if len({p["node"] for p in placed}) != 2:
                errors.append(f"the 2 bundles are not on distinct nodes: {placed}")
            if {p["node_type"] for p in placed} != {"gpu_worker"}:
                errors.append(f"bundles ran on node types {[p['node_type'] for p in placed]}")
            if head_id in {p["node"] for p in placed}:
                errors.append("a GPU bundle ran on the head (it has no GPU)")
        if record["workers_launched"] > config["max_workers"]:
            errors.append(f"{record['workers_launched']} workers > max_workers")
        remove_placement_group(pg)
        t1 = time.perf_counter()
        _poll(
            "the idle workers' termination", lambda: not _alive_workers(head_id), timeout_s, errors
        )
        record["scale_down_s"] = round(time.perf_counter() - t1, 1)
        record["workers_after"] = len(_alive_workers(head_id))
    finally:
        ray.shutdown()
        if head is not None:
            head.shutdown()
        end_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    record["wall_s"] = round(time.perf_counter() - t0, 1)
    return record, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-workers", type=int, default=2, help="cap of gpu_worker nodes")
    parser.add_argument(
        "--idle-timeout-min", type=float, default=0.1, help="idle minutes before scale-down"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per wait")
    parser.add_argument("--out", metavar="PATH", help="write the record as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    record, errors = rehearse(
        max_workers=args.max_workers,
        idle_timeout_min=args.idle_timeout_min,
        timeout_s=args.timeout,
    )
    print(json.dumps(record, indent=1))
    return report_checks(args.out, {"record": record}, errors)


if __name__ == "__main__":
    from rehearsals.autoscaler import main as _main  # tasks import _where by name

    sys.exit(_main())
