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
import logging
import os
import re
import socket
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Literal, get_args

import ray
import torch

from nfpi.checks import preflight
from nfpi.config import ExperimentConfig
from nfpi.errors import ClusterStartError, ConfigError
from ray_jobs._ray_compat import local_cpus, session_logs
from ray_jobs.tracking import Tracking, resolve_tracking, ui_command

__all__ = [
    "HOME_RESULTS",
    "PLACEMENT_STRATEGIES",
    "PRIOR_ACTOR_NODES",
    "RESULTS_ENV",
    "PlacementStrategy",
    "PriorActorNode",
    "RaySettings",
    "add_common_args",
    "check_before_ray",
    "check_reachable",
    "check_tracking",
    "connect",
    "default_results_dir",
    "describe_outputs",
    "results_dir_of",
    "untrusted_pickles",
]

_log = logging.getLogger("nfpi.ray")
#: Seconds :func:`check_tracking` waits for a tracking server (``NFPI_TRACKING_TIMEOUT``).
TRACKING_TIMEOUT = float(os.environ.get("NFPI_TRACKING_TIMEOUT", "10"))
#: SQLite stores up to this size get a full ``PRAGMA quick_check``; larger ones a header and
#: schema read only (a quick check reads every page).
QUICK_CHECK_BYTES = 256 * 2**20

# Ray placement-group strategies for a run's Train workers (one bundle per worker).
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
PLACEMENT_STRATEGIES: tuple[str, ...] = get_args(PlacementStrategy)
# Where a run's prior actor lives: the driver's node (on a cluster, the head node that runs
# `ray job submit`'s entrypoint) or wherever Ray finds room.
PriorActorNode = Literal["driver", "any"]
PRIOR_ACTOR_NODES: tuple[str, ...] = get_args(PriorActorNode)


#: Where results go when ``--results-dir`` is not given and this environment variable is set
#: (``cluster.yaml`` sets it to the shared file system on every node).
RESULTS_ENV = "NFPI_RESULTS"
#: The default under ``ray job submit`` (whose working directory is a temporary copy inside
#: Ray's session folder, deleted with the session): a stable folder in the user's home.
HOME_RESULTS = "~/nfpi-results"
# Set by Ray's job supervisor in a submitted job's entrypoint environment (Ray 2.60's
# job_supervisor.py: the job's runtime env and metadata).
_JOB_ENV = ("RAY_JOB_CONFIG_JSON_ENV_VAR",)


def _in_ray_job() -> bool:
    """Whether this process is (a child of) a ``ray job submit`` entrypoint."""
    if any(os.environ.get(k) for k in _JOB_ENV):
        return True
    # The job's working directory: <session>/runtime_resources/working_dir_files/<pkg>/
    return "runtime_resources" in Path.cwd().parts


def default_results_dir() -> Path:
    """``--results-dir``'s default, absolute: ``$NFPI_RESULTS`` when set; else, under ``ray job
    submit``, ``~/nfpi-results`` (the job's working directory vanishes with the Ray session);
    else ``./results``."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV]).expanduser().resolve()
    if _in_ray_job():
        return Path(HOME_RESULTS).expanduser().resolve()
    return Path("results").resolve()


def results_dir_of(value: str | None) -> Path:
    """The results directory a command line names (``None``: :func:`default_results_dir`).

    Raises:
        ConfigError: the path is an existing file (or lies under one).
    """
    path = Path(value).expanduser().resolve() if value else default_results_dir()
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(
                    "--results-dir",
                    str(path),
                    f"a directory ({part} is a file): pass a folder, e.g. "
                    f"--results-dir {part.parent / 'nfpi-results'}",
                )
            break
    return path


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
        registered_model: register each run's final flow and prior (an MLflow model) under
            this name (None: logged with the run, not registered).
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
    registered_model: str | None = None

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
        results = results_dir_of(args.results_dir)
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
            registered_model=args.register_model,
        )


def describe_outputs(settings: RaySettings) -> list[str]:
    """The first lines of a run or sweep: where its results go and how to open them in MLflow
    (the same lines under ``ray job submit``, whose log is all a user sees)."""
    lines = [f"results: {settings.results_dir}"]
    if settings.tracking is not None:
        lines.append(
            f"MLflow: {ui_command(settings.tracking.uri)}"
            + ("  (another port: change --port)" if settings.tracking.uri.startswith("sqlite:")
               else "")
        )  # fmt: skip
    return lines


def check_before_ray(
    configs: Iterable[ExperimentConfig],
    settings: RaySettings,
    address: str | None,
) -> list[str]:
    """The cheap checks of a Ray run or sweep, before Ray starts: every config's
    (:func:`nfpi.checks.preflight`: data paths, the global batch against the workers and the
    training set) and, on a local Ray, the workers against this machine (a GPU for
    ``--use-gpu``, CPUs for the workers; a trial's driver holds none). Returns the schedule
    warnings (each once).

    The MLflow store is checked first (:func:`check_tracking`): a corrupt SQLite file or a
    tracking server that does not answer is one line before Ray starts.

    Raises:
        ConfigError / DatasetNotFoundError: naming the field or path and the fix.
    """
    if settings.tracking is not None:
        check_tracking(settings.tracking.uri)
    warnings: dict[str, None] = {}
    seen: set[str] = set()
    for config in configs:
        key = repr(sorted(config.flat().items()))
        if key in seen:
            continue
        seen.add(key)
        warnings.update(dict.fromkeys(preflight(config, settings.num_workers)))
    if address and address not in ("local", "auto"):
        check_reachable(address)  # seconds, not Ray's minute of retries and its traceback
    if address or os.environ.get("RAY_ADDRESS"):
        return list(warnings)  # a cluster's resources are its own (and may autoscale)
    if settings.use_gpu and not torch.cuda.is_available():
        raise ConfigError(
            "--use-gpu",
            True,
            "a machine with a CUDA GPU (none is visible here): drop --use-gpu, or pass "
            "--address of a cluster with GPUs",
        )
    cpus = local_cpus()
    need = max(settings.num_workers, 1) * settings.cpus_per_worker
    if need > cpus + 1e-9:
        raise ConfigError(
            "--num-workers",
            settings.num_workers,
            f"at most what this machine's {cpus} CPUs hold: {settings.num_workers} workers x "
            f"{settings.cpus_per_worker:g} CPUs (--cpus-per-worker)"
            + f" = {need:g}; lower --num-workers or --cpus-per-worker",
        )
    return list(warnings)


def check_tracking(uri: str, timeout: float | None = None) -> None:
    """Whether the MLflow store at ``uri`` can be used, in at most ``timeout`` seconds
    (default :data:`TRACKING_TIMEOUT`): an existing SQLite file must be a readable, intact
    database; an ``http(s)`` tracking server must answer (any HTTP status: it may ask for
    credentials); a database server (``postgresql://``, ``mysql://``...) must accept a TCP
    connection. Other stores are left to MLflow.

    Raises:
        ConfigError: naming the store, what is wrong and the fix (one line).
    """
    timeout = TRACKING_TIMEOUT if timeout is None else timeout
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        _check_sqlite(uri, Path(uri[len("sqlite:///") :]), timeout)
        return
    if not parsed.hostname:
        return
    shown = parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else ""))
    where = urllib.parse.urlunparse(shown)  # without credentials
    fix = (
        "start the tracking server (or check the address, the network and "
        "NFPI_TRACKING_TIMEOUT), or pass another --tracking-uri / MLFLOW_TRACKING_URI"
    )
    try:
        if parsed.scheme in ("http", "https"):
            health = urllib.parse.urlunparse(
                parsed._replace(path=parsed.path.rstrip("/") + "/health")
            )
            try:
                urllib.request.urlopen(health, timeout=timeout).close()
            except urllib.error.HTTPError:
                pass  # it answered (e.g. 401 behind authentication): reachable
        else:
            port = parsed.port or {"postgresql": 5432, "mysql": 3306, "mssql": 1433}.get(
                parsed.scheme.split("+")[0]
            )
            if port is None:
                return
            socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except TimeoutError:
        raise ConfigError(
            "tracking_uri",
            where,
            f"a tracking server that answers: none did within {timeout:g} s; {fix}",
        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if isinstance(reason, TimeoutError):
            raise ConfigError(
                "tracking_uri", where,
                f"a tracking server that answers: none did within {timeout:g} s; {fix}",
            ) from None  # fmt: skip
        raise ConfigError(
            "tracking_uri", where, f"a reachable tracking server ({reason}); {fix}"
        ) from None


def _check_sqlite(uri: str, db: Path, timeout: float) -> None:
    if not db.exists():
        return  # MLflow creates it
    fix = (
        f"move it aside (mv {db} {db}.corrupt) to start a new store, restore a backup, or pass "
        "another --tracking-uri / --results-dir"
    )
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            if db.stat().st_size <= QUICK_CHECK_BYTES:
                result = conn.execute("PRAGMA quick_check").fetchone()
                if result is None or result[0] != "ok":
                    raise sqlite3.DatabaseError(result[0] if result else "no result")
        finally:
            conn.close()
    except sqlite3.OperationalError as err:
        if "locked" in str(err):
            return  # in use by a live writer: MLflow waits for it
        raise ConfigError(
            "tracking_uri", uri, f"a readable SQLite MLflow store ({err}); {fix}"
        ) from None
    except sqlite3.DatabaseError as err:
        raise ConfigError(
            "tracking_uri", uri, f"an intact SQLite MLflow store, but it is corrupt ({err}); {fix}"
        ) from None


def untrusted_pickles(path: str | os.PathLike[str]) -> str | None:
    """Why unpickling ``path`` (a pickle file, or a Tune experiment folder: its ``*.pkl`` files
    and those of its trials) could run another user's code, or ``None`` when it cannot.

    Unpickling runs code (Tune's ``Tuner.restore``, a trial's pickled error), so a pickle is
    read only when this user (or root) owns it and its folders and nobody else can write to
    them: on shared storage anyone with write access could otherwise plant one. A folder
    writable by others is fine only with the sticky bit (``/tmp``), where they cannot replace
    this user's files.
    """
    import stat

    path = Path(path)
    me = os.geteuid()
    files = [path] if path.is_file() else [*path.glob("*.pkl"), *path.glob("*/*.pkl")]
    folders = {path if path.is_dir() else path.parent, *(f.parent for f in files)}
    folders |= {parent for folder in folders for parent in folder.parents}
    for item in [*files, *sorted(folders)]:
        try:
            st = item.stat()
        except OSError:
            continue
        if st.st_uid not in (me, 0):
            return f"{item} belongs to user id {st.st_uid}, not to this user ({me})"
        sticky_dir = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky_dir:
            return f"{item} is writable by other users (mode {stat.filemode(st.st_mode)})"
    return None


def connect(address: str | None, verbose: bool = False) -> str:
    """Attach to ``address`` (or ``RAY_ADDRESS``, e.g. under ``ray job submit``) or start a local
    Ray; never both. Returns one line naming the cluster's resources and its log folder.

    Quiet unless ``verbose``: the workers' output stays in the Ray session's log files instead
    of being copied to this console (``log_to_driver``), and Ray's own INFO lines are off (its
    warnings are kept)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address and address not in ("local", "auto"):
            check_reachable(address)
            _log.info("Ray: connecting to %s ...", address)
        else:
            _log.info("Ray: starting a local cluster (5-30 s) ...")
        _init(address or "local", verbose)
    total = ray.cluster_resources()
    where = f"cluster {address}" if address and address != "local" else "local"
    line = f"Ray ({where}): {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs"
    logs = session_logs()
    return line + (f"; worker logs in {logs}" if logs and not verbose else "")


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, in one line, when nothing listens at a Ray ``address`` (``ray://host:port``,
    ``host:port``, ``http://host:port``) instead of Ray's own minute-long retries and traceback.

    Raises:
        ClusterStartError: the host does not resolve or refuses or ignores the connection.
    """
    match = re.fullmatch(r"(?:(?P<scheme>[a-z]+)://)?(?P<host>\[[^\]]+\]|[^:/]+)(?::(?P<port>\d+))?/?",
                         address.strip())  # fmt: skip
    if match is None:
        raise ClusterStartError(
            f"--address {address!r} is not a Ray address: use host:port (the GCS, port 6379 by "
            "default), ray://host:10001 (Ray Client) or leave it out for a local Ray"
        )
    scheme = match["scheme"] or ""
    default_port = {"ray": 10001, "http": 8265, "https": 443}.get(scheme, 6379)
    host, port = match["host"].strip("[]"), int(match["port"] or default_port)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ClusterStartError(
            f"cannot reach Ray at {address} ({host}:{port}: {why} within {timeout:g} s): is the "
            "cluster up and this machine allowed to reach it (ray status on the head, a VPN or "
            "an SSH tunnel)? Leave --address and RAY_ADDRESS out to start a local Ray"
        ) from err


# What ray.init raises when the local node it started did not register with its GCS within Ray's
# fixed 30 s (ray/_private/node.py): on a machine whose CPUs are busy with other work.
_NODE_START_TIMEOUT = "timed out during startup"


def _init(address: str, verbose: bool) -> None:
    """``ray.init``; a local node that timed out during startup is reported as
    :class:`ClusterStartError` (one line, not Ray's traceback). Its half-started processes end
    with this process (Ray's reaper); no second attempt, which would only add to the load."""
    local = address == "local"
    try:
        ray.init(
            address=address,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
            # A trial is ~9 processes (driver, prior actor, Train controller, workers and Train's
            # helper actors); Ray warns once a node has started 4 x its startup concurrency
            # (= its CPUs) of them: 2 trials on 2 CPUs printed that warning in the first command.
            **({"_system_config": {"worker_maximum_startup_concurrency": 8}} if local else {}),
        )
    except Exception as err:
        if not local or _NODE_START_TIMEOUT not in str(err):
            raise
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        raise ClusterStartError(
            "the local Ray did not start: its node did not register within Ray's 30 s (load "
            f"average {load:.0f} on {local_cpus()} CPUs: the machine is busy); retry when it "
            "is less busy, or start Ray once with `ray start --head --block &` and pass "
            "--address 127.0.0.1:6379"
        ) from err


def _default(name: str) -> object:
    """``RaySettings``' default of field ``name``: the flags' defaults are read from the
    dataclass, never restated."""
    (found,) = [f for f in fields(RaySettings) if f.name == name]
    assert found.default is not MISSING, f"RaySettings.{name} has no default"
    return found.default


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags ``ray_jobs/train.py`` and ``ray_jobs/sweep.py`` share (their defaults are
    ``RaySettings``')."""
    parser.add_argument(
        "--results-dir",
        default=None,
        help=f"root for Ray storage, the MLflow store and run files (made absolute; default: "
        f"${RESULTS_ENV} when set, else {HOME_RESULTS} under ray job submit, else ./results)",
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
    parser.add_argument(
        "--num-workers",
        type=int,
        default=_default("num_workers"),
        help="data-parallel workers per run",
    )
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl backend")
    parser.add_argument(
        "--cpus-per-worker",
        type=float,
        default=_default("cpus_per_worker"),
        help="CPUs each Train worker reserves",
    )
    parser.add_argument(
        "--max-failures",
        type=int,
        default=_default("max_failures"),
        help="worker-group restarts per run",
    )
    parser.add_argument(
        "--actor-timeout",
        type=float,
        default=_default("actor_timeout"),
        help="seconds per prior-actor call",
    )
    parser.add_argument(
        "--placement-strategy",
        default=_default("placement_strategy"),
        choices=PLACEMENT_STRATEGIES,
        help="placement of a run's Train workers: PACK fills a node first, SPREAD puts them on "
        "different nodes where possible",
    )
    parser.add_argument(
        "--prior-actor-node",
        default=_default("prior_actor_node"),
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
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Ray's own console output (every worker's log lines, Tune's status tables)",
    )
    parser.add_argument(
        "--register-model",
        metavar="NAME",
        help="register each run's final flow and prior (an MLflow model) under NAME in the "
        "tracking store's model registry",
    )
