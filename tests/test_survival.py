"""kill -9 in the middle of an epoch loses nothing: the same command resumes from the last
checkpoint and ends bit-identical to an uninterrupted run (docs/robustness.md)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nfpi.checkpoint import find_checkpoint, load_checkpoint
from nfpi.presets import experiment_config
from nfpi.training import Trainer, is_wall_clock

ROOT = Path(__file__).resolve().parents[1]
SETS = {"eval.plots": False, "optim.epochs": 3}


def _metrics(history):
    return [{k: v for k, v in m.items() if not is_wall_clock(k)} for m in history]


@pytest.mark.slow
def test_kill_9_mid_epoch_resumes_bit_identical(tmp_path):
    reference = Trainer(experiment_config("smoke", SETS), tmp_path / "straight").fit()
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "nfpi", "train", "--experiment", "smoke", "--run-dir", str(run)]
    for key, value in SETS.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while find_checkpoint(run) is None:  # polled: epoch 0 is saved, epoch 1 under way
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint was saved"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    trainer = Trainer(experiment_config("smoke", SETS), run)  # the same command, again
    history = trainer.fit()
    assert trainer.resumed_from is not None
    assert _metrics(history) == _metrics(reference)
    straight, resumed = load_checkpoint(tmp_path / "straight"), load_checkpoint(run)
    for part in ("flow", "ema"):
        for name, tensor in straight[part].items():
            assert torch.equal(tensor, resumed[part][name]), (part, name)
    assert not list(run.rglob("*.tmp"))
