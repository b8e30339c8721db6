"""What Ray costs: epoch time of a Ray Train run against the library's plain loop on the same
data, the prior refresh (all-reduce + actor solve + return) as a fraction of an epoch, and 2
workers against 1.

    python benchmarks/ray_overhead.py [--quick] [--out results.json]

Workload: scikit-learn digits (bundled) with a small MEF flow, FPI prior solved at the end of
epoch 1, evaluation every epoch, no pictures. Every setting runs the same config and torch uses
one thread per process (what a Ray worker with one CPU gets), so the ratios measure Ray itself;
``ray_2workers`` splits each batch over two workers on this machine's two cores.

Records: ``setting`` (plain, ray_1worker, ray_2workers), ``epoch_s`` (median epoch after
start-up), ``prior_refresh_s`` (the solve epoch's refresh: actor/service call + broadcast),
``startup_s`` (wall time not spent in epochs), ``epochs``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import write_records  # benchmarks/ is on sys.path when a script runs

from nfpi.presets import experiment_config
from nfpi.training import Trainer


def _config(epochs: int):
    return experiment_config(
        "digits",
        {
            "eval.plots": False,
            "optim.epochs": epochs,
            "prior.solve_epoch": 1,
            "flow.hidden": 64,
            "flow.blocks": 2,
            "flow.steps": 4,
        },
    )


def _summary(history: list[dict], wall: float) -> dict:
    after = [h["epoch_seconds"] for h in history[1:]] or [history[0]["epoch_seconds"]]
    refresh = [h["prior_refresh_s"] for h in history if "prior_refresh_s" in h]
    return {
        "epoch_s": statistics.median(after),
        "prior_refresh_s": refresh[0] if refresh else float("nan"),
        "prior_stats_s": next(
            (h["prior_stats_s"] for h in history if "prior_stats_s" in h), float("nan")
        ),
        "startup_s": wall - sum(h["epoch_seconds"] for h in history),
        "epochs": len(history),
        "nf_acc": history[-1]["nf_acc"],
    }


def run_plain(epochs: int, tmp: Path) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    history = Trainer(_config(epochs), tmp / "plain").fit()
    return {"setting": "plain", **_summary(history, time.perf_counter() - t0)}


def run_ray(epochs: int, workers: int, tmp: Path) -> dict:
    import ray

    from ray_jobs.train import run_experiment

    if not ray.is_initialized():
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    result = run_experiment(
        _config(epochs),
        storage_path=tmp / "ray",
        run_name=f"overhead-{workers}",
        num_workers=workers,
    )
    wall = time.perf_counter() - t0
    history = torch.load(Path(result.checkpoint.path) / "state.pt", weights_only=True)["history"]
    return {
        "setting": f"ray_{workers}worker{'s' if workers > 1 else ''}",
        **_summary(history, wall),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs instead of 6 (~1-2 minutes)")
    parser.add_argument("--out", help="write the records (JSON list) here")
    args = parser.parse_args(argv)
    epochs = 3 if args.quick else 6
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [run_plain(epochs, tmp), run_ray(epochs, 1, tmp), run_ray(epochs, 2, tmp)]
    plain, one, two = rows
    print(
        f"\nRay overhead on digits (MEF hidden 64, 4 steps x 2 levels), {epochs} epochs, torch 1 thread/process"
    )
    print(
        f"{'setting':<14}{'epoch_s':>9}{'refresh_s':>11}{'stats_s':>9}{'startup_s':>11}{'nf_acc':>8}"
    )
    for r in rows:
        print(
            f"{r['setting']:<14}{r['epoch_s']:>9.3f}{r['prior_refresh_s']:>11.4f}{r['prior_stats_s']:>9.3f}"
            f"{r['startup_s']:>11.1f}{r['nf_acc']:>8.3f}"
        )
    ratio = one["epoch_s"] / plain["epoch_s"]
    frac = one["prior_refresh_s"] / one["epoch_s"]
    print(
        f"\nray_1worker / plain epoch time: {ratio:.3f}x (target <= 1.15x) -> {'PASS' if ratio <= 1.15 else 'FAIL'}"
    )
    print(
        f"prior refresh / epoch (ray_1worker): {100 * frac:.2f}% (target <= 5%) -> {'PASS' if frac <= 0.05 else 'FAIL'}"
    )
    print(f"2 workers vs 1: {one['epoch_s'] / two['epoch_s']:.2f}x faster per epoch")
    if args.out:
        write_records(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
