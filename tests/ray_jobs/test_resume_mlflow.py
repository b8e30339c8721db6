"""Epochs that a resume trains again replace their MLflow values: no step twice, none missing
(issue 22). MLflow cannot delete logged values, so the run is superseded by a new one."""

import pytest
from mlflow.tracking import MlflowClient

from nfpi.checkpoint import checkpoint_epoch
from nfpi.errors import CheckpointError
from ray_jobs.tracking import RunLogger, start_run
from ray_jobs.train import _EpochsToMLflow, current_run, run_experiment


def _history(n, offset=0.0):
    return [{"epoch": float(e), "train_bpd": 5.0 - e + offset} for e in range(n)]


def _values(tracking, run_id, key="train_bpd"):
    history = MlflowClient(tracking.uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def test_epochs_trained_again_replace_their_values_once(tracking):
    """Before: a resume from epoch 2 of a run that had logged epochs 0-3 skipped the steps it
    trained again (MLflow kept the abandoned values); logging them would have given two values
    per step. Now the run is superseded: the new run holds every step once, the new values."""
    run_id = start_run(tracking, "r", resume=True)
    epochs = _EpochsToMLflow(RunLogger(tracking, run_id))
    for e in range(4):
        epochs.trained(e, _history(e + 1), workers=1)
    assert [s for s, _ in _values(tracking, run_id)] == [0, 1, 2, 3]

    # A re-launch resumed from the checkpoint after 2 epochs trains epochs 2 and 3 again.
    again = _EpochsToMLflow(RunLogger(tracking, current_run(tracking, run_id)))
    rerun = _history(2) + _history(4, offset=0.5)[2:]
    again.trained(2, rerun[:3], workers=1)
    again.trained(3, rerun, workers=1)
    new_id = current_run(tracking, run_id)
    assert new_id != run_id and again.logger.run_id == new_id
    assert _values(tracking, new_id) == [(e, m["train_bpd"]) for e, m in enumerate(rerun)]
    client = MlflowClient(tracking.uri)
    old = client.get_run(run_id)
    assert old.info.lifecycle_stage == "deleted"  # in MLflow's trash, restorable
    assert [s for s, _ in _values(tracking, run_id)] == [0, 1, 2, 3]  # nothing of it lost
    assert client.get_run(new_id).data.tags["nfpi.supersedes"] == run_id
    assert start_run(tracking, "r", resume=True) == new_id  # a later re-launch continues it


def test_an_epoch_trained_again_to_the_same_values_is_left_as_logged(tracking):
    """A deterministic re-run (a lost worker's group restarted from an earlier checkpoint)
    gives the same values: the run keeps them, and is not superseded."""
    run_id = start_run(tracking, "same")
    epochs = _EpochsToMLflow(RunLogger(tracking, run_id))
    for e in range(2):
        epochs.trained(e, _history(e + 1), workers=1)
    again = _EpochsToMLflow(RunLogger(tracking, run_id))
    again.trained(1, [{**m, "epoch_seconds": 9.0} for m in _history(2)], workers=2)
    assert current_run(tracking, run_id) == run_id
    assert [s for s, _ in _values(tracking, run_id)] == [0, 1]


def test_a_run_the_caller_owns_is_not_superseded_and_says_so(tracking):
    run_id = start_run(tracking, "owned")
    epochs = _EpochsToMLflow(RunLogger(tracking, run_id), supersede=False)
    for e in range(2):
        epochs.trained(e, _history(e + 1), workers=1)
    epochs = _EpochsToMLflow(RunLogger(tracking, run_id), supersede=False)
    epochs.trained(1, _history(2, offset=1.0), workers=1)
    assert current_run(tracking, run_id) == run_id
    assert [s for s, _ in _values(tracking, run_id)] == [0, 1]
    assert (
        "trained again" in MlflowClient(tracking.uri).get_run(run_id).data.tags["nfpi.rerun_epochs"]
    )


@pytest.mark.slow
def test_ray_run_resume_from_an_earlier_epoch_and_refusal_of_lost_history(uninterrupted_run):
    """``ray_jobs/train.py --resume-from 1`` (``run_experiment(resume_from=1)``) of a finished
    3-epoch run (2 workers; the session's uninterrupted run, tests/ray_jobs/conftest.py) trains
    epochs 1 and 2 again although Ray Train holds a registered checkpoint of epoch 3; MLflow's
    current run has steps 0, 1 and 2 once each. A run directory whose checkpoints are gone (and
    Ray's folder too) is refused in one named error, not trained from epoch 0."""
    config, settings, tracking = (
        uninterrupted_run.config,
        uninterrupted_run.settings,
        uninterrupted_run.tracking,
    )
    name = uninterrupted_run.name
    run_dir = settings.run_dir(name)
    assert checkpoint_epoch(run_dir) == 3 and config.optim.lr == 1e-2
    (first,) = [
        r.info.run_id for r in MlflowClient(tracking.uri).search_runs([tracking.experiment_id()])
    ]
    # Epochs 1 and 2 again with another learning rate: other values, which replace the first.
    run_experiment(config, settings, name, resume_from="1", resume_overrides={"optim.lr": 5e-3})
    run_id = current_run(tracking, first)
    assert run_id != first
    lr = MlflowClient(tracking.uri).get_metric_history(run_id, "lr")
    assert sorted((m.step, m.value) for m in lr) == [(0, 1e-2), (1, 5e-3), (2, 5e-3)]
    assert [s for s, _ in _values(tracking, run_id, "epoch")] == [0, 1, 2]
    assert MlflowClient(tracking.uri).get_run(run_id).info.status == "FINISHED"
    assert checkpoint_epoch(run_dir) == 3
    assert list(settings.storage.glob(f"{name}.previous-*"))  # Ray's folder set aside, not deleted

    import shutil

    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(settings.storage / name)
    with pytest.raises(CheckpointError, match="--fresh"):
        run_experiment(config, settings, name)
    assert not (run_dir / "checkpoints").exists()
