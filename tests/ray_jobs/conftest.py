"""Fixtures of the Ray service's tests."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class FinishedRun:
    """A finished Ray Train run: what started it, where it wrote, its final state."""

    config: Any  # nfpi.config.ExperimentConfig
    settings: Any  # ray_jobs.settings.RaySettings
    tracking: Any  # ray_jobs.tracking.Tracking
    name: str
    state: dict  # the final checkpoint, loaded when the run ended


@pytest.fixture(scope="session")
def uninterrupted_run(ray_session, tmp_path_factory, _mlflow_template):
    """The smoke experiment (3 epochs, no pictures) on 2 workers with MLflow on, never
    interrupted, run once for the session: interrupted runs of the same config must end with
    its ``state`` bit for bit (tests/ray_jobs/test_recovery.py), and
    tests/ray_jobs/test_resume_mlflow.py then resumes the run itself from an earlier epoch
    (which changes its files and MLflow run, not ``state``, loaded here)."""
    import shutil

    from mlflow.tracking import MlflowClient

    from nfpi.checkpoint import load_checkpoint
    from nfpi.presets import experiment_config
    from ray_jobs.settings import RaySettings
    from ray_jobs.tracking import Tracking
    from ray_jobs.train import run_experiment

    tmp = Path(tmp_path_factory.mktemp("uninterrupted"))
    shutil.copy(_mlflow_template, tmp / "mlflow.db")
    tracking = Tracking(f"sqlite:///{tmp / 'mlflow.db'}", "ref", (tmp / "art").as_uri())
    config = experiment_config("smoke", {"eval.plots": False, "optim.epochs": 3})
    settings = RaySettings(results_dir=tmp / "results", tracking=tracking, num_workers=2)
    result = run_experiment(config, settings, "reference")
    client = MlflowClient(tracking.uri)
    (run,) = client.search_runs([tracking.experiment_id()])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [0, 1, 2]
    state = load_checkpoint(result.checkpoint.path)
    return FinishedRun(config, settings, tracking, "reference", state)
