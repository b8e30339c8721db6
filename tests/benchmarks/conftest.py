"""Benchmark scripts run as subprocesses, two at a time.

A smoke-size benchmark run is mostly a fresh interpreter importing torch (and Ray, MLflow):
single-threaded work, so two runs side by side on 2 cores take little longer than one. A test
module's fixture built with :func:`concurrent_runs` starts, at its first test, the runs of
every selected test of that module (in collection order, two at a time); each test then waits
for its own run's completed process and checks it. A test that is not selected starts nothing.
"""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 2  # runs side by side
TIMEOUT_S = 600  # per run: a smoke run takes seconds (ray_overhead: Ray's start-up) when idle


def bench_env() -> dict[str, str]:
    """The environment of a benchmark subprocess: not attached to the suite's own Ray."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # ray_overhead starts its own local Ray
    env.pop("RAY_GCS_SERVER_PORT", None)  # the suite's own Ray's port (tests/conftest.py)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def run_script(script: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """``python <script> <argv>`` from the repository root, its output captured (and its
    wall time in ``seconds``, for the log)."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), *argv],
        cwd=ROOT,
        env=bench_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    proc.seconds = time.perf_counter() - t0
    return proc


@contextmanager
def concurrent_runs(request, plans):
    """``{key: Future[CompletedProcess]}`` for the selected items of the requesting module whose
    test function ``plans`` names: ``plans[name](params) -> (key, script, argv)`` (or None: no
    run) from the item's parameters (``{}`` when it has none). A context manager for a
    module-scoped fixture: on leaving it (the module's end) the runs not started are cancelled
    and the running ones waited for."""
    module = request.module.__name__
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="bench")
    futures: dict = {}
    for item in request.session.items:
        plan = plans.get(getattr(item, "originalname", None))
        if plan is None or item.module.__name__ != module:
            continue
        planned = plan(item.callspec.params if hasattr(item, "callspec") else {})
        if planned is not None and planned[0] not in futures:
            key, script, argv = planned
            futures[key] = pool.submit(run_script, script, argv)
    try:
        yield futures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
