"""Helpers shared by the benchmark scripts: peak memory (Linux /proc), the environment of a
fresh worker process, and the ``--out`` JSON records."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WAIT_POLICY = "PASSIVE"  # OMP_WAIT_POLICY of workers unless the caller sets one


def vm(field: str) -> float:
    """A /proc/self/status memory field (``VmHWM``, ``VmRSS``...) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a worker subprocess: the project importable, and OpenMP threads that
    sleep at barriers unless ``OMP_WAIT_POLICY`` is set (on a machine shared with other jobs,
    threads spinning on descheduled peers inflate step times several- to 1000-fold)."""
    env = dict(os.environ, **extra)
    env.setdefault("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def write_records(path: str, records: list[dict[str, Any]]) -> None:
    """``--out``: the measured rows as a JSON list of flat records."""
    Path(path).write_text(json.dumps(records, indent=1))
    print(f"\nwrote {len(records)} records to {path}")
