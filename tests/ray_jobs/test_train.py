"""The Ray service end to end: prior actor, data-parallel Train runs, failures, sweep, jobs.

Real Ray runs are kept to a handful and share one Ray session (``ray_session``).
"""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from nfpi.checkpoint import load_checkpoint
from nfpi.config import PriorConfig
from nfpi.errors import ConfigError
from nfpi.presets import experiment_config
from nfpi.prior import ClassStatistics, PriorService
from nfpi.training import Trainer
from ray_jobs.prior_actor import ActorPriorClient, PriorActorTimeoutError, create_prior_actor
from ray_jobs.settings import RaySettings
from ray_jobs.train import run_experiment

ROOT = Path(__file__).resolve().parents[2]


def _stats(seed=0, k=4, d=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(200) % k
    z = 0.5 * torch.randn(k, d, generator=g, dtype=torch.float64)[y] + torch.randn(
        200, d, generator=g, dtype=torch.float64
    )
    return ClassStatistics.from_batch(z, y, k)


def _smoke(**overrides):
    return experiment_config("smoke", {"eval.plots": False, "optim.epochs": 3, **overrides})


def _settings(tmp_path, tracking=None, **kwargs):
    return RaySettings(results_dir=tmp_path / "results", tracking=tracking, **kwargs)


def _poll(condition, what, timeout=120.0):
    """Wait until ``condition()`` holds (polled), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ----------------------------------------------------------------------------------- prior actor
def test_actor_client_reseeds_a_restarted_actor(ray_session):
    actor = create_prior_actor(PriorConfig(method="gd"), 4, 3)
    client = ActorPriorClient(actor, timeout_s=60)
    reference = PriorService("gd", 4, 3)
    stats = _stats()
    assert client.initialize(stats).version == reference.initialize(stats).version == 1
    client.update(stats)
    reference.update(stats)
    ray_session.kill(actor, no_restart=False)  # Ray restarts it, without its state

    def restarted():
        try:
            return ray_session.get(actor.state_dict.remote(), timeout=5)["version"] == 0
        except ray_session.exceptions.RayActorError:
            return False  # still restarting

    _poll(restarted, "the actor's restart")
    got, want = client.update(stats), reference.update(stats)
    assert client.reseeds == 1 and got.version == want.version == 3
    for key in want.prior:  # the GD optimiser state was re-seeded too: same third step
        torch.testing.assert_close(got.prior[key], want.prior[key], rtol=1e-12, atol=1e-12)


def test_actor_timeout_is_a_clear_error(ray_session):
    @ray_session.remote(num_cpus=0)
    class Slow:
        def reset(self):
            pass

        def initialize(self, stats):
            time.sleep(30)

        def state_dict(self):
            return {"version": 0}

    slow = Slow.remote()
    ray_session.get(slow.state_dict.remote())  # started (actor start-up may take seconds)
    client = ActorPriorClient(slow, timeout_s=2.0)
    with pytest.raises(PriorActorTimeoutError, match="did not answer initialize within"):
        client.initialize(_stats())


# ------------------------------------------------------------------------------- Train runs
def test_two_worker_run_with_prior_actor_end_to_end(ray_session, tmp_path, tracking):
    config = _smoke(**{"prior.method": "data-init", "optim.epochs": 2, "eval.plots": True})
    settings = _settings(tmp_path, tracking, num_workers=2)
    result = run_experiment(config, settings, "two")
    assert result.error is None and result.metrics["epoch"] == 1.0
    assert 0 <= result.metrics["nf_acc"] <= 1 and result.checkpoint is not None
    # The run's files are under results/runs/<name>, not in a temporary directory.
    run_dir = settings.run_dir("two")
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "plots" / "tsne.png").exists()
    # The data-init prior from two workers' all-reduced statistics equals one process's.
    state = load_checkpoint(result.checkpoint.path)
    single = Trainer(config.with_overrides({"optim.epochs": 1}), tmp_path / "single")
    single.fit()
    for key in ("means", "var"):
        torch.testing.assert_close(
            state["prior"][key], single.prior.state_dict()[key], rtol=1e-5, atol=1e-6
        )
    # MLflow: every config value as a param, per-epoch metrics, pictures, prior, checkpoint pointer.
    client = MlflowClient(tracking.uri)
    (run,) = client.search_runs([tracking.experiment_id()])
    assert run.info.status == "FINISHED"
    assert run.data.params["prior.method"] == "data-init" and len(run.data.params) >= len(
        config.flat()
    )
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_bpd")] == [0, 1]
    assert {"nf_acc", "train_bpd", "kl_min", "kl_mean", "lr"} <= set(run.data.metrics)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "final_checkpoint.txt", "metrics.jsonl"} <= arts
    assert any(a.path.endswith("tsne.png") for a in client.list_artifacts(run.info.run_id, "plots"))
    assert run.data.tags["final_checkpoint"] == result.checkpoint.path
    if importlib.util.find_spec("psutil") is not None:  # MLflow's system metrics of rank 0
        assert "system/cpu_utilization_percentage" in run.data.metrics


def test_killed_actor_is_reseeded_and_the_run_matches_an_uninterrupted_one(
    ray_session, tmp_path, tracking
):
    config = _smoke(**{"prior.method": "gd", "prior.gd.steps_per_solve": 5})

    def kill_actor(trainer, result):
        import ray

        if result.epoch == 0 and trainer.rank == 0:
            ray.kill(trainer.schedule.client.actor, no_restart=False)

    killed = run_experiment(
        config, _settings(tmp_path), "kill-actor", worker_callbacks=[kill_actor]
    )
    reference = Trainer(config, tmp_path / "reference").fit()
    assert killed.metrics["prior_version"] == reference[-1]["prior_version"] == 4.0
    for key in ("nf_acc", "test_bpd", "train_bpd", "kl_min"):
        assert killed.metrics[key] == pytest.approx(reference[-1][key], rel=1e-4), key


def test_killed_workers_resume_from_scratch_then_from_the_run_directory_like_an_uninterrupted_run(
    ray_session, tmp_path
):
    """The worker dies twice, each time at the end of an epoch, before reporting it; the
    restarted group resumes from the run directory's last good checkpoint, or, with no
    history at all, from scratch (prior actor reset):

    1. end of epoch 0, the run's checkpoints and metrics gone with it (nothing of the run
       reached its directory, and Ray Train registered nothing): the restart starts afresh;
    2. end of epoch 1 (Ray Train holds epoch 0's checkpoint, the run directory epoch 1's): the
       restart resumes from the run directory's checkpoints/epoch-0002.

    A directory with history but no loadable checkpoint is refused instead
    (tests/training/test_resume_history.py). When the run directory is lost but Ray Train
    registered a checkpoint, the group resumes from that one: tests/ray_jobs/test_recovery.py::
    test_killed_worker_in_a_two_worker_group_logs_each_step_once_and_ends_bit_identical (two
    workers, bit-identical to an uninterrupted run)."""
    config = _smoke(**{"prior.method": "fpi"})
    settings = _settings(tmp_path, max_failures=2)
    attempts = tmp_path / "attempts"
    attempts.mkdir()

    def crash_twice(trainer, result):  # runs in the worker: no globals of this test module
        import json
        import os
        import shutil
        import time

        seen = attempts / f"{os.getpid()}.json"
        if not seen.exists():  # the first epoch this worker process ends: where it started
            record = {"time": time.time(), "resumed_from": str(trainer.resumed_from)}
            seen.write_text(json.dumps(record))
        crashed = sorted(p.name for p in attempts.glob("crash-*"))
        if result.epoch == 0 and not crashed:
            (attempts / "crash-0").write_text(str(os.getpid()))
            # Nothing of the run reached its directory: the restart starts afresh.
            shutil.rmtree(trainer.run_dir / "checkpoints")
            (trainer.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            os._exit(1)  # the worker process dies before reporting this epoch
        if result.epoch == 1 and crashed == ["crash-0"]:
            (attempts / "crash-1").write_text(str(os.getpid()))
            os._exit(1)

    result = run_experiment(config, settings, "crash", worker_callbacks=[crash_twice])
    reference = Trainer(config, tmp_path / "reference").fit()
    assert (attempts / "crash-1").exists() and result.metrics["epoch"] == 2.0
    records = sorted(
        (json.loads(p.read_text()) for p in attempts.glob("*.json")), key=lambda r: r["time"]
    )
    resumed = [r["resumed_from"] for r in records]
    assert len(resumed) == 3 and resumed[:2] == ["None", "None"], resumed
    assert "checkpoints/epoch-0002" in resumed[2], resumed
    for key in ("nf_acc", "test_bpd", "train_bpd", "prior_version"):
        assert result.metrics[key] == pytest.approx(reference[-1][key], rel=1e-4), key


# ------------------------------------------------------------------------------------- sweep
def _sweep(space, tmp_path, tracking, *sets, resume=False):
    from ray_jobs.sweep import main as sweep_main

    args = [
        "--space",
        space,
        "--results-dir",
        str(tmp_path),
        "--tracking-uri",
        tracking.uri,
        "--mlflow-experiment",
        tracking.experiment,
    ]
    for item in sets:
        args += ["--set", item]
    assert sweep_main(args + ["--resume"] * resume) == 0


def test_smoke_sweep_killed_before_tune_saved_state_resumes_and_writes_parent_and_child_runs(
    ray_session, tmp_path, tracking, monkeypatch
):
    """The smoke sweep, first killed before Tune wrote its state, then resumed.

    Before: the killed sweep's parent MLflow run stayed RUNNING, and ``--resume`` of a sweep
    killed before Tune wrote its state failed with FileNotFoundError (tuner.pkl; the issue's
    report). Now the parent ends KILLED, and ``--resume`` starts the sweep afresh under the
    same name and parent run, which then holds what any sweep writes: child runs named after
    what they vary, registered models, the comparison, pictures and datasets. A second
    ``--resume`` of the finished sweep re-runs nothing; other overrides are refused. (A sweep
    launched once and left alone: test_downstream_sweep_reports_cnn_acc_and_logs_to_mlflow.)"""
    from ray_jobs import sweep

    def killed(address, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while connecting, before the Tuner exists

    monkeypatch.setattr(sweep, "connect", killed)
    with pytest.raises(KeyboardInterrupt):
        _sweep("smoke", tmp_path, tracking, "eval.plots=true")
    monkeypatch.undo()
    client = MlflowClient(tracking.uri)
    (parent,) = client.search_runs([tracking.experiment_id()])
    assert parent.info.status == "KILLED"
    assert not (tmp_path / "ray" / "smoke" / "tuner.pkl").exists()

    _sweep("smoke", tmp_path, tracking, "eval.plots=true", resume=True)
    runs = client.search_runs([tracking.experiment_id()])
    parents = [r for r in runs if "nfpi.sweep" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert [p.info.run_id for p in parents] == [parent.info.run_id]
    assert parents[0].info.status == "FINISHED" and len(children) == 2
    assert {c.data.params["prior.method"] for c in children} == {"data-init", "fpi"}
    # Registered by default: one version per trial, aliased by its label, from the final epoch.
    versions = {a: client.get_model_version_by_alias("nfpi-smoke", a) for a in ("data-init", "fpi")}
    assert {v.run_id for v in versions.values()} == {c.info.run_id for c in children}
    assert {v.tags["epoch"] for v in versions.values()} == {"1"}
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"nf_acc", "test_bpd", "train_bpd", "kl_min"} <= set(child.data.metrics)
        plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert any(p.endswith(".png") for p in plots)
    fpi = next(c for c in children if c.data.params["prior.method"] == "fpi")
    assert "fpi_iterations" in fpi.data.metrics
    # Child runs named after what they vary; the parent compares them (issue 12).
    assert {c.info.run_name for c in children} == {"data-init", "fpi"}
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} == {
        "results.md",
        "results.csv",
        "comparison.png",
    }
    assert {"best_nf_acc", "best_nf_acc.fpi", "best_nf_acc.data-init"} <= set(
        parents[0].data.metrics
    )
    experiment = client.get_experiment(tracking.experiment_id())
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert any(k.startswith("mlflow.sharedViewState.nfpi-smoke-") for k in experiment.tags)
    for child in children:  # the same pictures, datasets and a loadable model for every method
        assert {"kl_heatmap_final.png", "tsne.png"} <= {
            a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(child.info.run_id, "plots")
        }
        assert {d.dataset.name for d in child.inputs.dataset_inputs} == {
            "digits-train",
            "digits-test",
        }

    # --resume on a finished sweep restores it: same parent run, no trial re-run, same table.
    _sweep("smoke", tmp_path, tracking, "eval.plots=true", resume=True)
    again = client.search_runs([tracking.experiment_id()])
    assert {r.info.run_id for r in again} == {r.info.run_id for r in runs}
    for child in children:
        history = client.get_metric_history(child.info.run_id, "nf_acc")
        assert [m.step for m in history] == [0, 1]  # each epoch logged once
    # Resuming with other overrides would change the trials' configs halfway: refused.
    with pytest.raises(ConfigError, match="first launch's overrides"):
        _sweep("smoke", tmp_path, tracking, "eval.plots=false", resume=True)


def test_start_run_resume_reopens_the_run_of_the_same_name_and_parent(tracking):
    from ray_jobs.tracking import start_run

    parent = start_run(tracking, "sweep")
    first = start_run(tracking, "trial_1", parent_run_id=parent)
    tracking.client().set_terminated(first, "FAILED")
    assert start_run(tracking, "trial_1", parent_run_id=parent, resume=True) == first
    assert tracking.client().get_run(first).info.status == "RUNNING"
    others = {
        start_run(tracking, "trial_2", parent_run_id=parent, resume=True),  # another name
        start_run(tracking, "trial_1", resume=True),  # another parent (none)
        start_run(tracking, "trial_1", parent_run_id=parent),  # no resume: always new
    }
    assert first not in others and len(others) == 3


def test_sweep_rejects_bad_overrides_before_running(tmp_path):
    from ray_jobs.sweep import main as sweep_main

    with pytest.raises(ConfigError, match="prior.objective.lam"):
        sweep_main(
            ["--space", "smoke", "--results-dir", str(tmp_path), "--set", "prior.objective.lam=-1"]
        )


# -------------------------------------------------------------------------------------- jobs
# `ray job submit` against a `ray start --head` (with and without --results-dir, one head for
# both jobs): tests/test_first_hour.py::
# test_jobs_submitted_to_a_ray_start_head_keep_their_results_after_the_session.


def test_downstream_sweep_reports_cnn_acc_and_logs_to_mlflow(ray_session, tmp_path, tracking):
    _sweep("smoke_cnn", tmp_path, tracking, "eval.plots=false")
    client = MlflowClient(tracking.uri)
    children = [
        r
        for r in client.search_runs([tracking.experiment_id()])
        if "mlflow.parentRunId" in r.data.tags
    ]
    assert len(children) == 2
    for child in children:
        assert 0 <= child.data.metrics["cnn_acc"] <= 1 and "nf_acc" in child.data.metrics
        assert child.data.params["downstream.kind"] == "cnn"
        assert "generated_test_acc" in child.data.metrics  # per-epoch classifier metrics
        arts = {a.path for a in client.list_artifacts(child.info.run_id, "downstream")}
        assert "downstream/confusion_generated.png" in arts
    flows = list((tmp_path / "ray" / "flows").glob("flow-*"))
    assert len([f for f in flows if f.is_dir()]) == 2  # one shared Train run per distinct flow
