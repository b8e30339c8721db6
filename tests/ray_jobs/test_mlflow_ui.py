"""The MLflow UI as a browser shows it (headless Chromium): a sweep's link opens its trials in
the training view with their params and metrics, the parent run shows the comparison plot and
the best values, a child run its pictures, datasets and model. The store is made by the same
logging calls a sweep makes (without Ray, seconds); ``tests/mlflow_ui_check.py`` runs the same
check on a real sweep's store. Skipped where Chromium is not installed."""

import json

import pytest

from nfpi.checks import train_set_size
from nfpi.presets import experiment_config
from nfpi.training import Trainer
from ray_jobs.mlflow_logging import log_datasets, log_flow_model, log_sweep_summary, save_sweep_view
from ray_jobs.tracking import RunLogger, start_run
from tests.cdp import chromium_binary
from tests.mlflow_ui_check import check_ui

pytestmark = pytest.mark.slow  # trains a flow, starts `mlflow ui` and a browser


def _sweep_store(tracking, tmp_path):
    """A smoke sweep's MLflow records: parent run, two labelled child runs (params, per-epoch
    metrics, pictures, datasets, model), the parent's comparison and the saved view."""
    parent_id = start_run(tracking, "smoke", tags={"nfpi.sweep": "smoke", "nfpi.space": "smoke"})
    parent = RunLogger(tracking, parent_id)
    rows, curves = [], {}
    for method in ("data-init", "fpi"):
        config = experiment_config("smoke", {"prior.method": method, "optim.epochs": 2})
        run_dir = tmp_path / method
        history = Trainer(config, run_dir).fit()
        run_id = start_run(tracking, f"smoke-{method}", parent_run_id=parent_id,
                           display_name=method)  # fmt: skip
        child = RunLogger(tracking, run_id)
        child.params(config.flat())
        for metrics in history:
            child.metrics(metrics, step=int(metrics["epoch"]))
        for png in sorted((run_dir / "plots").glob("*.png")):
            child.artifact(png, "plots")
        log_datasets(tracking, run_id, config, shape=(1, 8, 8), num_classes=10,
                     train_size=train_set_size(config), test_size=100)  # fmt: skip
        log_flow_model(tracking, run_id, run_dir)
        child.finish()
        rows.append({"label": method, "group": method, "status": "ok", "metrics": history[-1]})
        curves[method] = history
    log_sweep_summary(parent, title="smoke", table="| smoke |", rows=rows, curves=curves,
                      metric="nf_acc", mode="max")  # fmt: skip
    save_sweep_view(tracking, sweep="smoke", parent_run_id=parent_id, group_by="prior.method",
                    params=["prior.method"], metrics=["nf_acc", "test_bpd"])  # fmt: skip
    parent.finish()


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium (apt-get install chromium)")
def test_the_mlflow_ui_shows_the_sweep_the_comparison_and_the_pictures(tracking, tmp_path):
    _sweep_store(tracking, tmp_path / "runs")
    shots = tmp_path / "shots"
    shots.mkdir()
    rows = check_ui(tracking.uri, tracking.experiment, shots, tmp_path)
    failed = [r for r in rows if not r[1]]
    assert not failed, json.dumps(rows, indent=1)
    names = {p.name for p in shots.glob("*.png")}
    assert {"runs.png", "parent_comparison.png", "child_pictures.png"} <= names
