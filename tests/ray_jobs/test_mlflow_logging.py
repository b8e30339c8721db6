"""What a run leaves in MLflow: the training view's tag, labelled child runs, datasets, the flow
and prior as a pyfunc model, and the sweep's comparison (ray_jobs.mlflow_logging)."""

import csv
import io
import json
import os

import mlflow
import numpy as np
import pytest
import torch

from nfpi.checkpoint import load_trained
from nfpi.data import dequantize
from nfpi.presets import experiment_config
from ray_jobs.mlflow_logging import (
    VIEW_TAG_PREFIX,
    log_datasets,
    log_flow_model,
    log_sweep_summary,
    save_sweep_view,
)
from ray_jobs.tracking import EXPERIMENT_TAGS, RunLogger, start_run, ui_url


def test_experiment_is_tagged_for_the_training_view_and_runs_carry_labels(tracking):
    client = tracking.client()
    client.create_experiment(tracking.experiment, artifact_location=tracking.artifact_root)
    experiment_id = tracking.experiment_id()  # an experiment made before the tag gets it
    assert client.get_experiment(experiment_id).tags.items() >= EXPERIMENT_TAGS.items()
    run_id = start_run(tracking, "digits-d2b87_00002", display_name="fpi lam=300")
    run = client.get_run(run_id)
    assert run.info.run_name == "fpi lam=300"
    assert run.data.tags["nfpi.run_name"] == "digits-d2b87_00002"
    link = ui_url(experiment_id, run_id)
    assert link.endswith(
        f"/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    )


def test_datasets_are_logged_once_as_inputs(tracking):
    run_id = start_run(tracking, "r")
    config = experiment_config("smoke")
    for _ in range(2):  # a re-launched run logs them once
        log_datasets(tracking, run_id, config, shape=(1, 8, 8), num_classes=10,
                     train_size=200, test_size=100)  # fmt: skip
    inputs = tracking.client().get_run(run_id).inputs.dataset_inputs
    got = {(d.dataset.name, d.tags[0].value): json.loads(d.dataset.profile) for d in inputs}
    assert got == {
        ("digits-train", "training"): {
            "num_rows": 200,
            "num_classes": 10,
            "image_shape": [1, 8, 8],
        },
        ("digits-test", "testing"): {"num_rows": 100, "num_classes": 10, "image_shape": [1, 8, 8]},
    }


def _log_datasets_in_step(tracking, run_ids, barrier, errors):
    """One trial's start per run: all processes log a new selection at the same moment."""
    import dataclasses

    config = experiment_config("smoke")
    for i, run_id in enumerate(run_ids):
        data = dataclasses.replace(config.data, items_per_class=10 + i, test_items_per_class=5 + i)
        barrier.wait()
        try:
            log_datasets(tracking, run_id, dataclasses.replace(config, data=data),
                         shape=(1, 8, 8), num_classes=10, train_size=200, test_size=100)  # fmt: skip
        except Exception as error:  # noqa: BLE001 - reported to the test, which fails on it
            errors.put(f"round {i}: {type(error).__name__}: {str(error)[:200]}")


@pytest.mark.slow  # trials in subprocesses
def test_trials_starting_together_log_the_same_dataset_without_a_conflict(tracking):
    """Regression (CI, stop 16): a sweep's trials start at once and log the same dataset into
    one experiment; MLflow checks for it, then inserts it, so the slower trial died of
    ``UNIQUE constraint failed: datasets...``. Here 4 processes do it 8 times in step; before
    the fix nearly every round failed."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes, rounds = 4, 8
    runs = [[start_run(tracking, f"t{p}-r{r}") for r in range(rounds)] for p in range(processes)]
    barrier, errors = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_log_datasets_in_step, args=(tracking, ids, barrier, errors))
        for ids in runs
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
    assert [worker.exitcode for worker in workers] == [0] * processes
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert failures == []
    client = tracking.client()
    for ids in runs:  # every trial has its round's two datasets
        for run in ids:
            assert len(client.get_run(run).inputs.dataset_inputs) == 2
    digests = {d.dataset.digest for ids in runs for run in ids
               for d in client.get_run(run).inputs.dataset_inputs}  # fmt: skip
    assert len(digests) == 2 * rounds  # and trials of one round share them


def test_the_final_flow_is_a_pyfunc_model_that_classifies_and_samples(tracking, checkpoint):
    run_id = start_run(tracking, "r")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    uri = log_flow_model(tracking, run_id, checkpoint, registered_model="nfpi-smoke")
    # Logging leaves the process's tracking URI as it found it (a later run logs where it
    # was told to); a reader names the store.
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    mlflow.set_tracking_uri(tracking.uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before
    trained = load_trained(checkpoint)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        z, _ = trained.flow(dequantize(images, torch.Generator().manual_seed(0)))
        want = trained.prior.classify(z).numpy()
    np.testing.assert_array_equal(model.predict(images.numpy()), want)
    flow = model.unwrap_python_model()
    samples = flow.sample([3, 4], n=5, temperature=0.7)
    assert samples.shape == (10, 1, 8, 8) and samples.dtype == np.uint8
    again = flow.predict(None, {"class": [3, 4], "n": 5, "temperature": 0.7})
    np.testing.assert_array_equal(samples, again)  # seeded
    versions = tracking.client().search_model_versions("name='nfpi-smoke'")
    assert [v.run_id for v in versions] == [run_id]


def test_the_sweep_parent_carries_table_csv_plot_and_best_values(tracking, tmp_path):
    parent = RunLogger(tracking, start_run(tracking, "digits"))
    rows = [
        {"label": "gd", "group": "gd", "status": "ok", "metrics": {"nf_acc": 0.91, "epoch": 1.0}},
        {"label": "fpi lam=300", "group": "fpi", "status": "ok", "metrics": {"nf_acc": 0.89}},
        {"label": "fpi lam=10", "group": "fpi", "status": "ok", "metrics": {"nf_acc": 0.85}},
        {"label": "data-init", "group": "data-init", "status": "error", "metrics": {}},
    ]
    curves = {"gd": [{"epoch": 0.0, "nf_acc": 0.8, "test_bpd": 7.0},
                     {"epoch": 1.0, "nf_acc": 0.91, "test_bpd": 6.9}],
              "fpi lam=300": [{"epoch": 0.0, "nf_acc": 0.89, "test_bpd": 7.1}]}  # fmt: skip
    log_sweep_summary(parent, title="digits", table="| table |", rows=rows, curves=curves,
                      metric="nf_acc", mode="max")  # fmt: skip
    client = tracking.client()
    arts = {a.path for a in client.list_artifacts(parent.run_id)}
    assert arts == {"results.md", "results.csv", "comparison.png"}
    path = client.download_artifacts(parent.run_id, "results.csv", str(tmp_path))
    with open(path) as f:
        table = list(csv.DictReader(io.StringIO(f.read())))
    assert [r["trial"] for r in table] == ["gd", "fpi lam=300", "fpi lam=10", "data-init"]
    metrics = client.get_run(parent.run_id).data.metrics
    assert metrics == {"best_nf_acc": 0.91, "best_nf_acc.gd": 0.91, "best_nf_acc.fpi": 0.89}


def test_the_sweep_view_shows_its_trials_grouped_with_params_and_metrics(tracking):
    key = save_sweep_view(tracking, sweep="table2", parent_run_id="abcdef0123456789",
                          group_by="prior.method", params=["prior.method", "prior.objective.lam"],
                          metrics=["nf_acc", "test_bpd"])  # fmt: skip
    tags = tracking.client().get_experiment(tracking.experiment_id()).tags
    envelope = json.loads(tags[VIEW_TAG_PREFIX + key])
    state = json.loads(envelope["state"])
    assert state["selectedColumns"][:4] == [
        "params.`prior.method`", "params.`prior.objective.lam`", "metrics.`nf_acc`",
        "metrics.`test_bpd`",
    ]  # fmt: skip
    assert state["searchFilter"] == "tags.`mlflow.parentRunId` = 'abcdef0123456789'"
    assert state["groupBy"]["groupByKeys"] == [{"mode": "param", "groupByData": "prior.method"}]
    assert ui_url("1", view=key).endswith(f"workflowType=machine_learning&viewStateShareKey={key}")


@pytest.fixture(autouse=True)
def _no_fluent_run_left():
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
