"""What a new user meets first: where results go, what the first lines say, and one clear line
for each common mistake (issue 21)."""

import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nfpi.errors import ClusterStartError, ConfigError
from ray_jobs.settings import (
    HOME_RESULTS,
    RESULTS_ENV,
    check_reachable,
    default_results_dir,
    results_dir_of,
)
from ray_jobs.tracking import ui_command


# ------------------------------------------------------------------------ the results' default
def test_results_default_is_nfpi_results_then_home_under_a_job_then_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for key in (RESULTS_ENV, "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(key, raising=False)
    assert default_results_dir() == tmp_path / "results"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what a submitted job has
    assert default_results_dir() == Path(HOME_RESULTS).expanduser()
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "shared"))
    assert default_results_dir() == tmp_path / "shared"
    assert results_dir_of(None) == tmp_path / "shared"
    assert results_dir_of(str(tmp_path / "x")) == tmp_path / "x"  # the flag wins


def test_results_dir_that_is_a_file_is_one_line(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    for given in (file, file / "sub"):
        with pytest.raises(ConfigError, match="is a file"):
            results_dir_of(str(given))


def test_ui_command_is_venv_qualified_and_names_the_port():
    cmd = ui_command("sqlite:////tmp/r/mlflow.db", port=5001)
    assert "mlflow ui --backend-store-uri sqlite:////tmp/r/mlflow.db" in cmd
    assert cmd.endswith("--port 5001") and os.path.isabs(cmd.split()[0])
    assert "tracking server" in ui_command("http://10.0.0.1:5000")


def test_unreachable_address_fails_fast_in_one_line():
    with pytest.raises(ClusterStartError, match="cannot reach Ray at ray://nowhere.invalid:10001"):
        check_reachable("ray://nowhere.invalid:10001", timeout=2)
    with pytest.raises(ClusterStartError, match="not a Ray address"):
        check_reachable("ray://a b:c")


# --------------------------------------------------------------------- ray job submit, no flag
@pytest.mark.slow
@pytest.mark.cluster
def test_job_without_results_dir_keeps_its_results_after_the_session(tmp_path, ray_head):
    """The README's `ray job submit -- python ray_jobs/sweep.py` with no --results-dir: the
    results land in ~/nfpi-results (HOME is a temporary folder here), the job's first lines say
    so with the `mlflow ui` command, and they are there after the Ray session has ended."""
    home = tmp_path / "home"
    home.mkdir()
    submit = ray_head(HOME=str(home))
    out = submit("python", "ray_jobs/train.py", "--smoke-test", "--set", "eval.plots=false")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = home / "nfpi-results"
    log = out.stdout + out.stderr
    first = [line for line in log.splitlines() if "results:" in line or "MLflow:" in line]
    assert f"results: {results}" in first[0]
    assert f"mlflow ui --backend-store-uri sqlite:///{results}/mlflow.db" in first[1]
    session = submit.session_dir
    assert session.exists() and results not in (session, *results.parents)
    ray_head.stop()  # the Ray session ends: its folder (and the job's working dir) is gone
    assert not session.exists()
    client = MlflowClient(f"sqlite:///{results}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert "nf_acc" in runs[0].data.metrics
    assert any((results / "runs").glob("*/checkpoints"))
