"""benchmarks/train_throughput.py's issue-24 rows: any preset at any size and width, the
invertible-backward row with its error checks, and the normflows peer at matched parameters."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import concurrent_runs

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"
ARGS = {
    "test_invertible_backward_row_at_a_chosen_size_and_width": [
        "--models", "glow-small", "--image-size", "16", "--hidden", "8", "--invertible-backward",
    ],
    "test_normflows_peer_row_has_a_matched_parameter_count": [
        "--models", "glow-small", "--image-size", "16", "--hidden", "32", "--peer",
    ],
    # + --record <its folder>/published.json
    "test_interleaved_time_ratio_row_and_published_record": [
        "--invertible-backward", "--interleave", "2",
    ],
}  # fmt: skip


@pytest.fixture(scope="module")
def rows(request, tmp_path_factory):
    """``rows(test name) -> (stdout, records)``: each selected test's ``--smoke-test
    --only-extra`` run, the two run side by side (tests/benchmarks/conftest.py)."""
    outs = {}

    def plan(name):
        def planned(params):
            if name.startswith("test_normflows") and importlib.util.find_spec("normflows") is None:
                return None  # the test skips itself
            outs[name] = tmp_path_factory.mktemp("rows") / "r.json"
            extra = ARGS[name]
            if name.startswith("test_interleaved"):
                extra = [*extra, "--record", str(outs[name].with_name("published.json"))]
            return (
                name,
                SCRIPT,
                ["--smoke-test", "--only-extra", "--out", str(outs[name]), *extra],
            )

        return planned

    with concurrent_runs(request, {name: plan(name) for name in ARGS}) as futures:

        def result(name):
            proc = futures[name].result()
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            return proc.stdout, json.loads(outs[name].read_text())

        result.out = outs

        yield result


@pytest.mark.slow
def test_invertible_backward_row_at_a_chosen_size_and_width(rows):
    stdout, rows = rows("test_invertible_backward_row_at_a_chosen_size_and_width")
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
def test_normflows_peer_row_has_a_matched_parameter_count(rows):
    pytest.importorskip("normflows")
    stdout, rows = rows("test_normflows_peer_row_has_a_matched_parameter_count")
    ours, peer = rows
    assert peer["model"] == "normflows-glow" and peer["matched_model"] == "glow-small"
    assert peer["matched_params"] == ours["params"]
    assert abs(peer["params"] - ours["params"]) <= 0.02 * ours["params"]
    assert "normflows Glow" in stdout and "images/s =" in stdout


@pytest.mark.slow
def test_interleaved_time_ratio_row_and_published_record(rows):
    name = "test_interleaved_time_ratio_row_and_published_record"
    stdout, rows, record = *rows(name), rows.out[name].with_name("published.json")
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
