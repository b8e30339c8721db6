"""Helpers shared by the benchmark scripts: the standard command line (``--quick``, ``--out``,
``--smoke-test``), peak memory (Linux /proc), the environment of a fresh worker process, and the
``--out`` JSON records."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_WAIT_POLICY = "PASSIVE"  # OMP_WAIT_POLICY of workers unless the caller sets one
SMOKE_HELP = (
    "seconds: the smallest sizes that still run every code path end to end, print the table and "
    "write --out records with the full run's field names (what the test suite runs; the numbers "
    "mean nothing)"
)


def benchmark_parser(
    description: str, quick_help: str, smoke_help: str = SMOKE_HELP
) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark has (:func:`add_benchmark_args`)."""
    parser = argparse.ArgumentParser(description=description)
    add_benchmark_args(parser, quick_help, smoke_help)
    return parser


def add_benchmark_args(
    parser: argparse.ArgumentParser, quick_help: str, smoke_help: str = SMOKE_HELP
) -> None:
    """``--quick`` (reduced sizes, about a minute on a 2-core CPU), ``--smoke-test`` (seconds;
    exclusive with ``--quick``) and ``--out PATH`` (the records, :func:`write_records`)."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help=quick_help)
    mode.add_argument("--smoke-test", action="store_true", help=smoke_help)
    parser.add_argument(
        "--out", metavar="PATH", help="write the records here (JSON list of flat records)"
    )


def mode_name(args: argparse.Namespace) -> str:
    """``smoke``, ``quick`` or ``full``: for the scripts' headers."""
    return "smoke" if args.smoke_test else "quick" if args.quick else "full"


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


def run_worker(script: str, args: list[str], env: dict[str, str]) -> str:
    """Run ``script``'s worker mode (``args``) in a fresh process with ``env``; its stdout.
    A failing worker raises with the end of its stderr (what the caller needs to see)."""
    cmd = [sys.executable, os.path.abspath(script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"worker {args} exited with {out.returncode}:\n{tail}")
    return out.stdout


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def flat_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records as flat, uniform rows (one table): nested dicts become dotted keys
    (``config.tol``), lists and tuples compact JSON text (``"[0.1, 0.2]"``, read back with
    ``json.loads``), and every row has every key, in first-seen order, None where it lacks one."""
    flat = [_flatten(r) for r in records]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    return [{k: r.get(k) for k in keys} for r in flat]


def write_records(path: str, records: list[dict[str, Any]]) -> None:
    """``--out``: the measured rows as a JSON list of flat records (:func:`flat_records`)."""
    Path(path).write_text(json.dumps(flat_records(records), indent=1))
    print(f"\nwrote {len(records)} records to {path}")


def _git(*args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() if out.returncode == 0 else ""


def _commit() -> str:
    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return commit


# The code a run measures is the code it started with: the commit is read when the benchmark
# imports this module, not when it writes its records (a commit made meanwhile is not its own).
_START_COMMIT = _commit()


def provenance(argv: list[str] | None = None) -> dict[str, Any]:
    """What made a table: the commit at the start of the run (``+dirty`` when the tracked files
    differed from it), the command line (``argv``, default ``sys.argv``, relative to the
    repository root) and the UTC date of writing, so that a published table shows when the code
    has moved on since."""
    import shlex
    import time

    commit = _START_COMMIT
    argv = list(sys.argv if argv is None else argv)
    if argv:
        try:
            argv[0] = os.path.relpath(argv[0], ROOT)
        except ValueError:
            pass
    return {
        "commit": commit,
        "command": "python " + shlex.join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def mean_sd(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean +- std`` of ``values`` times ``scale`` (the mean alone for one value; ``-`` when a
    value is NaN: not measured), for the tables' cells."""
    import math
    import statistics

    if any(math.isnan(v) for v in values):
        return "-"
    scaled = [v * scale for v in values]
    sd = f" +- {statistics.stdev(scaled):.{digits}f}" if len(scaled) > 1 else ""
    return f"{statistics.mean(scaled):.{digits}f}{sd}"


def write_published(
    path: str | os.PathLike[str], records: list[dict[str, Any]], argv: list[str] | None = None
) -> None:
    """A published table's records, kept beside it: ``{commit, command, date, records}``
    (:func:`provenance`; ``records`` flat as in :func:`write_records`)."""
    doc = {**provenance(argv), "records": flat_records(records)}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(records)} records with commit {doc['commit'][:12]} to {path}")


# ------------------------------------------------------------------------------------------------
# Devices: every benchmark takes --device cpu|cuda; these keep the timing and memory code shared.
# ------------------------------------------------------------------------------------------------


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda`` (default cpu). CUDA rows run without Ray."""
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where the measured work runs (cuda: times synchronise the device; peak memory is "
        "torch.cuda.max_memory_allocated)",
    )


def check_device(device: str) -> None:
    """Fail early, with the fix, when ``--device cuda`` has no GPU behind it."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch; use --device cpu")


def synchronize(device: str) -> None:
    """Wait for queued device work (a no-op on CPU), so that wall-clock times are complete."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_device_peak(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def device_peak_mb(device: str) -> float | None:
    """Peak memory of the device in MiB since the last reset (None on CPU: use ``vm``)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model name and core count."""
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        name = platform.machine()
    return f"{name}, {os.cpu_count()} cores"
