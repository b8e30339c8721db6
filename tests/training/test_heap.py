"""nfpi.training.heap: freed tensors go back to the operating system at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nfpi.training.heap import return_freed_memory

ROOT = Path(__file__).resolve().parents[2]

# Frees 1 MiB tensors while a later one stays alive above them: with glibc's default (its
# threshold rises to 1 MiB after the first mapped block is freed) they come from the heap and
# stay resident; with return_freed_memory() each is unmapped on free.
_PROBE = """
import sys, torch
from nfpi.training.heap import return_freed_memory
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
if sys.argv[1] == "on":
    assert return_freed_memory()
warm = torch.ones(1 << 18); del warm  # a mapped block freed: glibc's threshold rises
blocks = [torch.ones(1 << 18) for _ in range(200)]  # 200 x 1 MiB, written (resident)
keep = torch.ones(1 << 18)
before = rss()
del blocks
print(before - rss())
"""


def _released_mib(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux, glibc)")
def test_freed_tensors_leave_the_resident_set():
    # 200 MiB freed: with the setting nearly all of it leaves the resident set ...
    assert _released_mib("on") > 190
    # ... and without it glibc keeps it (what the setting is for; fails if glibc changes).
    assert _released_mib("off") < 20


def test_bad_threshold_is_refused_in_one_line():
    for bad in (0, -1, 64 * 1024 * 1024, 1.5):
        with pytest.raises(ValueError, match="threshold_bytes must be an int in"):
            return_freed_memory(bad)


@pytest.mark.parametrize("invertible", [False, True])
def test_the_trainer_returns_freed_memory_only_with_the_invertible_backward(
    invertible, monkeypatch, tmp_path
):
    from nfpi.presets import experiment_config
    from nfpi.training import Trainer, loop

    calls = []
    monkeypatch.setattr(loop, "return_freed_memory", lambda: calls.append(1) or True)
    config = experiment_config("smoke", {"optim.invertible_backward": invertible})
    trainer = Trainer(config, tmp_path / "run")
    assert trainer.flow.invertible_backward is invertible
    assert calls == ([1] if invertible else [])
