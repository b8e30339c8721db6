"""Faults around checkpoints and run directories (issue 22): another model shape, a full disk,
a read-only run directory, SIGTERM, the lock file's contents; each one line, nothing stale."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nfpi.checkpoint import find_checkpoint, load_checkpoint, load_trained, lock_run_dir
from nfpi.checkpoint import save_checkpoint as save
from nfpi.cli import main as cli_main
from nfpi.entry import run_cli
from nfpi.errors import CheckpointError
from nfpi.training import Trainer

ROOT = Path(__file__).resolve().parents[2]


def _state(checkpoint):
    state = load_checkpoint(checkpoint)
    state.pop("_file")
    return state


def _tmp_files(folder):
    return sorted(str(p) for p in Path(folder).rglob("*.tmp"))


def test_a_checkpoint_of_another_model_shape_is_one_line_naming_it(tmp_path, checkpoint):
    """Before: torch's many-line RuntimeError (size mismatch for ...). Now a CheckpointError
    naming the file, the mismatch and the data shape it was trained on."""
    state = _state(checkpoint)
    key = next(k for k, v in state["flow"].items() if v.dim() >= 1 and v.is_floating_point())
    state["flow"][key] = torch.zeros(*state["flow"][key].shape[:-1], 7)
    for name in [k for k in state["ema"] if k.endswith("." + key)]:
        state["ema"][name] = state["flow"][key]  # the EMA weights: what load_trained reads
    save(tmp_path / "other", state)
    for load in (load_trained, lambda p: Trainer(state_config(state), p).fit()):
        with pytest.raises(CheckpointError, match="another shape") as err:
            load(tmp_path / "other")
        assert key in str(err.value) and "shape (1, 8, 8)" in str(err.value)
        assert "\n" not in str(err.value)


def state_config(state):
    from nfpi.config import ExperimentConfig

    return ExperimentConfig.from_dict(state["config"])


def _full_disk(exc=None):
    exc = exc or OSError(errno.ENOSPC, "No space left on device")

    def fake_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise exc

    return fake_save


def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_leaves_no_tmp(
    tmp_path, checkpoint, monkeypatch
):
    """Before: torch's cryptic write error, and ``state.pt.tmp`` stayed. Now a CheckpointError
    saying the disk is full and which checkpoint is intact; no .tmp file, no half folder."""
    state = _state(checkpoint)
    save(tmp_path, state)  # epoch 1, written for real
    good = find_checkpoint(tmp_path)
    monkeypatch.setattr(torch, "save", _full_disk())
    with pytest.raises(CheckpointError, match="No space left on device") as err:
        save(tmp_path, {**state, "epoch": 2})
    message = str(err.value)
    assert "free some space" in message and f"{good} (after 1 epochs) is intact" in message
    assert _tmp_files(tmp_path) == []
    assert not (tmp_path / "checkpoints" / "epoch-0002").exists()
    assert find_checkpoint(tmp_path) == good


def test_an_interrupted_save_leaves_no_tmp(tmp_path, checkpoint, monkeypatch):
    """SIGTERM or Ctrl-C inside ``torch.save``: the interruption goes on, the .tmp does not
    stay (before: ``state.pt.tmp`` was left)."""
    state = _state(checkpoint)
    monkeypatch.setattr(torch, "save", _full_disk(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, state)
    assert _tmp_files(tmp_path) == []


def test_a_read_only_run_directory_is_one_line(tmp_path, monkeypatch, capsys):
    """Before: a PermissionError traceback. (The suite runs as root here, whom a chmod does not
    stop, so the refusal of the file system is simulated.)"""
    ro = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(ro)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(CheckpointError, match="not writable"), lock_run_dir(ro / "run"):
        pass
    argv = ["train", "--experiment", "smoke", "--run-dir", str(ro / "run")]
    assert run_cli(cli_main, argv, prog="nfpi") == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert len(errors) == 1 and "not writable" in errors[0]


def test_the_lock_file_does_not_hold_the_command_line(tmp_path, monkeypatch):
    """Before: the whole command line (URIs with passwords, paths) went into the lock file,
    which every user of the run directory can read. Now only the program's name."""
    monkeypatch.setattr(
        sys, "argv", ["/x/nfpi", "train", "--tracking-uri", "http://u:S3CRET@host:5000"]
    )
    with lock_run_dir(tmp_path):
        text = (tmp_path / ".nfpi-run.lock").read_text()
    assert "S3CRET" not in text and "tracking-uri" not in text and '"command": "nfpi"' in text


@pytest.mark.slow
def test_sigterm_ends_a_run_with_one_line_and_no_tmp(tmp_path):
    """Before: SIGTERM killed ``python -m nfpi train`` silently (exit -15), possibly leaving a
    .tmp. Now it unwinds: exit 143, one line, no .tmp; the same command resumes."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nfpi", "train", "--experiment", "smoke", "--run-dir", str(run)]
    cmd += ["--set", "optim.epochs=1000", "--set", "eval.plots=false"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while find_checkpoint(run) is None:  # polled: an epoch was saved
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint was saved"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert (
        err.strip().splitlines()[-1]
        == "python -m nfpi: terminated by SIGTERM; what was saved is kept"
    )
    assert _tmp_files(run) == []
    assert load_checkpoint(run)["epoch"] >= 1
