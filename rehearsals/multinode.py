"""Two Ray nodes on one machine: a data-parallel run spread over them, then the loss of one.

    python rehearsals/multinode.py --results-dir /tmp/rehearsal            # digits
    python rehearsals/multinode.py --smoke-test --results-dir /tmp/r --out r.json

Starts a private Ray cluster of two nodes (``ray.cluster_utils.Cluster``: a head node with the
custom resource ``head`` and a worker node with ``worker``, each its own raylet, object store
and CPUs) and runs the same experiment three times with 2 Train workers (gloo):

1. ``one-node``: placement ``PACK``, both workers on one node (the one-node run).
2. ``two-node``: placement ``SPREAD``, one worker per node.
3. ``node-loss``: as 2, but at the end of epoch ``--kill-epoch`` the worker node is removed
   (``cluster.remove_node``: its raylet and every process on it are killed) while rank 0 waits
   in that epoch's report. The worker count is fixed (2): Ray Train restarts the group on what
   is left (both workers on the head) and it resumes from the run directory's last checkpoint.

The driver (this process) and the Train controller run on the head; the prior actor is pinned
there (``RaySettings.prior_actor_node="driver"``). Checkpoints, run files and the MLflow SQLite
store live under ``--results-dir``, which every "node" reaches because all of them run on this
machine's disk; on a real cluster that is the shared file system (``cluster.yaml``: EFS).

Checks (exit status 1 if any fails, each named): ranks on one node / on two nodes, the actor
and controller on the head, the statistics of the final flow (all-reduced over the 2 ranks) and
the whole final state (flow, EMA, optimiser, prior, prior service, metrics history without
timings) bit-identical across the three runs, the node-loss run restarted once from its
checkpoint on the head, and every epoch logged to MLflow exactly once.

Why bit-identical is expected: the three runs have the same world size, so rank r reads the
same shard and draws the same randomness wherever it runs; with two ranks every all-reduce
(gradients, statistics, metric sums) adds two numbers, and a + b == b + a in floating point,
so neither gloo's algorithm nor the placement can change a bit. With more ranks gloo's ring
order is still fixed by rank, not by node, but NCCL picks ring or tree algorithms from the
topology (NVLink within a node, network across nodes), so multi-node GPU sums may differ in the
last bits from a one-node run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nfpi.checkpoint import find_checkpoint, load_checkpoint
from nfpi.config import ExperimentConfig
from nfpi.presets import experiment_config
from nfpi.training import is_wall_clock

__all__ = [
    "Probe",
    "diff_states",
    "end_processes",
    "main",
    "read_probes",
    "report_checks",
    "session_pids",
]

log = logging.getLogger("nfpi.rehearsal")

# Not compared: wall-clock timings (``nfpi.training.is_wall_clock``), and where load_checkpoint
# read the state from.
IGNORED_KEYS = frozenset({"_file"})
RUNS = (("one-node", "PACK"), ("two-node", "SPREAD"), ("node-loss", "SPREAD"))


# ------------------------------------------------------------------------------ comparison
def diff_states(a: Any, b: Any, path: str = "", ignore: frozenset[str] = IGNORED_KEYS) -> list[str]:
    """Paths where two checkpoint states differ: tensors compared with ``torch.equal`` (dtype
    and every bit of every element), other values with ``==``; keys in ``ignore`` (wall-clock
    timings, the file a state was read from) and ``time_*`` keys are skipped at any depth."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
        return [] if same else [path or "<root>"]
    if isinstance(a, dict) and isinstance(b, dict):

        def skip(key: Any) -> bool:
            return key in ignore or is_wall_clock(str(key))

        out = [f"{path}.{k}" for k in sorted(set(a) ^ set(b), key=str) if not skip(k)]
        for key in sorted(set(a) & set(b), key=str):
            if not skip(key):
                out += diff_states(a[key], b[key], f"{path}.{key}", ignore)
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path} (length {len(a)} vs {len(b)})"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in diff_states(x, y, f"{path}[{i}]", ignore)
        ]
    return [] if a == b else [path or "<root>"]


# ------------------------------------------------------------------- in the Train workers
@dataclass(frozen=True)
class Probe:
    """A worker callback (``run_experiment(worker_callbacks=...)``) that records where every
    rank runs, and in the node-loss run holds rank 1 at the end of ``hold_epoch``.

    Every call appends a JSON line to ``folder/<rank>-<pid>.jsonl``: rank, node, process, epoch,
    the checkpoint the group resumed from and (rank 0) the prior actor's node. At the last epoch
    every rank computes the class statistics of the final flow over its shard (all-reduced: a
    collective of all ranks) and rank 0 saves them to ``folder/statistics.pt``.

    ``hold_epoch``: rank 1 writes ``folder/held`` and waits until its process is killed (with
    the worker node, or by Ray Train tearing the group down); rank 0 meanwhile logs the epoch
    and waits in its report. Once ``folder/node-removed`` exists (written by the driver before
    it removes the node) later attempts pass through.
    """

    folder: Path
    hold_epoch: int | None = None
    hold_timeout_s: float = 600.0

    def __call__(self, trainer: Any, result: Any) -> None:
        import ray

        from nfpi.training import collect_statistics

        node = ray.get_runtime_context().get_node_id()
        record = {
            "rank": trainer.rank,
            "world": trainer.world,
            "node": node,
            "pid": os.getpid(),
            "time": time.time(),
            "epoch": result.epoch,
            "resumed_from": None if trainer.resumed_from is None else str(trainer.resumed_from),
        }
        if trainer.rank == 0:
            actor = trainer.schedule.client.actor
            where = actor.__ray_call__.remote(
                lambda _: ray.get_runtime_context().get_node_id()  # runs inside the actor
            )
            record["actor_node"] = ray.get(where, timeout=120)
        with open(self.folder / f"{trainer.rank}-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if result.epoch == trainer.config.optim.epochs - 1:
            stats = collect_statistics(
                trainer.flow,
                trainer.stats_loader,
                trainer.num_classes,
                trainer.device,
                seed=trainer.config.seed,
                levels=trainer.info.levels,
            )
            if trainer.rank == 0:
                torch.save(stats.flat().cpu(), self.folder / "statistics.pt")
        if (
            self.hold_epoch == result.epoch
            and trainer.rank == 1
            and not (self.folder / "node-removed").exists()
        ):
            (self.folder / "held").write_text(node)
            deadline = time.monotonic() + self.hold_timeout_s
            while time.monotonic() < deadline:  # ends when this process is killed
                time.sleep(0.1)
            raise TimeoutError(f"rank 1 was held {self.hold_timeout_s:.0f} s and never killed")


def read_probes(folder: Path) -> list[dict[str, Any]]:
    """The probe records of one run, in file order per process (processes sorted by name)."""
    return [
        json.loads(line)
        for path in sorted(folder.glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]


# ------------------------------------------------------------------------------- the driver
def _config(smoke: bool, epochs: int) -> ExperimentConfig:
    """The rehearsal's experiment: FPI re-solved every epoch through the actor (so that the run
    after the node loss still uses it), no pictures."""
    base = "smoke" if smoke else "digits"
    return experiment_config(
        base,
        {
            "name": "rehearsal",
            "optim.epochs": epochs,
            "prior.method": "fpi",
            "prior.solve_epoch": 0,
            "prior.resolve_every": 1,
            "prior.solve_until": None,
            "eval.plots": False,
        },
    )


START_ATTEMPTS = 3


def session_pids(marker: str) -> list[int]:
    """Processes (not this one) whose command line names ``marker``: a private cluster's
    temporary directory, which every process of it is given."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(proc.name))
    return pids


def end_processes(marker: str) -> None:
    """End what is left of a private cluster, by process id (see :func:`session_pids`)."""
    for pid in session_pids(marker):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def _start_cluster(temp_dir: str, cpus: int) -> tuple[Any, Any]:
    """A head node and a worker node on this machine, each with its own resources.

    A node starting on a loaded machine can miss Ray's fixed 30 s registration window ("The
    current node timed out during startup"): up to ``START_ATTEMPTS`` attempts, each in a fresh
    folder, what is left of a failed one ended first."""
    from ray.cluster_utils import Cluster

    from ray_jobs._ray_compat import keep_default_cluster_file

    for attempt in range(START_ATTEMPTS):
        folder = Path(temp_dir) / f"try{attempt}"
        folder.mkdir(parents=True)
        common = {"temp_dir": str(folder), "object_store_memory": 100 * 1024**2}
        try:
            # Cluster() records its address as this machine's default cluster (/tmp/ray),
            # where any other process's ray.init() would then attach: keep that file untouched.
            with keep_default_cluster_file():
                cluster = Cluster(
                    initialize_head=True,
                    head_node_args={
                        **common,
                        "num_cpus": cpus,
                        "resources": {"head": 1},
                        "include_dashboard": False,
                    },
                )
                worker = cluster.add_node(**common, num_cpus=cpus, resources={"worker": 1})
            return cluster, worker
        except Exception as err:  # Ray raises a bare Exception on this timeout
            log.warning("cluster start failed (attempt %d): %s", attempt + 1, err)
            end_processes(str(folder))
            if attempt == START_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _mlflow_steps(tracking: Any, run_name: str, key: str = "train_bpd") -> list[int]:
    from ray_jobs.tracking import RUN_NAME_TAG

    client = tracking.client()
    runs = client.search_runs([tracking.experiment_id()], f"tags.`{RUN_NAME_TAG}` = '{run_name}'")
    if len(runs) != 1:
        return []
    return [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]


def _remove_when_held(
    cluster: Any,
    worker: Any,
    folder: Path,
    tracking: Any,
    run_name: str,
    epoch: int,
    errors: list[str],
) -> None:
    """The driver's side of the node loss: once rank 1 is held at the end of ``epoch`` and
    rank 0 logged that epoch to MLflow, remove the worker node (polled, never timed)."""
    deadline = time.monotonic() + 600
    while not ((folder / "held").exists() and epoch in _mlflow_steps(tracking, run_name)):
        if time.monotonic() > deadline:
            errors.append(f"{run_name}: rank 1 was never held at the end of epoch {epoch}")
            return
        time.sleep(0.2)
    (folder / "node-removed").write_text("1")
    t0 = time.perf_counter()
    cluster.remove_node(worker)
    log.info("worker node removed in %.1f s", time.perf_counter() - t0)


def rehearse(
    results_dir: Path, *, smoke: bool, epochs: int, kill_epoch: int, cpus: int = 2
) -> tuple[list[dict[str, Any]], list[str]]:
    """Run the three runs on a fresh two-node cluster; returns one record per run and the
    failed checks (empty when everything holds)."""
    import ray

    from ray_jobs.settings import RaySettings
    from ray_jobs.tracking import resolve_tracking
    from ray_jobs.train import final_metrics, run_experiment

    if not 0 <= kill_epoch < epochs - 1:
        raise ValueError(f"--kill-epoch must be in [0, {epochs - 2}] (an epoch must follow it)")
    if (results_dir / "runs").exists() or (results_dir / "probes").exists():
        raise FileExistsError(
            f"{results_dir} holds runs of an earlier rehearsal (they would be resumed, not "
            "re-run); pass a fresh --results-dir"
        )
    config = _config(smoke, epochs)
    tracking = resolve_tracking(results_dir, None, "nfpi-multinode")
    temp_dir = tempfile.mkdtemp(prefix="nfpi-ray-", dir="/tmp")  # short: unix socket paths
    errors: list[str] = []
    records: list[dict[str, Any]] = []
    os.environ.pop("RAY_ADDRESS", None)
    try:
        cluster, worker = _start_cluster(temp_dir, cpus)
    except Exception:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        names = {cluster.head_node.node_id: "head", worker.node_id: "worker"}
        head_id = cluster.head_node.node_id
        driver_node = ray.get_runtime_context().get_node_id()
        if driver_node != head_id:
            errors.append(f"driver runs on node {driver_node}, not the head {head_id}")
        for name, strategy in RUNS:
            folder = results_dir / "probes" / name
            folder.mkdir(parents=True, exist_ok=True)
            loss = name == "node-loss"
            settings = RaySettings(
                results_dir=results_dir,
                tracking=tracking,
                num_workers=2,
                placement_strategy=strategy,
                max_failures=1 if loss else 0,
            )
            probe = Probe(folder, hold_epoch=kill_epoch if loss else None)
            killer = None
            if loss:
                killer = threading.Thread(
                    target=_remove_when_held,
                    args=(cluster, worker, folder, tracking, name, kill_epoch, errors),
                    daemon=True,
                )
                killer.start()
            t0 = time.perf_counter()
            result = run_experiment(config, settings, name, worker_callbacks=[probe])
            wall = time.perf_counter() - t0
            if killer is not None:
                killer.join(timeout=60)
            records.append(
                _record(name, strategy, result, final_metrics(result), folder, wall, names)
            )
        for r in records:
            r["mlflow_steps"] = _mlflow_steps(tracking, r["run"])
        records = _check(records, results_dir, kill_epoch, epochs, errors)
    finally:
        ray.shutdown()
        cluster.shutdown()
        end_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    return records, errors


def _record(
    name: str,
    strategy: str,
    result: Any,
    final: dict[str, float],
    folder: Path,
    wall: float,
    names: dict[str, str],
) -> dict[str, Any]:
    probes = read_probes(folder)
    # One attempt = one worker group: its processes, in the order they first reported.
    first: dict[int, dict[str, Any]] = {}
    for p in sorted(probes, key=lambda p: p["time"]):
        first.setdefault(p["pid"], p)
    starts = list(first.values())
    world = max((p["world"] for p in probes), default=1)
    groups = [starts[i : i + world] for i in range(0, len(starts), world)]
    nodes_per_attempt = [sorted({names.get(p["node"], p["node"]) for p in g}) for g in groups]
    resumed = [g[0]["resumed_from"] for g in groups if g[0]["resumed_from"] is not None]
    return {
        "run": name,
        "placement_strategy": strategy,
        "attempts": len(groups),
        "nodes_per_attempt": nodes_per_attempt,
        "resumed_from": resumed,
        "actor_nodes": sorted(
            {names.get(p["actor_node"], p["actor_node"]) for p in probes if "actor_node" in p}
        ),
        "ranks_on_worker_node": sorted(
            {p["rank"] for p in groups[0] if names.get(p["node"]) == "worker"} if groups else set()
        ),
        "error": None if result.error is None else str(result.error),
        "epochs": int(final.get("epoch", -1)) + 1,
        "nf_acc": final.get("nf_acc"),
        "test_bpd": final.get("test_bpd"),
        "wall_s": round(wall, 1),
    }


def _check(
    records: list[dict[str, Any]],
    results_dir: Path,
    kill_epoch: int,
    epochs: int,
    errors: list[str],
) -> list[dict[str, Any]]:
    """Fill in the comparisons and collect every failed expectation in ``errors``."""
    states = {}
    for r in records:
        path = find_checkpoint(results_dir / "runs" / r["run"])
        states[r["run"]] = None if path is None else load_checkpoint(path)
    stats = {
        r["run"]: torch.load(results_dir / "probes" / r["run"] / "statistics.pt", weights_only=True)
        for r in records
        if (results_dir / "probes" / r["run"] / "statistics.pt").exists()
    }
    reference = states.get("one-node")
    for r in records:
        name = r["run"]
        state = states[name]
        r["state_equal_to_one_node"] = (
            state is not None and reference is not None and not diff_states(state, reference)
        )
        r["statistics_equal_to_one_node"] = (
            name in stats and "one-node" in stats and torch.equal(stats[name], stats["one-node"])
        )
        first = r["nodes_per_attempt"][0] if r["nodes_per_attempt"] else []
        r["ranks_on_distinct_nodes"] = len(first) == 2
        r["actor_on_head"] = r["actor_nodes"] == ["head"]
        if r["error"] is not None:
            errors.append(f"{name}: the run failed: {r['error']}")
        if r["epochs"] != epochs:
            errors.append(f"{name}: finished {r['epochs']} epochs, not {epochs}")
        if r["mlflow_steps"] != list(range(epochs)):
            errors.append(f"{name}: MLflow steps {r['mlflow_steps']} (each epoch once expected)")
        if not r["actor_on_head"]:
            errors.append(f"{name}: prior actor on {r['actor_nodes']}, not the head")
        if name != "one-node" and state is not None and reference is not None:
            diff = diff_states(state, reference)
            if diff:
                errors.append(f"{name}: final state differs from one-node at {diff[:5]}")
        if name != "one-node" and not r["statistics_equal_to_one_node"]:
            errors.append(f"{name}: final class statistics differ from one-node's")
    one, two, loss = records
    if len(one["nodes_per_attempt"]) != 1 or len(one["nodes_per_attempt"][0]) != 1:
        errors.append(f"one-node: workers on {one['nodes_per_attempt']} (one node expected)")
    if two["nodes_per_attempt"] != [["head", "worker"]]:
        errors.append(f"two-node: workers on {two['nodes_per_attempt']} (head + worker expected)")
    expected = [["head", "worker"], ["head"]]
    if loss["attempts"] != 2 or loss["nodes_per_attempt"] != expected:
        errors.append(
            f"node-loss: attempts on {loss['nodes_per_attempt']} (both nodes, then the head)"
        )
    want = f"checkpoints/epoch-{kill_epoch + 1:04d}"
    if len(loss["resumed_from"]) != 1 or want not in loss["resumed_from"][0]:
        errors.append(f"node-loss: resumed from {loss['resumed_from']} (expected {want})")
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results-dir",
        help="where runs, checkpoints and the MLflow store go (default: a temporary folder)",
    )
    parser.add_argument("--epochs", type=int, help="epochs per run (default 3 smoke, 6 full)")
    parser.add_argument(
        "--kill-epoch", type=int, default=1, help="the node-loss run loses its node here"
    )
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of each node")
    parser.add_argument("--out", metavar="PATH", help="write the records as JSON")
    parser.add_argument(
        "--smoke-test",
        action="store_true",
        help="the smoke experiment (20 digits per class, tiny flow): what the suite runs",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    epochs = args.epochs or (3 if args.smoke_test else 6)
    with tempfile.TemporaryDirectory(prefix="nfpi-rehearsal-") as tmp:
        results = Path(args.results_dir or tmp).expanduser().resolve()
        records, errors = rehearse(
            results,
            smoke=args.smoke_test,
            epochs=epochs,
            kill_epoch=args.kill_epoch,
            cpus=args.cpus,
        )
    print(f"\nTwo Ray nodes on one machine, 2 Train workers, {epochs} epochs")
    print(
        f"{'run':<11}{'placement':<10}{'attempts':>9}{'nodes':>7}{'nf_acc':>8}{'test_bpd':>10}"
        f"{'state==':>8}{'stats==':>8}{'wall_s':>8}"
    )
    for r in records:
        print(
            f"{r['run']:<11}{r['placement_strategy']:<10}{r['attempts']:>9}"
            f"{len(r['nodes_per_attempt'][0]) if r['nodes_per_attempt'] else 0:>7}"
            f"{r['nf_acc'] or float('nan'):>8.4f}{r['test_bpd'] or float('nan'):>10.4f}"
            f"{r['state_equal_to_one_node']!s:>8}{r['statistics_equal_to_one_node']!s:>8}"
            f"{r['wall_s']:>8.1f}"
        )
    return report_checks(args.out, {"records": records}, errors)


def report_checks(out: str | None, payload: dict[str, Any], errors: list[str]) -> int:
    """A rehearsal's ending: ``payload`` plus the failed checks written to ``out`` (if given),
    each failed check printed, PASS or the count; the exit status (1 if any check failed)."""
    if out:
        Path(out).write_text(json.dumps({**payload, "errors": errors}, indent=1))
    for e in errors:
        print(f"FAIL: {e}")
    print("PASS" if not errors else f"{len(errors)} check(s) failed")
    return 1 if errors else 0


if __name__ == "__main__":
    from rehearsals.multinode import main as _main  # workers import the Probe by name

    sys.exit(_main())
