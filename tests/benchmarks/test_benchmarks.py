"""Every benchmark script runs end to end in its ``--smoke-test`` mode: exit status 0, a printed
table, and ``--out`` records that are a non-empty list of flat dicts with one set of keys.

The scripts are discovered from ``benchmarks/`` (every ``*.py`` not starting with ``_``), so a new
benchmark is covered without editing this file.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 300  # a smoke run takes seconds (ray_overhead: Ray's start-up) on an idle machine


def _is_number(token: str) -> bool:
    try:
        float(token.rstrip("%x").replace(",", ""))
    except ValueError:
        return False
    return True


def _has_table(text: str) -> bool:
    """A header (>= 3 columns, none a number) followed, after an optional rule of dashes (plain
    or markdown's ``|---|``), by a row of >= 3 columns with numbers in it."""
    lines = [line.split() for line in text.splitlines()]
    for i, head in enumerate(lines[:-1]):
        if len(head) < 3 or any(_is_number(t) for t in head):
            continue
        rows = [row for row in lines[i + 1 : i + 3] if row and not set("".join(row)) <= set("-|:")]
        if rows and len(rows[0]) >= 3 and sum(_is_number(t) for t in rows[0]) >= 2:
            return True
    return False


def test_benchmarks_are_discovered():
    assert len(SCRIPTS) >= 6, [p.name for p in SCRIPTS]


@pytest.mark.slow  # each script in a subprocess (ray_overhead starts Ray)
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_smoke_test(script, tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # ray_overhead starts its own local Ray
    env.pop("RAY_GCS_SERVER_PORT", None)  # the suite's own Ray's port (conftest)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke-test", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    seconds = time.perf_counter() - t0
    print(f"{script.name} --smoke-test: {seconds:.1f} s")
    log = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, log
    assert _has_table(proc.stdout), f"no table printed\n{log}"

    records = json.loads(out.read_text())
    assert isinstance(records, list) and records, records
    keys = list(records[0])
    for rec in records:
        assert isinstance(rec, dict), rec
        assert set(rec) == set(keys), f"keys differ: {sorted(set(rec) ^ set(keys))}"
        nested = {k: v for k, v in rec.items() if isinstance(v, dict | list)}
        assert not nested, f"not flat: {nested}"
