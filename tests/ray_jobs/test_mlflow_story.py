"""What a run tells in MLflow (issue 21): the registered final model with its epoch's metrics, a
signature and an input example; the source and command line of every run; system metrics; a
sweep view without the parent's extra group."""

import json
import subprocess
import sys

import mlflow
import pytest

from nfpi.checkpoint import load_checkpoint, save_checkpoint
from ray_jobs.mlflow_logging import (
    VIEW_TAG_PREFIX,
    ensure_registered_model,
    log_flow_model,
    model_alias,
    save_sweep_view,
)
from ray_jobs.tracking import (
    COMMAND_TAG,
    RunLogger,
    resolve_tracking,
    source_tags,
    start_run,
    system_metrics,
)


def _two_epochs(checkpoint, tmp_path):
    """The smoke checkpoint re-saved as the end of a 2-epoch run (epoch 1 its last)."""
    state = load_checkpoint(checkpoint)
    state.pop("_file", None)
    first = dict(state["history"][-1])
    state["history"] = [{**first, "epoch": 0.0}, {**first, "epoch": 1.0}]
    state["epoch"] = 2
    save_checkpoint(tmp_path / "run", state)
    return tmp_path / "run"


def test_registered_model_is_the_final_epoch_with_signature_example_and_alias(
    tracking, checkpoint, tmp_path
):
    run_dir = _two_epochs(checkpoint, tmp_path)
    run_id = start_run(tracking, "digits-00001", display_name="fpi lam=300")
    logger = RunLogger(tracking, run_id)
    logger.metrics({"nf_acc": 0.914, "epoch": 0.0}, step=0)
    logger.metrics({"nf_acc": 0.983, "epoch": 1.0}, step=1)
    ensure_registered_model(tracking, "nfpi-digits", "digits")
    ensure_registered_model(tracking, "nfpi-digits", "digits")  # a second call is a no-op
    uri = log_flow_model(tracking, run_id, run_dir, "nfpi-digits", alias="fpi lam=300")
    client = tracking.client()
    model = client.get_logged_model(uri.split("/")[-1])
    # The logged model carries the final epoch's metrics (MLflow's default linked step 0's).
    assert {(m.key, m.step, m.value) for m in model.metrics} == {
        ("nf_acc", 1, 0.983),
        ("epoch", 1, 1.0),
    }
    mlflow.set_tracking_uri(tracking.uri)
    try:
        info = mlflow.models.get_model_info(uri)
    finally:
        mlflow.set_tracking_uri(None)
    assert info.signature is not None and info.saved_input_example_info is not None
    spec = info.signature.inputs.inputs[0]
    assert str(spec.type) == "uint8" and spec.shape == (-1, 1, 8, 8)
    assert [p.name for p in info.signature.params] == ["seed"]
    assert model_alias("fpi lam=300") == "fpi-lam-300" and model_alias("v1") == "run-v1"
    version = client.get_model_version_by_alias("nfpi-digits", "fpi-lam-300")
    assert version.run_id == run_id and version.tags["epoch"] == "1"
    assert "nf_acc 0.9830" in version.description


def test_runs_carry_mlflow_source_tags_and_the_command_line(tmp_path):
    tags = source_tags()
    assert tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    assert sys.argv[0].split("/")[-1] in tags[COMMAND_TAG]
    tracking = resolve_tracking(tmp_path, None, "nfpi-test")
    run = tracking.client().get_run(start_run(tracking, "r"))
    assert run.data.tags["mlflow.source.name"] == tags["mlflow.source.name"]
    assert run.data.tags["nfpi.run_name"] == "r"


def test_a_script_in_a_git_checkout_gets_commit_and_dirty_flag(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    script = repo / "main.py"
    script.write_text(
        "import json\nfrom ray_jobs.tracking import source_tags\nprint(json.dumps(source_tags()))\n"
    )
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "main.py"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)

    def tags():
        out = subprocess.run([sys.executable, str(script), "--flag"], capture_output=True,
                             text=True, check=True, cwd=tmp_path)  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    clean = tags()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert clean["mlflow.source.git.commit"] == head
    assert clean["nfpi.source.git.dirty"] == "false"
    assert clean[COMMAND_TAG].endswith("main.py --flag")
    script.write_text(script.read_text() + "# edited\n")
    assert tags()["nfpi.source.git.dirty"] == "true"


def test_system_metrics_are_logged_even_for_a_block_shorter_than_one_interval(tracking):
    """MLflow's monitor publishes every 10 s and drops what it collected after its last
    publish: a smoke run (seconds) logged no system metrics before the last interval was
    published at the block's end."""
    pytest.importorskip("psutil")
    run_id = start_run(tracking, "r")
    with system_metrics(tracking, run_id):
        pass  # far shorter than the 10 s interval
    keys = set(tracking.client().get_run(run_id).data.metrics)
    assert "system/cpu_utilization_percentage" in keys
    assert "system/system_memory_usage_megabytes" in keys


def test_the_sweep_view_is_not_ordered_by_start_time(tracking):
    """Ordered by start time, MLflow 3.17's UI also loads the trials' parent run to nest them:
    the parent (no prior.method param) showed as an extra group "Additional runs"."""
    key = save_sweep_view(tracking, sweep="digits", parent_run_id="abcdef0123456789",
                          group_by="prior.method", params=["prior.method"],
                          metrics=["nf_acc", "test_bpd"])  # fmt: skip
    tags = tracking.client().get_experiment(tracking.experiment_id()).tags
    state = json.loads(json.loads(tags[VIEW_TAG_PREFIX + key])["state"])
    assert state["orderByKey"] == "metrics.`nf_acc`" and state["orderByAsc"] is False
