"""Every benchmark script runs end to end in its ``--smoke-test`` mode: exit status 0, a printed
table, and ``--out`` records that are a non-empty list of flat dicts with one set of keys.

The scripts are discovered from ``benchmarks/`` (every ``*.py`` not starting with ``_``), so a new
benchmark is covered without editing this file.
"""

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import concurrent_runs

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))


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


@pytest.fixture(scope="module")
def smoke_runs(request, tmp_path_factory):
    """``{script stem: (Future of its --smoke-test run, its --out path)}`` for the selected
    scripts, run two at a time (tests/benchmarks/conftest.py)."""
    outs: dict[str, Path] = {}

    def plan(params):
        script = params["script"]
        outs[script.stem] = tmp_path_factory.mktemp(script.stem) / "r.json"
        return script.stem, script, ["--smoke-test", "--out", str(outs[script.stem])]

    with concurrent_runs(request, {"test_benchmark_smoke_test": plan}) as futures:
        yield {key: (future, outs[key]) for key, future in futures.items()}


@pytest.mark.slow  # each script in a subprocess (ray_overhead starts Ray)
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_smoke_test(script, smoke_runs):
    future, out = smoke_runs[script.stem]
    proc = future.result()
    print(f"{script.name} --smoke-test: {proc.seconds:.1f} s (two scripts at a time)")
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
