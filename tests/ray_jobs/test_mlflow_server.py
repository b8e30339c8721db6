"""Many writers, one MLflow tracking server (cluster mode, issue 21): trials in separate processes
log at once to an ``mlflow server`` with MLflow's basic-auth app, as ``cluster.yaml`` runs it on
the head node; no metric is lost or written twice, and a request without credentials is refused.
"""

import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from ray_jobs.tracking import RunLogger, Tracking, start_run

PROCESSES, STEPS = 4, 12
USER = "nfpi-test"
# MLflow's basic-auth app needs Flask-WTF (the `mlflow[auth]` extra, in `.[dev]` and
# `.[cluster]`); without it the server runs without authentication and the test says so.
AUTH = importlib.util.find_spec("flask_wtf") is not None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch):
    """An ``mlflow server --app-name basic-auth`` on 127.0.0.1 (SQLite on local disk, proxied
    artifacts), stopped at the end; this process and its children get its credentials."""
    port, password = _free_port(), secrets.token_hex(16)
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = {USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request's password check is a slow PBKDF2 hash; cache it (as cluster.yaml does).
        "auth_cache_ttl_seconds = 300\n"
    )
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         *(["--app-name", "basic-auth"] if AUTH else []), "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:  # up when /health answers (migrations and workers take seconds)
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()


def _trial(tracking, parent_id, index, barrier, errors):
    """One trial: its own run under the sweep's parent, STEPS epochs of metrics, then done."""
    try:
        run_id = start_run(tracking, f"trial-{index}", parent_run_id=parent_id)
        logger = RunLogger(tracking, run_id)
        barrier.wait()  # every trial logs at the same time
        for step in range(STEPS):
            logger.metrics({"nf_acc": index + step / 100, "test_bpd": 2.0 + step}, step=step)
        logger.finish()
    except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
        errors.put(f"trial {index}: {type(error).__name__}: {str(error)[:300]}")


@pytest.mark.slow
def test_trials_log_at_once_to_a_tracking_server_with_nothing_lost_or_doubled(mlflow_server):
    import multiprocessing

    if AUTH:
        with pytest.raises(urllib.error.HTTPError) as refused:  # no credentials, no access
            urllib.request.urlopen(f"{mlflow_server}/api/2.0/mlflow/experiments/search")
        assert refused.value.code == 401
    tracking = Tracking(uri=mlflow_server, experiment="nfpi-server")
    parent_id = start_run(tracking, "sweep")  # the driver creates the experiment once
    context = multiprocessing.get_context("spawn")
    barrier, errors = context.Barrier(PROCESSES), context.Queue()
    trials = [
        context.Process(target=_trial, args=(tracking, parent_id, i, barrier, errors))
        for i in range(PROCESSES)
    ]
    for trial in trials:
        trial.start()
    for trial in trials:
        trial.join(timeout=300)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == [] and [t.exitcode for t in trials] == [0] * PROCESSES
    client = tracking.client()
    children = client.search_runs(
        [tracking.experiment_id()], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert sorted(r.data.tags["nfpi.run_name"] for r in children) == [
        f"trial-{i}" for i in range(PROCESSES)
    ]
    for run in children:
        index = int(run.data.tags["nfpi.run_name"].split("-")[1])
        assert run.info.status == "FINISHED"
        want = {
            "nf_acc": [(s, index + s / 100) for s in range(STEPS)],
            "test_bpd": [(s, 2.0 + s) for s in range(STEPS)],
        }
        for key, expected in want.items():
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted((m.step, m.value) for m in history) == expected, key  # once, exact
