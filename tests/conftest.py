"""Shared fixtures: one local Ray session for the whole test run, migrated MLflow stores, one
trained smoke checkpoint."""

import os
import shutil
import socket

# Sleeping, not spinning, OpenMP threads: the suite runs Ray workers and gloo processes next to
# the pytest process on few cores, where spin-waiting threads slow every step down many-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray Train's controller polls its workers every 2 s by default, so every run (and every
# detection of a killed worker) waits up to 2 s for the next poll; the suite runs dozens of
# short runs. Inherited by the suite's Ray and by the clusters that tests start in subprocesses.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train starts a PreemptionWatcher actor (one more Python process importing Ray Train, a
# few CPU seconds) for every run, to react to a cloud node's drain notice; nothing here drains
# a node (the multi-node rehearsal removes one outright), so the suite's runs go without it.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

import pytest

# Fixtures that start Ray or a cluster: a test that uses one is slow (marked here, once, so that
# a new Ray test joins the slow tier without anyone remembering to mark it).
_SLOW_FIXTURES = frozenset({"ray_session", "run_rehearsal", "ray_head"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Everything that starts Ray (the suite's session, a rehearsal's own cluster) or is marked
    ``cluster`` is ``slow``: ``pytest -m "not slow"`` is the fast tier of the edit-test loop."""
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker(
            "cluster"
        ):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _restore_logging():
    """Entry points called in-process configure the root logger (``setup_logging``); undo it
    after each test, so that one test's console handler does not print into the next's."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def ray_session():
    """A private local Ray (never a running ``ray start`` cluster), shared by every Ray test.

    Its processes get ``RAY_ADDRESS`` = its own GCS: Ray Train's detached placement-group cleaner
    looks the controller up through an auto-detected cluster, and on a machine where someone
    else ran ``ray start`` it found that cluster, did not find the controller there and removed
    a live run's placement group (both workers died).
    """
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    if not ray.is_initialized():
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ["RAY_ADDRESS"] = f"{ray.util.get_node_ip_address()}:{port}"
        ray.init(
            address="local",
            num_cpus=4,
            object_store_memory=200 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("RAY_GCS_SERVER_PORT", None)


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory):
    """A SQLite MLflow store with its schema migrated once (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking(tmp_path, _mlflow_template):
    """A fresh, migrated MLflow store under this test's tmp_path."""
    from ray_jobs.tracking import Tracking

    db = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template, db)
    return Tracking(
        uri=f"sqlite:///{db}",
        experiment="nfpi-test",
        artifact_root=(tmp_path / "artifacts").as_uri(),
    )


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A smoke run's directory (1 epoch on digits, no pictures; its last checkpoint is what
    ``load_trained`` reads from it), trained once and shared read-only by the generation,
    classifier, NF-augmentation and downstream tests."""
    from nfpi.presets import experiment_config
    from nfpi.training import Trainer

    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    Trainer(experiment_config("smoke", {"eval.plots": False, "optim.epochs": 1}), run_dir).fit()
    return run_dir


@pytest.fixture
def run_rehearsal():
    """``run(script, out, *args)``: a ``rehearsals/*.py`` script in a subprocess (it starts
    and ends its own Ray cluster, away from the suite's Ray), its exit status checked; returns
    the report it wrote to ``out``, whose failed checks must be none."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run(script: str, out: Path, *args: str) -> dict:
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_GCS_SERVER_PORT", None)  # the suite's own Ray's port (ray_session)
        proc = subprocess.run(
            [sys.executable, str(root / "rehearsals" / script), *args, "--out", str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        report = json.loads(out.read_text())
        assert report["errors"] == []
        return report

    return run


@pytest.fixture
def ray_head(tmp_path):
    """``start(**env) -> submit``: a ``ray start --head`` cluster in a subprocess (token
    authentication on, as the README runs it; every port a free one; ``env`` added to the head's
    environment, which submitted jobs inherit), and ``submit(*entrypoint)``, which runs ``ray job
    submit --working-dir <repo> -- <entrypoint>`` against it and returns the completed process.
    The head is stopped at the end of the test and its session folder removed."""
    import secrets
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bin_dir = Path(sys.executable).parent
    heads = []

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def start(**extra_env):
        # The token from the environment, so that the test leaves ~/.ray/auth_token alone.
        env = {
            **os.environ,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            **extra_env,
        }
        for key in ("RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_GCS_SERVER_PORT", "NFPI_RESULTS"):
            if key not in extra_env:
                env.pop(key, None)
        port, dash, *agent_ports = (free_port() for _ in range(6))
        # A short temp dir: Ray's unix sockets live under it and their paths must stay < 108 bytes.
        ray_tmp = tempfile.mkdtemp(prefix="nfpi-ray-", dir="/tmp")
        log_path = tmp_path / f"head{len(heads)}.log"
        head_log = open(log_path, "w")  # noqa: SIM115 - closed at teardown
        head = subprocess.Popen(
            [
                str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}",
                f"--dashboard-port={dash}", "--include-dashboard=true",
                # Every port the head opens is a free one: the default agent ports (52365, ...)
                # belong to the suite's own Ray session, and a head whose dashboard agent cannot
                # bind its port never accepts a job ("No available agent to submit job").
                *(
                    f"--{flag}={p}"
                    for flag, p in zip(
                        ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                         "runtime-env-agent-port", "metrics-export-port"),
                        agent_ports,
                        strict=True,
                    )
                ),
                "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={ray_tmp}",
            ],
            env=env,
            stdout=head_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        heads.append((head, head_log, ray_tmp))

        def submit(*entrypoint):
            cmd = [
                str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                "--working-dir", str(root), "--", *entrypoint,
            ]  # fmt: skip
            deadline = time.monotonic() + 120  # the job server and its agent take seconds
            while True:
                out = subprocess.run(
                    cmd, env=env, capture_output=True, text=True, timeout=600, check=False
                )
                starting = (
                    "Connection refused" in out.stdout + out.stderr
                    or "ConnectionError" in out.stderr
                    or "try again later" in out.stderr  # the job agent has not registered yet
                )
                if not starting or time.monotonic() > deadline:
                    out.head_log = log_path
                    return out
                time.sleep(2)

        submit.session_dir = Path(ray_tmp)
        return submit

    def stop():
        """End every head this test started: its Ray session and session folder are gone.

        SIGTERM first; a head that has not ended a few seconds later (its graceful stop waits
        on each process in turn, half a minute on a loaded machine) has its process group
        killed, and any process of the session left outside that group, by its temp dir."""
        from rehearsals.multinode import end_processes

        for head, head_log, ray_tmp in heads:
            if head_log.closed:
                continue
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(head.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            head.wait(timeout=60)
            end_processes(ray_tmp)
            head_log.close()
            shutil.rmtree(ray_tmp, ignore_errors=True)

    start.stop = stop
    yield start
    stop()
