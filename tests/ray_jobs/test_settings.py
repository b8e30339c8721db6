"""The MLflow store is checked before Ray starts (issue 22): a corrupt ``mlflow.db`` and a
tracking server that does not answer are one line each, in bounded time."""

import socket
import threading

import pytest

import ray_jobs.train as train_cli
from nfpi.entry import run_cli
from nfpi.errors import ConfigError
from ray_jobs.settings import check_tracking


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if the command gets as far as starting or joining Ray."""

    def connect(*args, **kwargs):
        raise AssertionError("Ray was started before the store was checked")

    monkeypatch.setattr(train_cli, "connect", connect)


def _errors(capsys):
    return [x for x in capsys.readouterr().err.splitlines() if "error" in x]


def test_a_corrupt_mlflow_db_is_one_line_before_ray(tmp_path, no_ray, capsys):
    """Before: an 89-line traceback, after Ray had started. Now one line naming the file."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "mlflow.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 40)
    argv = ["--smoke-test", "--results-dir", str(results)]
    assert run_cli(train_cli.main, argv, prog="ray_jobs/train.py") == 2
    (line,) = _errors(capsys)
    assert "mlflow.db" in line and "corrupt" in line and "mv " in line


def test_a_closed_tracking_server_is_one_line_before_ray(tmp_path, no_ray, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    argv = ["--smoke-test", "--results-dir", str(tmp_path), "--tracking-uri"]
    argv.append(f"http://user:pw@127.0.0.1:{port}")
    assert run_cli(train_cli.main, argv, prog="ray_jobs/train.py") == 2
    (line,) = _errors(capsys)
    assert f"http://127.0.0.1:{port}" in line and "pw" not in line.split("error")[1]
    assert "start the tracking server" in line


def test_a_tracking_server_that_never_answers_is_refused_after_the_timeout():
    """Before: a server that accepted connections and never answered stalled the command for
    more than 200 s. Now the check gives up after its timeout (NFPI_TRACKING_TIMEOUT)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts (the kernel's backlog) and never replies
    held = []
    stop = threading.Event()

    def hold():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        with pytest.raises(ConfigError, match="none did within 1 s"):
            check_tracking(f"http://127.0.0.1:{port}", timeout=1.0)
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_healthy_store_passes(tmp_path, _mlflow_template):
    check_tracking(f"sqlite:///{_mlflow_template}")
    check_tracking(f"sqlite:///{tmp_path / 'new.db'}")  # MLflow creates it
