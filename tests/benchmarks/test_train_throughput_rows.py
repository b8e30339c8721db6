"""benchmarks/train_throughput.py's issue-24 rows: any preset at any size and width, the
invertible-backward row with its error checks, and the normflows peer at matched parameters."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *args):
    out = tmp_path / "r.json"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--smoke-test", "--only-extra",
         "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_invertible_backward_row_at_a_chosen_size_and_width(tmp_path):
    stdout, rows = _run(
        tmp_path, "--models", "glow-small", "--image-size", "16", "--hidden", "8",
        "--invertible-backward",
    )  # fmt: skip
    assert [r["invertible_backward"] for r in rows] == [False, True]
    for r in rows:
        assert (r["model"], r["image_size"], r["hidden"]) == ("glow-small", 16, 8)
    plain, inv = rows
    assert plain["params"] == inv["params"]
    # float32 over the full depth of the model: round-off, not a wrong gradient.
    assert 0 <= inv["grad_max_rel_err_vs_autograd"] < 1e-3
    assert inv["rebuild_layers"] == 3 * 4 * 3  # 3 levels x 4 steps x 3 layers, all compared
    assert 0 <= inv["rebuild_max_rel_err"] < 1e-4
    assert "invertible backward: peak memory" in stdout


@pytest.mark.slow
def test_normflows_peer_row_has_a_matched_parameter_count(tmp_path):
    pytest.importorskip("normflows")
    stdout, rows = _run(tmp_path, "--models", "glow-small", "--image-size", "16", "--hidden",
                        "32", "--peer")  # fmt: skip
    ours, peer = rows
    assert peer["model"] == "normflows-glow" and peer["matched_model"] == "glow-small"
    assert peer["matched_params"] == ours["params"]
    assert abs(peer["params"] - ours["params"]) <= 0.02 * ours["params"]
    assert "normflows Glow" in stdout and "images/s =" in stdout


@pytest.mark.slow
def test_interleaved_time_ratio_row_and_published_record(tmp_path):
    record = tmp_path / "published.json"
    stdout, rows = _run(tmp_path, "--invertible-backward", "--interleave", "2",
                        "--record", str(record))  # fmt: skip
    plain, inv, inter = rows
    assert inv["freed_memory_returned"] is True and plain["freed_memory_returned"] is False
    assert inv["params_mb"] == plain["params_mb"] and inv["optimizer_state_mb"] >= 0
    assert inter["bench"] == "interleaved_step" and inter["rounds"] == 2
    for mode in ("autograd", "invertible", "invertible_returned"):
        cpu, wall = json.loads(inter[f"{mode}_cpu_s"]), json.loads(inter[f"{mode}_wall_s"])
        assert len(cpu) == len(wall) == 2 and min(wall) > 0
    assert inter["autograd_cpu_ratio"] == 1.0
    assert "interleaved in one worker" in stdout
    doc = json.loads(record.read_text())
    assert set(doc) == {"commit", "command", "date", "records"} and len(doc["records"]) == 3
