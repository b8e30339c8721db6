"""Every user mistake is one line on stderr naming the field or path and the fix, exit code 2,
and the cheap ones are caught before Ray starts (issue 12's table of mistakes)."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nfpi import cli
from nfpi.entry import run_cli, user_error
from nfpi.errors import CheckpointError, ConfigError, NfpiError
from nfpi.presets import EXPERIMENTS

ROOT = Path(__file__).resolve().parents[2]


def _run(main, argv, capsys=None):
    err = io.StringIO()
    code = run_cli(main, argv, prog="prog", stderr=err)
    return code, err.getvalue()


def _one_line(text: str) -> str:
    lines = text.strip("\n").split("\n")
    assert len(lines) == 1, text
    assert lines[0].startswith("prog: error: ") and "--debug" in lines[0], text
    return lines[0]


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray fails the test: the mistake must be caught before."""
    import ray_jobs.sweep
    import ray_jobs.train

    def started(*args, **kwargs):
        raise AssertionError("Ray was started before the mistake was reported")

    monkeypatch.setattr(ray_jobs.train, "connect", started)
    monkeypatch.setattr(ray_jobs.sweep, "connect", started)


# ------------------------------------------------------------------------------- run_cli itself
def test_run_cli_turns_a_library_error_into_one_line_and_exit_2():
    def main(argv):
        raise ConfigError("optim.lr", -1, "a finite float > 0")

    code, err = _run(main, [])
    assert code == 2
    assert "'optim.lr' = -1 is invalid: a finite float > 0" in _one_line(err)


def test_run_cli_debug_shows_the_traceback_and_bugs_keep_theirs():
    def mistake(argv):
        raise ConfigError("optim.lr", -1, "a finite float > 0")

    def bug(argv):
        raise KeyError("oops")

    with pytest.raises(ConfigError):
        run_cli(mistake, ["--debug"], stderr=io.StringIO())
    with pytest.raises(KeyError):  # not a user mistake: the traceback stays
        run_cli(bug, [], stderr=io.StringIO())


def test_run_cli_interrupted_is_exit_130():
    def main(argv):
        raise KeyboardInterrupt

    assert run_cli(main, [], stderr=io.StringIO()) == 130


def test_user_error_finds_the_library_error_inside_ray_wrappers():
    """Ray wraps a worker's error (a task error's ``cause``, a Train worker-group error's
    ``worker_failures``, a controller error, exception chains); the one line is the library's
    message, without the remote traceback."""
    inner = ConfigError("prior.fpi.max_iter", 1, "an int >= 2")

    class TaskError(ConfigError):  # like RayTaskError.as_instanceof_cause(): both classes
        def __init__(self, cause):
            Exception.__init__(self, f"ray::train() (pid=1)\nTraceback ...\n{cause}")
            self.cause = cause

    class WorkerGroupError(RuntimeError):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    assert user_error(TaskError(inner)) is inner
    assert user_error(WorkerGroupError({0: TaskError(inner)})) is inner
    try:
        try:
            raise inner
        except ConfigError as err:
            raise RuntimeError("trial failed") from err
    except RuntimeError as chained:
        assert user_error(chained) is inner
    assert user_error(RuntimeError("a bug")) is None


# --------------------------------------------------------------------- the table of mistakes
def _corrupt_run(tmp_path: Path) -> Path:
    run = tmp_path / "corrupt-run"
    folder = run / "checkpoints" / "epoch-0001"
    folder.mkdir(parents=True)
    (folder / "state.pt").write_bytes(b"not a checkpoint")
    (run / "checkpoints" / "last_good").write_text("epoch-0001\n")
    return run


CLI_MISTAKES = [
    # (id, argv, words the one line must contain)
    ("set-invalid-json", ["train", "--set", "prior.objective.lam=[1,"], ["prior.objective.lam", "JSON"]),
    ("set-bad-value", ["train", "--set", "prior.objective.lam=-1"], ["prior.objective.lam", ">= 0"]),
    ("set-unknown-key", ["train", "--set", "prior.objectiv.lam=3"], ["prior.objectiv", "unknown"]),
    ("set-without-equals", ["train", "--set", "prior.method"], ["KEY=VALUE"]),
    ("unknown-flag", ["train", "--epochs", "3"], ["--epochs", "--help"]),
    ("unknown-experiment", ["train", "--experiment", "cifar"], ["invalid choice", "cifar10"]),
    ("batch-larger-than-data", ["train", "--set", "optim.batch_size=5000"], ["optim.batch_size", "1437"]),
    ("data-root-missing", ["train", "--experiment", "cifar10"], ["data.root", "--set data.root="]),
    ("data-root-not-found", ["train", "--experiment", "cifar10", "--set", "data.root=/nonexistent/c10"], ["/nonexistent/c10", "--set data.root"]),
    ("config-file-missing", ["config", "--config", "/nonexistent/config.json"], ["--config", "/nonexistent/config.json"]),
    ("checkpoint-missing", ["downstream", "/nonexistent/run"], ["/nonexistent/run", "run directory"]),
    ("downstream-bad-key", ["downstream", "/nonexistent/run", "--set", "cnn.epoch=3"], ["cnn.epoch", "unknown"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "words"), [c[1:] for c in CLI_MISTAKES], ids=[c[0] for c in CLI_MISTAKES]
)
def test_cli_mistakes_are_one_line(argv, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing is written to the repository
    code, err = _run(cli.main, argv)
    line = _one_line(err)
    assert code == 2
    for word in words:
        assert word in line, (word, line)
    assert not (tmp_path / "results").exists()  # failed before any output was made


def test_corrupt_checkpoint_is_one_line_without_torch_s_advice(tmp_path):
    """It used to read ``invalid load key`` / PyTorch's weights_only advice, which does not
    apply: the line names the file and the fix."""
    run = _corrupt_run(tmp_path)
    code, err = _run(cli.main, ["downstream", str(run), "--output-dir", str(tmp_path / "out")])
    line = _one_line(err)
    assert code == 2 and "epoch-0001/state.pt" in line and "corrupt" in line
    assert "weights_only" not in line and "earlier epoch-NNNN" in line
    assert not (tmp_path / "out").exists()  # no empty output folder left behind


def test_bad_archive_is_one_line_and_leaves_no_empty_cache(tmp_path):
    archive = tmp_path / "data" / "cifar10-jpeg.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(b"garbage, not a tar")
    argv = ["train", "--set", "data.name=imagefolder", "--set", f"data.root={archive}",
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    code, err = _run(cli.main, argv)
    line = _one_line(err)
    assert code == 2 and str(archive) in line and "tar archive" in line
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]  # no .nfpi-cache


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    code, err = _run(cli.main, ["train", "--set", "device=cuda", "--run-dir", str(tmp_path)])
    assert code == 2 and "'device' = 'cuda'" in _one_line(err)


RAY_TRAIN_MISTAKES = [
    ("batch-not-divisible", ["--num-workers", "3"], ["optim.batch_size", "128", "(3)"]),
    ("relative-sqlite-uri", ["--tracking-uri", "sqlite:///mlflow.db"], ["tracking_uri", "absolute"]),
    ("too-many-workers", ["--num-workers", "64", "--set", "optim.batch_size=128"], ["--num-workers", "CPUs"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "words"), [c[1:] for c in RAY_TRAIN_MISTAKES], ids=[c[0] for c in RAY_TRAIN_MISTAKES]
)
def test_ray_train_mistakes_are_one_line_before_ray_starts(
    argv, words, tmp_path, no_ray, monkeypatch
):
    from ray_jobs.train import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, err = _run(main, ["--results-dir", str(tmp_path), *argv])
    line = _one_line(err)
    assert code == 2
    for word in words:
        assert word in line, (word, line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_use_gpu_without_a_gpu_is_one_line_before_ray_starts(tmp_path, no_ray, monkeypatch):
    from ray_jobs.train import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, err = _run(main, ["--results-dir", str(tmp_path), "--use-gpu"])
    assert code == 2 and "--use-gpu" in _one_line(err)


def test_a_local_ray_that_times_out_during_startup_is_one_line(monkeypatch):
    """On a busy machine ray.init's node did not register within Ray's fixed 30 s: the first
    command printed Ray's 20-line traceback ending in "timed out during startup"."""
    import ray

    from ray_jobs.settings import connect

    def timed_out(**kwargs):
        raise Exception("The current node timed out during startup. This could happen ...")  # noqa: TRY002 - what Ray raises

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # the suite's Ray may be up
    monkeypatch.setattr(ray, "init", timed_out)
    code, err = _run(lambda argv: connect(None), [])
    line = _one_line(err)
    assert code == 2 and "did not start" in line and "--address" in line


SWEEP_MISTAKES = [
    ("unknown-space", ["--space", "table9"], ["table9", "invalid choice"]),
    ("bad-option", ["--space", "table2", "--set", "dataset=cifar1000", "--set", "data.root=/x"], ["dataset", "cifar1000", "cifar100"]),
    ("dataset-as-data-name", ["--space", "table2", "--set", "data.name=cifar10", "--set", "data.root=/x"], ["data.name", "--set dataset=cifar10"]),
    ("required-key-missing", ["--space", "table6_eva02", "--set", "data.root=/x"], ["cnn.pretrained_path"]),
    ("bad-value", ["--space", "smoke", "--set", "prior.objective.lam=-1"], ["prior.objective.lam"]),
    ("flow-space-downstream-key", ["--space", "smoke", "--set", "cnn.epochs=3"], ["cnn.epochs", "flows only"]),
    ("zero-workers", ["--num-workers", "0"], ["--num-workers", ">= 1"]),
    ("data-root-not-found", ["--space", "table2", "--set", "data.root=/nonexistent/c100"], ["/nonexistent/c100"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "words"), [c[1:] for c in SWEEP_MISTAKES], ids=[c[0] for c in SWEEP_MISTAKES]
)
def test_sweep_mistakes_are_one_line_before_ray_starts(argv, words, tmp_path, no_ray, monkeypatch):
    from ray_jobs.sweep import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, err = _run(main, ["--results-dir", str(tmp_path), *argv])
    line = _one_line(err)
    assert code == 2
    for word in words:
        assert word in line, (word, line)


# -------------------------------------------------------------------- the entry points' wiring
@pytest.mark.slow  # each entry point in a subprocess
@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "nfpi", "train", "--set", "prior.objective.lam=[1,"],
        [sys.executable, "ray_jobs/train.py", "--set", "prior.objective.lam=[1,"],
        [sys.executable, "ray_jobs/sweep.py", "--set", "prior.objective.lam=[1,"],
        [sys.executable, "ray_jobs/figures.py", "--figures", "2"],
    ],
    ids=["python -m nfpi", "ray_jobs/train.py", "ray_jobs/sweep.py", "ray_jobs/figures.py"],
)
def test_every_entry_point_prints_one_line_and_exits_2(command, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_GCS_SERVER_PORT", None)  # the suite's own Ray's port (conftest)
    out = subprocess.run(
        [*command, "--results-dir", str(tmp_path)] if "ray_jobs" in command[1] else command,
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in out.stderr, out.stderr


# ------------------------------------------------------------------------------ config and help
@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_config_prints_every_experiment_without_data_paths(experiment, capsys):
    assert cli.main(["config", "--experiment", experiment]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == experiment
    if shown["data"]["name"] in ("cifar10", "cifar100", "imagefolder"):
        assert shown["data"]["root"] == cli.DATA_ROOT_PLACEHOLDER


def test_config_keys_lists_every_key_with_type_default_and_allowed(capsys):
    from nfpi.config import ExperimentConfig

    assert cli.main(["config", "--keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = {line.split()[0] for line in lines[1:]}
    assert {k for k, *_ in ExperimentConfig.describe()} <= keys
    assert {"downstream.kind", "cnn.model", "cnn.epochs"} <= keys
    method = next(line for line in lines if line.startswith("prior.method "))
    assert '"fpi"' in method and "data-init | gd | fpi" in method  # default and allowed values


def test_help_of_every_entry_point_names_experiments_presets_and_spaces(capsys):
    from ray_jobs.sweep import main as sweep_main
    from ray_jobs.train import main as train_main

    for main, argv in ((cli.main, ["--help"]), (cli.main, ["train", "--help"]),
                       (train_main, ["--help"]), (sweep_main, ["--help"])):  # fmt: skip
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "cifar10-quick" in text and "digits" in text, argv
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "mef-cifar" in text and "table2" in text  # flow presets and spaces


def test_library_errors_are_named():
    assert issubclass(CheckpointError, NfpiError) and issubclass(ConfigError, NfpiError)
