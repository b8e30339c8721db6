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

import json
import logging
import math
import os
import re
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from nfpi.errors import ConfigError

__all__ = [
    "EXPERIMENT_TAGS",
    "NETWORK_FILESYSTEMS",
    "RUN_NAME_TAG",
    "RunLogger",
    "Tracking",
    "filesystem_of",
    "param_value",
    "resolve_tracking",
    "start_run",
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


@dataclass(frozen=True)
class Tracking:
    """Where MLflow runs are written; picklable, so it travels to Ray workers."""

    uri: str
    experiment: str
    artifact_root: str | None = None

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
    return Tracking(uri=uri, experiment=experiment, artifact_root=artifact_root)


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
    all_tags = {RUN_NAME_TAG: name, **(tags or {})}
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=display_name or name, tags=all_tags)
    return run.info.run_id


def param_value(value: Any) -> str:
    """How a param is stored in MLflow (JSON for containers, str otherwise, at most 6000 chars)."""
    text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
    return text[:6000]  # MLflow's param value limit


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
