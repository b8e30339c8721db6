"""Recovery that recovers: after a killed worker, a killed driver, a hung prior actor, a sweep
that died early or a deterministic error, nothing is lost, nothing is logged twice, and the run
ends the same as an uninterrupted one (bit for bit) or at once with a named error.

Real Ray runs are kept to a handful and share one Ray session (``ray_session``).
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from nfpi.checkpoint import load_checkpoint
from nfpi.errors import ConfigError, DivergenceError, ShapeError
from nfpi.presets import experiment_config
from nfpi.prior import ClassStatistics, PriorService
from nfpi.training import Trainer
from ray_jobs.prior_actor import ActorPriorClient, PriorActorTimeoutError
from ray_jobs.settings import RaySettings
from ray_jobs.tracking import RunLogger, start_run
from ray_jobs.train import deterministic_cause, remove_unregistered_checkpoints, run_experiment

ROOT = Path(__file__).resolve().parents[2]


def _smoke(**overrides):
    return experiment_config("smoke", {"eval.plots": False, "optim.epochs": 3, **overrides})


def _poll(condition, what, timeout=300.0):
    """Wait until ``condition()`` holds (polled), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _steps(tracking, run_id, key="epoch"):
    return [m.step for m in MlflowClient(tracking.uri).get_metric_history(run_id, key)]


def _only_run(tracking):
    (run,) = MlflowClient(tracking.uri).search_runs([tracking.experiment_id()])
    return run


def _assert_same_state(result, reference):
    state = load_checkpoint(result.checkpoint.path)
    for part in ("flow", "ema"):
        for name, tensor in reference[part].items():
            assert torch.equal(state[part][name], tensor), (part, name)
    for name, tensor in reference["prior"].items():
        assert torch.equal(state["prior"][name], tensor), ("prior", name)


# ------------------------------------------------------------------------ no Ray needed
def test_metrics_file_keeps_the_checkpoints_epochs_when_a_resumed_attempt_dies(tmp_path):
    """Before: ``fit`` rewrote metrics.jsonl from the empty history before loading the
    checkpoint, so an attempt that died before its first epoch ended left the file empty."""
    cfg = _smoke(**{"optim.epochs": 1})
    Trainer(cfg, tmp_path / "run").fit()
    resumed = Trainer(cfg.with_overrides({"optim.epochs": 3}), tmp_path / "run")

    def dies(epoch):
        raise RuntimeError("worker lost mid-epoch")

    resumed._train_epoch = dies
    with pytest.raises(RuntimeError, match="mid-epoch"):
        resumed.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0.0]


def test_non_finite_metrics_are_recorded_not_dropped(tracking, caplog):
    """Before: ``RunLogger.metrics`` dropped NaN/inf values without a trace."""
    run_id = start_run(tracking, "nan")
    logger = RunLogger(tracking, run_id)
    with caplog.at_level("WARNING", logger="ray_jobs.tracking"):
        logger.metrics({"train_bpd": 3.0, "test_bpd": float("nan"), "kl_min": float("inf")}, 4)
    run = tracking.client().get_run(run_id)
    assert run.data.metrics == {"train_bpd": 3.0}
    assert run.data.tags["nfpi.nonfinite.test_bpd"] == "nan at step 4"
    assert run.data.tags["nfpi.nonfinite.kl_min"] == "inf at step 4"
    assert "test_bpd = nan at step 4" in caplog.text


def test_params_keep_their_first_values_and_changes_are_tags(tracking):
    """Before: a re-launch logging a different value of a param (a longer optim.epochs, another
    worker count) failed on MLflow's immutable params."""
    logger = RunLogger(tracking, start_run(tracking, "p"))
    assert logger.params({"optim.epochs": 1, "optim.lr": 0.01}) == {}
    assert logger.params({"optim.epochs": 3, "optim.lr": 0.01, "new": "x"}) == {"optim.epochs": "3"}
    run = tracking.client().get_run(logger.run_id)
    assert run.data.params == {"optim.epochs": "1", "optim.lr": "0.01", "new": "x"}
    assert run.data.tags["nfpi.changed.optim.epochs"] == "3 (param: 1)"


def test_unregistered_ray_checkpoints_are_removed(tmp_path):
    """A checkpoint uploaded by rank 0 but never registered (a worker or the driver died in
    between) is deleted; registered ones and other files stay."""
    train_dir = tmp_path / "ray" / "run"
    for name in ("checkpoint_epoch-0001", "checkpoint_epoch-0002", "checkpoint_epoch-0003"):
        (train_dir / name).mkdir(parents=True)
        (train_dir / name / "state.pt").write_bytes(b"x")
    snapshot = {
        "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_epoch-0001", "metrics": {}}],
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_epoch-0002"},
    }
    (train_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    removed = remove_unregistered_checkpoints(train_dir)
    assert [p.name for p in removed] == ["checkpoint_epoch-0003"]
    assert sorted(p.name for p in train_dir.iterdir()) == [
        "checkpoint_epoch-0001",
        "checkpoint_epoch-0002",
        "checkpoint_manager_snapshot.json",
    ]
    assert remove_unregistered_checkpoints(tmp_path / "absent") == []


def test_deterministic_cause_sees_through_rays_wrappers():
    from ray.train import ControllerError, WorkerGroupError

    from ray_jobs._ray_compat import user_exception_type

    UserExceptionWithTraceback = user_exception_type()

    shape = ShapeError("bad shape")
    group = WorkerGroupError(
        "rank 1 failed",
        {0: RuntimeError("collateral"), 1: UserExceptionWithTraceback(shape, "tb")},
    )
    assert deterministic_cause(group) is shape
    assert deterministic_cause(ControllerError(shape)) is shape
    assert deterministic_cause(ControllerError(RuntimeError("x"))) is None
    assert deterministic_cause(PriorActorTimeoutError("slow")) is None  # transient: retried
    try:
        raise RuntimeError("wrapped") from ConfigError("a", 1, "b")
    except RuntimeError as err:
        assert isinstance(deterministic_cause(err), ConfigError)


# ----------------------------------------------------------------------------- prior actor
def _stats(seed=0, k=4, d=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(200) % k
    z = 0.5 * torch.randn(k, d, generator=g, dtype=torch.float64)[y] + torch.randn(
        200, d, generator=g, dtype=torch.float64
    )
    return ClassStatistics.from_batch(z, y, k)


def test_hung_prior_actor_is_killed_replaced_and_reseeded(ray_session):
    """Before: after a timeout the client (and the restarted worker group) kept the same actor,
    whose queue stayed blocked behind the hung call: every later call timed out too (20 min
    with the defaults) and the run failed. Now the client kills it, starts a fresh actor from
    its factory, re-seeds it with the last state it saw and retries: the answers are exactly
    those of an actor that never hung."""

    class HangsOnce(PriorService):  # defined here: Ray workers cannot import test modules
        """A prior service whose ``update`` never returns while ``hang`` is set."""

        def __init__(self, *args, hang=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.hang = hang

        def update(self, stats):
            if self.hang:
                threading.Event().wait()  # blocks until the process is killed
            return super().update(stats)

    remote = ray_session.remote(num_cpus=0)(HangsOnce)
    hung = remote.remote("gd", 4, 3, hang=True)
    started = []

    def factory():
        started.append(remote.remote("gd", 4, 3))
        return started[-1]

    ray_session.get(hung.state_dict.remote())  # up (actor start-up may take seconds)
    client = ActorPriorClient(hung, timeout_s=10.0, factory=factory)
    reference = PriorService("gd", 4, 3)
    stats = [_stats(seed) for seed in range(3)]
    assert client.initialize(stats[0]).version == reference.initialize(stats[0]).version == 1
    for s in stats[1:]:
        got, want = client.update(s), reference.update(s)
        assert got.version == want.version
        for key in want.prior:
            assert torch.equal(got.prior[key], want.prior[key]), key
    assert client.replacements == 1 and len(started) == 1 and client.actor is started[0]
    with pytest.raises(ray_session.exceptions.RayActorError):
        ray_session.get(hung.state_dict.remote(), timeout=60)  # the hung one was killed


# ------------------------------------------------------------------------------ Train runs
def _settings(tmp_path, tracking=None, **kwargs):
    return RaySettings(results_dir=tmp_path / "results", tracking=tracking, **kwargs)


def test_deterministic_error_ends_the_run_after_one_attempt(ray_session, tmp_path, tracking):
    """Before: a divergence (like any config, shape or FPI error) counted against
    max_failures: with 3 the run diverged four times over (with -1: forever) and ended with
    Ray's WorkerGroupError. Now the first attempt's DivergenceError ends the run, is raised
    itself, and is recorded in the MLflow run (nfpi.error tag, error.txt), which ends FAILED."""
    config = _smoke(
        **{"optim.lr": 1e6, "optim.batch_size": 200, "prior.method": "data-init"}
    )  # diverges within epoch 0
    settings = _settings(tmp_path, tracking, num_workers=1, max_failures=3)
    with pytest.raises(DivergenceError, match="no checkpoint has been saved"):
        run_experiment(config, settings, "diverges")
    run = _only_run(tracking)
    assert run.info.status == "FAILED"
    assert run.data.tags["nfpi.error"].startswith("DivergenceError: epoch 0 diverged")
    assert _steps(tracking, run.info.run_id, "ray.num_workers") == [0]  # one attempt only
    client = MlflowClient(tracking.uri)
    assert "error.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    text = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "DivergenceError" in text and "test_bpd=nan" in text


@pytest.fixture
def uninterrupted(uninterrupted_run):
    """The final state of a 2-worker run of ``_smoke()`` with MLflow on, never interrupted
    (tests/ray_jobs/conftest.py, shared by the session): what interrupted runs must equal."""
    assert uninterrupted_run.config == _smoke()  # the same experiment as the interrupted runs
    return uninterrupted_run.state


@pytest.mark.slow
def test_killed_worker_in_a_two_worker_group_logs_each_step_once_and_ends_bit_identical(
    ray_session, tmp_path, tracking, uninterrupted
):
    """Rank 1 dies at the end of epoch 1, after rank 0 logged that epoch to MLflow and before
    Ray Train registered its checkpoint; the run directory's checkpoints are lost with it (as
    with a lost node), so the group restarts from Ray's registered checkpoint of epoch 0.

    Before (run against main's ray_jobs): epoch 1 was logged again, steps [0, 1, 1, 2] (the
    issue's pattern). Now every step is logged once, the run ends bit-identical to an
    uninterrupted one, and no unregistered Ray checkpoint is left."""
    settings = _settings(tmp_path, tracking, num_workers=2, max_failures=1)
    marker = tmp_path / "crashed"
    snapshot = settings.storage / "kill" / "checkpoint_manager_snapshot.json"
    uri, experiment = tracking.uri, tracking.experiment

    def crash_once(trainer, result):  # runs in the workers: no globals of this module
        import os
        import shutil
        import time

        from mlflow.tracking import MlflowClient

        if trainer.rank != 1 or result.epoch != 1 or marker.exists():
            return
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        deadline = time.monotonic() + 300
        while not (
            any(m.step == 1 for m in client.get_metric_history(run.info.run_id, "epoch"))
            and snapshot.exists()
            and '"checkpoint_dir_name":' in snapshot.read_text()
        ):  # polled: rank 0 logged epoch 1, Ray registered epoch 0's checkpoint
            assert time.monotonic() < deadline, "rank 0 never logged epoch 1"
            time.sleep(0.1)
        marker.write_text(str(os.getpid()))
        shutil.rmtree(trainer.run_dir / "checkpoints")  # the node's copy is lost too
        os._exit(1)  # rank 1 dies before reporting epoch 1

    result = run_experiment(_smoke(), settings, "kill", worker_callbacks=[crash_once])
    assert marker.exists() and result.metrics["epoch"] == 2.0
    run = _only_run(tracking)
    assert run.info.status == "FINISHED"
    assert _steps(tracking, run.info.run_id) == [0, 1, 2]
    assert _steps(tracking, run.info.run_id, "test_bpd") == [0, 1, 2]
    assert _steps(tracking, run.info.run_id, "ray.num_workers") == [0, 1]  # two attempts
    assert (settings.run_dir("kill") / "checkpoints" / "from-ray").is_dir()  # Ray's copy used
    _assert_same_state(result, uninterrupted)
    registered = snapshot.read_text()
    folders = [p for p in snapshot.parent.glob("checkpoint_*") if p.is_dir()]
    assert folders and all(p.name in registered for p in folders), (folders, registered)


_DRIVER = """
import json, sys, time
from pathlib import Path
import ray
from nfpi.presets import experiment_config
from ray_jobs.settings import RaySettings
from ray_jobs.tracking import Tracking
from ray_jobs.train import run_experiment

args = json.loads(sys.argv[1])
marker = Path(args["marker"])

def block_after_epoch_1(trainer, result):
    import time
    if trainer.rank == 0 and result.epoch == 1:
        marker.write_text("saved epoch 1, not yet logged")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # the driver is killed meanwhile
            time.sleep(0.5)

ray.init(address=args["address"], log_to_driver=False)
config = experiment_config("smoke", {"eval.plots": False, "optim.epochs": 3})
tracking = Tracking(**args["tracking"])
settings = RaySettings(args["results"], tracking=tracking, num_workers=2, max_failures=0)
run_experiment(config, settings, "driver", worker_callbacks=[block_after_epoch_1])
"""


@pytest.mark.slow
def test_killed_driver_relaunched_logs_each_step_once_and_ends_bit_identical(
    ray_session, tmp_path, tracking, uninterrupted
):
    """The driver process (a 2-worker run with MLflow on) is killed with SIGKILL while rank 0
    has saved epoch 1's checkpoint but not yet logged or reported it; the run is re-launched
    under the same name. Before (run against main's ray_jobs): epoch 1 never reached MLflow,
    steps [0, 2] (the issue saw [0,1,1,2,2,3] in another window). Now every step is logged
    once and the run ends bit-identical to an uninterrupted one."""
    marker = tmp_path / "blocked"
    results = tmp_path / "results"
    args = {
        "address": ray_session.get_runtime_context().gcs_address,
        "marker": str(marker),
        "results": str(results),
        "tracking": {
            "uri": tracking.uri,
            "experiment": tracking.experiment,
            "artifact_root": tracking.artifact_root,
        },
    }
    tracking.experiment_id()  # created once, here (concurrent creation on SQLite races)
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, json.dumps(args)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "driver.log", "w"),  # noqa: SIM115 - the child owns it
        start_new_session=True,
    )
    try:
        _poll(lambda: marker.exists() or driver.poll() is not None, "epoch 1 of the driver")
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    run_id = _only_run(tracking).info.run_id
    assert _steps(tracking, run_id) == [0]

    settings = _settings(tmp_path, tracking, num_workers=2, max_failures=0)
    result = run_experiment(_smoke(), settings, "driver")  # the same run, re-launched
    assert result.metrics["epoch"] == 2.0
    run = _only_run(tracking)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert _steps(tracking, run_id) == [0, 1, 2]
    _assert_same_state(result, uninterrupted)


def test_resume_on_another_number_of_workers(ray_session, tmp_path, tracking):
    """Before: a re-launch with another --num-workers failed on MLflow's immutable
    ``ray.num_workers`` param (and one with a longer optim.epochs on ``optim.epochs``; main had
    no ``resume_overrides`` at all). Now the worker count is a metric per attempt and a tag,
    and changed params become tags."""
    config = _smoke(**{"optim.epochs": 1})
    run_experiment(config, _settings(tmp_path, tracking, num_workers=0), "grow")  # local mode
    result = run_experiment(
        config,
        _settings(tmp_path, tracking, num_workers=2),
        "grow",
        resume_overrides={"optim.epochs": 2, "optim.lr": 1e-3},
    )
    assert result.metrics["epoch"] == 1.0 and result.metrics["lr"] == 1e-3
    run = _only_run(tracking)
    history = MlflowClient(tracking.uri).get_metric_history(run.info.run_id, "ray.num_workers")
    assert [m.value for m in history] == [1.0, 2.0] and run.data.tags["ray.num_workers"] == "2"
    assert run.data.params["optim.epochs"] == "1"
    assert run.data.tags["nfpi.changed.optim.epochs"] == "2 (param: 1)"
    assert run.data.tags["nfpi.changed.optim.lr"] == "0.001 (param: 0.01)"
    assert _steps(tracking, run.info.run_id) == [0, 1]


# ------------------------------------------------------------------------------------ sweep
# A sweep killed before Tune saved its state: its parent run ends KILLED and ``--resume``
# starts it afresh under the same parent (the smoke sweep's own test, which runs it that way):
# tests/ray_jobs/test_train.py::
# test_smoke_sweep_killed_before_tune_saved_state_resumes_and_writes_parent_and_child_runs.
