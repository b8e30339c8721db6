"""MLflow wiring: where runs go, parent/child runs, and the rank-0 logger of the Train workers.

The embedded default is a SQLite store at an absolute path under the results directory (MLflow
3.17 refuses the plain file store); any tracking URI can be given instead (flag or
``MLFLOW_TRACKING_URI``), e.g. the tracking server on a cluster's head node. A SQLite file on a
network filesystem (NFS, EFS, SMB, FUSE mounts) is refused: SQLite's locking is unreliable there
and every node's writers would share one file; use a tracking server whose database is on local
disk or Postgres (see ``cluster.yaml``).

What a run logs: params once (the first launch's values stay; a later launch's different value of
a key, e.g. a longer ``optim.epochs`` or a ``--resume-with`` knob, is a ``nfpi.changed.<key>``
tag), metrics once per step (:meth:`RunLogger.last_step` lets a resumed run skip what it logged
before), a non-finite metric as a warning tag instead of a silent drop, and a failed run's error
as the ``nfpi.error`` tag plus ``error.txt``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from nfpi.errors import ConfigError

__all__ = [
    "COMMAND_TAG",
    "DIRTY_TAG",
    "EXPERIMENT_TAGS",
    "NETWORK_FILESYSTEMS",
    "RUN_NAME_TAG",
    "RunLogger",
    "Tracking",
    "filesystem_of",
    "param_value",
    "resolve_tracking",
    "source_tags",
    "start_run",
    "system_metrics",
    "ui_command",
    "ui_url",
]

log = logging.getLogger(__name__)

RUN_NAME_TAG = "nfpi.run_name"  # a Train run's / trial's name: how a resumed run finds its run
MOUNTS = Path("/proc/mounts")
#: Filesystem types (as /proc/mounts names them) where SQLite must not live; ``fuse.*`` (sshfs,
#: s3fs, gcsfuse, ...) counts as network too, except the local ``fuse.fuse-overlayfs``/``lxcfs``.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
     "lustre", "gpfs", "beegfs", "ocfs2", "gfs2", "fuse", "fuseblk"}
)  # fmt: skip
_LOCAL_FUSE = frozenset({"fuse.fuse-overlayfs", "fuse.lxcfs"})
# The experiment kind "model training" (runs with params, metrics and artifacts), which MLflow 3
# UIs read to open an experiment in their training view rather than the GenAI one (traces).
# MLflow 3.17.2's UI decides by its workflow type instead (the "GenAI | Model training" switch,
# remembered by the browser, or the URL's ``workflowType`` parameter): ui_url() links to the
# training view with that parameter.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def ui_url(
    experiment_id: str, run_id: str | None = None, view: str | None = None, base: str = UI
) -> str:
    """A link into the MLflow UI's training view: the experiment's runs (in the saved ``view``,
    see :func:`ray_jobs.mlflow_logging.save_sweep_view`), or one run."""
    page = f"runs/{run_id}" if run_id else "runs"
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={view}" if view else "")
    return f"{base}/#/experiments/{experiment_id}/{page}?{query}"


def ui_command(uri: str, port: int = 5000) -> str:
    """The command that opens the MLflow UI on ``uri``'s store, with this environment's own
    ``mlflow`` (the one beside this Python, so it works without activating the venv): a SQLite
    store is served by ``mlflow ui``; a tracking server already is one (its address is the UI)."""
    if not uri.startswith("sqlite:"):
        return f"open {uri} (a tracking server serves its own UI)"
    beside = Path(sys.executable).parent / "mlflow"
    mlflow_bin = str(beside) if beside.exists() else "mlflow"
    return (
        f"{shlex.quote(mlflow_bin)} ui --backend-store-uri {shlex.quote(uri)} "
        f"--host 127.0.0.1 --port {port}"
    )


COMMAND_TAG = "nfpi.command"  # the command line that made the run
DIRTY_TAG = "nfpi.source.git.dirty"  # "true" when the source had uncommitted changes


def source_tags() -> dict[str, str]:
    """What made a run, as tags: MLflow's own context tags (``mlflow.source.name``,
    ``mlflow.source.type``, ``mlflow.source.git.commit``/``branch``/``repoURL`` when the program
    lies in a git checkout, ``mlflow.user``: what ``mlflow.start_run`` would set), the command
    line (``nfpi.command``) and whether the checkout had uncommitted changes
    (``nfpi.source.git.dirty``). Computed once, in the process the user started (the driver):
    the runs that trials and workers create carry the same tags."""
    from mlflow.tracking.context.registry import resolve_tags

    try:
        tags = {k: str(v) for k, v in resolve_tags().items() if k.startswith("mlflow.")}
    except Exception as err:  # noqa: BLE001 - a missing context costs a tag, not the run
        log.debug("MLflow's context tags: %s", err)
        tags = {}
    tags.pop("mlflow.runName", None)
    tags[COMMAND_TAG] = shlex.join([Path(sys.executable).name, *sys.argv])[:5000]
    main = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else Path.cwd()
    if "mlflow.source.git.commit" in tags:
        try:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=main, capture_output=True, text=True, timeout=10, check=True,
            )  # fmt: skip
            tags[DIRTY_TAG] = "true" if status.stdout.strip() else "false"
        except (OSError, subprocess.SubprocessError) as err:
            log.debug("git status: %s", err)
    return tags


@dataclass(frozen=True)
class Tracking:
    """Where MLflow runs are written; picklable, so it travels to Ray workers. ``run_tags``
    (e.g. :func:`source_tags` of the driver) go on every run :func:`start_run` creates."""

    uri: str
    experiment: str
    artifact_root: str | None = None
    run_tags: tuple[tuple[str, str], ...] = ()

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri)

    def experiment_id(self) -> str:
        """The experiment's id, created on first use (create it once, in the driver: concurrent
        first-time creation on SQLite races), tagged to open in the UI's training view."""
        client = self.client()
        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            return client.create_experiment(
                self.experiment, artifact_location=self.artifact_root, tags=EXPERIMENT_TAGS
            )
        for key, value in EXPERIMENT_TAGS.items():
            if found.tags.get(key) != value:  # an experiment made before the tag existed
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id


def filesystem_of(path: str | Path) -> tuple[str, str]:
    """(filesystem type, mount point) of ``path`` (or of its nearest existing parent), from
    ``/proc/mounts``; ``("", "")`` where that file cannot be read (not Linux)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    target = str(path.resolve())
    try:
        lines = MOUNTS.read_text().splitlines()
    except OSError:
        return "", ""
    best = ("", "")
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes blanks in mount points as octal (\040).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[1]):
            best = (fields[2], point)
    return best


def _on_network_filesystem(path: Path) -> tuple[str, str] | None:
    fstype, point = filesystem_of(path)
    network = fstype in NETWORK_FILESYSTEMS or (
        fstype.startswith("fuse.") and fstype not in _LOCAL_FUSE
    )
    return (fstype, point) if network else None


def resolve_tracking(results_dir: Path, uri: str | None, experiment: str) -> Tracking:
    """Flag, then ``MLFLOW_TRACKING_URI``, then ``sqlite:////<results>/mlflow.db`` (absolute).

    A local SQLite store keeps its artifacts in ``mlartifacts/`` beside the database (an absolute
    location: Ray workers and jobs run in other directories); a tracking server decides itself.

    Raises:
        ConfigError: a relative SQLite path, or a SQLite file on a network filesystem.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        results_dir = results_dir.resolve()
        results_dir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{results_dir / 'mlflow.db'}"
    artifact_root = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        if not db.is_absolute():
            raise ConfigError(
                "tracking_uri", uri, "an absolute SQLite path: sqlite:////abs/path/mlflow.db"
            )
        network = _on_network_filesystem(db)
        if network is not None:
            raise ConfigError(
                "tracking_uri",
                uri,
                f"a SQLite file on a local disk; {db.parent} is on a {network[0]} network "
                f"filesystem (mounted at {network[1]}), where SQLite's file locking is unreliable "
                "and every node would write the same file. Run an MLflow tracking server whose "
                "database is on a local disk or Postgres (artifacts may stay on shared storage; "
                "see cluster.yaml) and pass its http:// URI with --tracking-uri or "
                "MLFLOW_TRACKING_URI, or put --results-dir on a local disk",
            )
        artifact_root = (db.parent / "mlartifacts").as_uri()
    return Tracking(
        uri=uri,
        experiment=experiment,
        artifact_root=artifact_root,
        run_tags=tuple(sorted(source_tags().items())),
    )


def start_run(
    tracking: Tracking,
    name: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    resume: bool = False,
    display_name: str | None = None,
) -> str:
    """Create a run (a child of ``parent_run_id`` if given: the UI nests it) and return its id.
    ``name`` identifies the run (tag ``nfpi.run_name``); the UI shows ``display_name`` (e.g.
    what a sweep's trial varies: ``fpi lam=300``), default ``name``.

    With ``resume`` an existing run of the same ``name`` (and parent) is reopened instead, so
    that a re-launched Train run or a resumed Tune trial, which continue from their last
    checkpoint, keep logging to one MLflow run.
    """
    client, experiment_id = tracking.client(), tracking.experiment_id()
    if resume:
        clauses = [f"tags.`{RUN_NAME_TAG}` = '{name}'"] if "'" not in name else []
        if parent_run_id is not None:
            clauses.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
        found = [
            run
            for run in client.search_runs(
                [experiment_id], " and ".join(clauses), order_by=["start_time DESC"]
            )
            if run.data.tags.get(RUN_NAME_TAG) == name
            and run.data.tags.get("mlflow.parentRunId") == parent_run_id
        ]
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    all_tags = {**dict(tracking.run_tags), RUN_NAME_TAG: name, **(tags or {})}
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=display_name or name, tags=all_tags)
    return run.info.run_id


def param_value(value: Any) -> str:
    """How a param is stored in MLflow (JSON for containers, str otherwise, at most 6000 chars)."""
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]  # MLflow's param value limit


@contextmanager
def system_metrics(tracking: Tracking, run_id: str, node_id: str | None = None) -> Iterator[None]:
    """MLflow's system metrics (``mlflow.system_metrics``: CPU, memory, disk, network and GPU
    of this node, ``system/...``) logged to ``run_id`` every 10 s while the block runs (the
    interval: ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL``) and once more at its end (the last,
    partial interval); a restarted block continues the steps. Without ``psutil`` (what MLflow's
    monitor needs) nothing is logged."""
    if importlib.util.find_spec("psutil") is None:
        log.warning("no system metrics for run %s: psutil is not installed", run_id)
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, resume_logging=True, node_id=node_id, tracking_uri=tracking.uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        # MLflow's monitor drops the samples it collected after its last publish, so a block
        # shorter than one interval (a smoke run) logged none: publish that last interval.
        try:
            pending = monitor.aggregate_metrics()
            if not pending:  # the monitor's thread had not sampled yet
                monitor.collect_metrics()
                pending = monitor.aggregate_metrics()
            if pending:
                monitor.publish_metrics(pending)
                monitor.mlflow_logger.flush()
        except Exception as err:  # noqa: BLE001 - system metrics are a side record
            log.debug("run %s: last system metrics not logged: %s", run_id, err)


class RunLogger:
    """Logs one run's params, metrics and artifacts (used by the driver and by rank 0 only)."""

    def __init__(self, tracking: Tracking, run_id: str) -> None:
        self.tracking, self.run_id = tracking, run_id
        self.client = tracking.client()

    def params(self, params: dict[str, Any]) -> dict[str, str]:
        """Log the params this run does not hold yet (MLflow params are immutable: a resumed
        run keeps its first values). Returns ``{key: new value}`` for params it holds with
        another value, each also recorded as a ``nfpi.changed.<key>`` tag."""
        logged = self.client.get_run(self.run_id).data.params
        values = {k: param_value(v) for k, v in params.items()}
        items = [mlflow.entities.Param(k, v) for k, v in values.items() if k not in logged]
        for i in range(0, len(items), 100):  # the batch API takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        changed = {k: v for k, v in values.items() if k in logged and logged[k] != v}
        for key, value in changed.items():
            self.tag(f"nfpi.changed.{key}", f"{value} (param: {logged[key]})"[:5000])
        return changed

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``. A non-finite value is not dropped silently: it becomes
        the tag ``nfpi.nonfinite.<key>`` ("nan at step 3") and a warning."""
        stamp = int(1000 * time.time())
        items, bad = [], {}
        for k, v in metrics.items():
            if not isinstance(v, (int, float)):
                continue
            if math.isfinite(float(v)):
                items.append(mlflow.entities.Metric(k, float(v), stamp, step))
            else:
                bad[k] = float(v)
        if items:
            self.client.log_batch(self.run_id, metrics=items)
        for key, value in bad.items():
            log.warning("run %s: metric %s = %s at step %d", self.run_id, key, value, step)
            self.tag(f"nfpi.nonfinite.{key}", f"{value} at step {step}")

    def last_step(self, key: str) -> int | None:
        """The largest step at which metric ``key`` was logged, ``None`` if never."""
        history = self.client.get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=None)

    def count(self, key: str) -> int:
        """How many values of metric ``key`` were logged."""
        return len(self.client.get_metric_history(self.run_id, key))

    def artifacts(self, folder: str | Path, artifact_path: str | None = None) -> None:
        """Log every file under ``folder`` (an existing artifact of the same path is replaced)."""
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def error(self, error: BaseException) -> None:
        """Record why the run failed: tag ``nfpi.error`` (type and first line) and
        ``error.txt`` (the whole message and traceback)."""
        first = (str(error).splitlines() or [""])[0]
        self.tag("nfpi.error", f"{type(error).__name__}: {first}"[:5000])
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        self.text(text, "error.txt")

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            file = Path(tmp) / name
            file.write_text(text)
            self.client.log_artifact(self.run_id, str(file))

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
