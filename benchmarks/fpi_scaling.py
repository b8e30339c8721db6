"""Time and peak memory of one FPI iteration (GEMM form vs. K x K x d broadcast) and of a solve.

Usage::

    python benchmarks/fpi_scaling.py --quick              # ~1 minute on 2 CPU cores
    python benchmarks/fpi_scaling.py --out fpi.json       # full: K in {10, 100, 1000}, d in {768, 3072}
    python benchmarks/fpi_scaling.py --smoke-test         # seconds: every code path at toy sizes

Iteration rows: one application of the undamped FPI map, float64 on the CPU, with
``Objective(lam=100, alpha=10, pi="pairwise")`` and ``FPIConfig(update="both")``, for
``impl="gemm"`` (:func:`nfpi.prior.fpi_step`, O(K d + K^2) memory) and ``impl="broadcast"``
(:func:`nfpi.prior.naive.fpi_step_broadcast`, O(K^2 d) memory). Broadcast rows whose estimated
footprint (``BROADCAST_TEMPS`` live K x K x d float64 tensors) exceeds ``--budget-gb`` are skipped.
Inputs are random: means ~ N(0, 1), variances ~ U[0.5, 1.5], class statistics alike.

Solve rows: a full :func:`nfpi.prior.solve_fpi` (default Anderson mixing, memory 5) at K = 1000,
d = 3072 from class statistics built the same way (same lambda, alpha, pi), ``update="both"`` with
``var_bounds=(0.25, 1.25)`` and ``update="mean"``, ``max_iter`` 20 (8 with ``--quick``),
``require_convergence=False``. The tolerance is ``SOLVE_TOL`` = 1e-15, near float64 round-off, so
that the solve runs long enough for the Anderson history to fill up (the memory worst case; with a
loose tolerance these random inputs converge in ~4 iterations and the peak is lower). Each solve
is repeated ``--solve-repeats`` times in fresh processes (the resident peak varies by a few hundred
MB with the allocator's state): the row keeps the largest peak and the fastest time.

Every configuration runs in a fresh subprocess (``--worker``). Memory fields, MiB:

- ``peak_mb``: the absolute peak resident set of that process (``VmHWM``), i.e. torch itself,
  the inputs and the computation: the conservative number the 2 GB target is checked against.
- ``baseline_mb``: the resident set after imports and input allocation (``VmRSS``).
- ``peak_extra_mb``: the peak above that baseline (``VmHWM`` is reset through
  ``/proc/self/clear_refs`` after the baseline is taken), i.e. what the computation itself adds.

Times: ``seconds_per_iter`` is the best of the timed repetitions (the machine may be shared),
``seconds_per_iter_median`` the median. For solves it is the wall time over the iteration count
(one iteration = one evaluation of the FPI map plus the mixing). ``cpu_seconds_per_iter`` is the
best process CPU time (all threads) per iteration: with ``--threads 1`` it is insensitive to other
processes' load. ``loadavg`` is the 1-minute load
average after the row: on a shared machine a load above the core count means other processes
competed for the cores, and with several torch threads that can inflate small-problem times by
orders of magnitude (OpenMP threads spin-waiting on descheduled peers). The workers therefore run
with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable is set (``OMP_WAIT_POLICY=ACTIVE`` restores
spinning, slightly faster on an idle machine); ``--threads 1`` is the most load-robust setting.
``kkd_temporaries`` (broadcast rows): ``peak_extra_mb`` in units of one K x K x d float64 tensor;
``max_rel_diff_vs_gemm``: largest relative difference between the two implementations' outputs.

Targets (printed as PASS/FAIL; exit status 0 either way): the K = 1000, d = 3072 solves within
2 GB peak, checked both for the solve's own footprint (``peak_extra_mb``) and for the absolute
process peak (``peak_mb``); >= 20x faster per iteration than broadcast at K = 100, d = 3072.

``--device cuda`` runs every row on the GPU (float64; the broadcast budget then applies to GPU
memory): ``peak_mb`` is ``torch.cuda.max_memory_allocated`` (reset after the inputs were
allocated; ``peak_extra_mb`` above them), ``host_peak_mb`` the process's resident peak; times
synchronise the device. The K = 1000, d = 3072 solve rows are the GPU rows of the issue.

``--smoke-test`` runs the same steps at toy sizes in seconds: iteration rows at K in {4, 32},
d = 16 with a budget that skips the K = 32 broadcast row, both solves at K = 32, d = 16 for 3
iterations, every configuration still in its own worker process; the targets are then checked at
those sizes (their verdicts mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from _common import (  # benchmarks/ is on sys.path
    DEFAULT_WAIT_POLICY,
    add_device_arg,
    benchmark_parser,
    check_device,
    device_name,
    device_peak_mb,
    mode_name,
    reset_device_peak,
    synchronize,
    vm,
    worker_env,
    write_records,
)

LAM, ALPHA = 100.0, 10.0
BROADCAST_TEMPS = 6  # live K x K x d float64 temporaries assumed when estimating the broadcast
TARGET_SOLVE_MB = 2048.0  # K = 1000, d = 3072 solve within 2 GB peak
TARGET_SPEEDUP = 20.0  # gemm vs broadcast per iteration at K = 100, d = 3072
SOLVE_TOL = 1e-15  # near round-off: the solve runs until the Anderson history is full
MIB = 1024.0 * 1024.0
SMOKE_BUDGET_GB = 1e-4  # --smoke-test: keeps the K = 4 broadcast row, skips the K = 32 one


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _wait_policy() -> str:
    return os.environ.get("OMP_WAIT_POLICY", DEFAULT_WAIT_POLICY)


def broadcast_estimate_gb(k: int, d: int) -> float:
    return BROADCAST_TEMPS * k * k * d * 8 / 1024**3


# ------------------------------------------------------------------------------------------------
# Worker (fresh process per configuration)
# ------------------------------------------------------------------------------------------------


def _inputs(k: int, d: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64}
    mu = torch.randn(k, d, generator=gen, **f64)
    v = 0.5 + torch.rand(k, d, generator=gen, **f64)
    m = torch.randn(k, d, generator=gen, **f64)
    s = 0.5 + torch.rand(k, d, generator=gen, **f64)
    return tuple(t.to(device) for t in (mu, v, m, s))


def _device_base(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else 0.0


def _peaks(
    device: str, hwm: float, baseline: float, reset: bool, hwm_before: float, base: float
) -> dict:
    """Memory fields: the process's resident peak on CPU; on CUDA the device's peak
    (``torch.cuda.max_memory_allocated``, reset after the inputs were allocated, whose size is
    ``base``) with the host peak beside it."""
    if device == "cuda":
        peak = device_peak_mb(device)
        return {
            "peak_mb": peak,
            "baseline_mb": base,
            "peak_extra_mb": peak - base,
            "host_peak_mb": hwm,
        }
    return {
        "peak_mb": max(hwm, hwm_before) if reset else hwm,
        "baseline_mb": baseline,
        "peak_extra_mb": hwm - baseline if reset else float("nan"),
    }


def _step_worker(
    k: int, d: int, impl: str, min_reps: int, min_seconds: float, seed: int, device: str = "cpu"
) -> dict[str, Any]:
    from nfpi.prior import FPIConfig, Objective, fpi_step
    from nfpi.prior.naive import fpi_step_broadcast

    step = fpi_step if impl == "gemm" else fpi_step_broadcast
    objective = Objective(lam=LAM, alpha=ALPHA, pi="pairwise")
    config = FPIConfig(update="both")
    mu, v, m, s = _inputs(k, d, seed, device)
    baseline, hwm_before, base = vm("VmRSS"), vm("VmHWM"), _device_base(device)
    reset = _reset_peak()
    reset_device_peak(device)
    times: list[float] = []
    cpu_times: list[float] = []
    with torch.no_grad():
        mu_new, v_new = step(mu, v, m, s, objective, config)  # warm-up (also part of the peak)
        finite = bool(torch.isfinite(mu_new).all() and torch.isfinite(v_new).all())
        del mu_new, v_new
        start = time.perf_counter()
        while len(times) < min_reps or time.perf_counter() - start < min_seconds:
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            out = step(mu, v, m, s, objective, config)
            synchronize(device)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            del out
            if len(times) >= 1000:
                break
    peaks = _peaks(device, vm("VmHWM"), baseline, reset, hwm_before, base)
    agree = None
    if impl == "broadcast":  # same map? (after the peak was read)
        with torch.no_grad():
            ref = fpi_step(mu, v, m, s, objective, config)
            got = fpi_step_broadcast(mu, v, m, s, objective, config)
        agree = max(
            float(((g - r).abs() / r.abs().clamp_min(1e-300)).max()) for g, r in zip(got, ref)
        )
    return {
        "max_rel_diff_vs_gemm": agree,
        "seconds_per_iter": min(times),
        "seconds_per_iter_median": statistics.median(times),
        "cpu_seconds_per_iter": min(cpu_times),
        "reps": len(times),
        **peaks,
        "finite": finite,
    }


def _solve_worker(
    k: int, d: int, update: str, max_iter: int, seed: int, device: str = "cpu"
) -> dict[str, Any]:
    from nfpi.prior import ClassStatistics, FPIConfig, Objective, solve_fpi

    _, _, m, s = _inputs(k, d, seed, device)
    n = 100.0  # samples per class: only the sums matter
    f64 = {"dtype": torch.float64, "device": device}
    stats = ClassStatistics(
        count=torch.full((k,), n, **f64), sum=torch.zeros(k, d, **f64), sumsq=s * (n - 1.0), shift=m
    )
    del m, s
    bounds = (0.25, 1.25) if update == "both" else None
    objective = Objective(lam=LAM, alpha=ALPHA, pi="pairwise")
    config = FPIConfig(
        update=update,
        var_bounds=bounds,
        tol=SOLVE_TOL,
        max_iter=max_iter,
        require_convergence=False,
    )
    baseline, hwm_before, base = vm("VmRSS"), vm("VmHWM"), _device_base(device)
    reset = _reset_peak()
    reset_device_peak(device)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        prior, report = solve_fpi(stats, objective, config)
    synchronize(device)
    elapsed = time.perf_counter() - t0
    peaks = _peaks(device, vm("VmHWM"), baseline, reset, hwm_before, base)
    return {
        "seconds_per_iter": elapsed / report.iterations,
        "seconds_total": elapsed,
        "iterations": report.iterations,
        "stop_reason": report.stop_reason,
        "final_residual": report.final_residual,
        "at_bounds": report.at_lower_bound + report.at_upper_bound,
        **peaks,
        "finite": bool(torch.isfinite(prior.means).all() and torch.isfinite(prior.var).all()),
    }


def _worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    spec = json.loads(args.worker)
    device = spec.get("device", "cpu")
    if spec["kind"] == "step":
        out = _step_worker(
            spec["K"],
            spec["d"],
            spec["impl"],
            spec["min_reps"],
            spec["min_seconds"],
            spec["seed"],
            device,
        )
    else:
        out = _solve_worker(
            spec["K"], spec["d"], spec["update"], spec["max_iter"], spec["seed"], device
        )
    print("RESULT " + json.dumps(out), flush=True)


def _run_worker(spec: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--threads",
        str(threads),
        "--worker",
        json.dumps(spec),
    ]
    env = worker_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exit {proc.returncode}: {' | '.join(tail)}"}


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _fmt_time(sec: float | None) -> str:
    if sec is None:
        return "-"
    return f"{sec * 1e3:.3g} ms" if sec < 1 else f"{sec:.3g} s"


def _print_row(rec: dict[str, Any], speed: str, note: str) -> None:
    print(
        f"{rec['K']:>5} {rec['d']:>5} {rec['impl']:<10} "
        f"{_fmt_time(rec.get('seconds_per_iter')):>11} "
        f"{_fmt_time(rec.get('seconds_per_iter_median')):>10} "
        f"{_fmt_mb(rec.get('peak_mb')):>8} {_fmt_mb(rec.get('peak_extra_mb')):>9} "
        f"{speed:>8} {rec.get('loadavg', float('nan')):>5.1f}  {note}"
    )


def _fmt_mb(mb: float | None) -> str:
    return "-" if mb is None else f"{mb:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0], "reduced sizes (~1 minute)")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads (default: all cores available)",
    )
    parser.add_argument(
        "--budget-gb",
        type=float,
        default=None,
        help=f"skip broadcast rows whose estimated memory exceeds this (default 12; "
        f"{SMOKE_BUDGET_GB:g} with --smoke-test, which skips the K = 32 row)",
    )
    parser.add_argument(
        "--solve-repeats",
        type=int,
        default=None,
        help="fresh-process repeats of each solve (default 2, 1 with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ks", type=int, nargs="+", help="iteration rows: these K only (default 10 100 1000)"
    )
    parser.add_argument(
        "--ds", type=int, nargs="+", help="iteration rows: these d only (default 768 3072)"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_device_arg(parser)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    check_device(args.device)

    ks, ds = (10, 100, 1000), (768, 3072)
    solve_kd, speedup_kd, budget_gb = (1000, 3072), (100, 3072), args.budget_gb or 12.0
    if args.smoke_test:  # toy sizes; a broadcast row over the budget; both solves
        ks, ds = (4, 32), (16,)
        solve_kd, speedup_kd = (32, 16), (4, 16)
        budget_gb = args.budget_gb or SMOKE_BUDGET_GB
        min_reps, min_seconds = 1, 0.0
        solves, repeats = [("both", 3), ("mean", 3)], args.solve_repeats or 1
    elif args.quick:
        min_reps, min_seconds = 2, 0.3
        solves, repeats = [("both", 8)], args.solve_repeats or 1
    else:
        min_reps, min_seconds = 5, 3.0
        solves, repeats = [("both", 20), ("mean", 20)], args.solve_repeats or 2
    ks, ds = tuple(args.ks or ks), tuple(args.ds or ds)

    where = "CPU" if args.device == "cpu" else f"CUDA ({device_name(args.device)})"
    print(
        f"torch {torch.__version__}, threads {args.threads} (of {os.cpu_count()} cores), "
        f"float64 {where}, lam={LAM:g} alpha={ALPHA:g} pi=pairwise; OMP_WAIT_POLICY="
        f"{_wait_policy()}; load average "
        f"{os.getloadavg()[0]:.1f}{'' if mode_name(args) == 'full' else f' ({mode_name(args)})'}"
    )
    print(
        "peak MB = absolute process peak (VmHWM, torch included); extra MB = peak above the "
        "baseline after imports and inputs"
        if args.device == "cpu"
        else "peak MB = torch.cuda.max_memory_allocated; extra MB = peak above the inputs"
    )
    records: list[dict[str, Any]] = []
    header = (
        f"{'K':>5} {'d':>5} {'impl':<10} {'s/iter best':>11} {'median':>10} "
        f"{'peak MB':>8} {'extra MB':>9} {'speedup':>8} {'load':>5}  note"
    )
    print(header)
    print("-" * len(header))
    for k in ks:
        for d in ds:
            pair: dict[str, dict[str, Any]] = {}
            for impl in ("gemm", "broadcast"):
                rec: dict[str, Any] = {
                    "K": k,
                    "d": d,
                    "impl": impl,
                    "device": args.device,
                    "threads": args.threads,
                    "omp_wait_policy": _wait_policy(),
                }
                pair[impl] = rec
                records.append(rec)
                need = broadcast_estimate_gb(k, d) if impl == "broadcast" else 0.0
                if impl == "broadcast":
                    rec["estimated_gb"] = round(need, 2)
                if need > budget_gb:
                    rec.update(
                        seconds_per_iter=None,
                        peak_mb=None,
                        skipped=True,
                        loadavg=os.getloadavg()[0],
                    )
                    size = f"{need:.0f} GB" if need >= 1 else f"{need * 1024:.2g} MB"
                    rec["note"] = f"skipped (needs ~{size})"
                    continue
                spec = {
                    "kind": "step",
                    "K": k,
                    "d": d,
                    "impl": impl,
                    "min_reps": min_reps,
                    "min_seconds": min_seconds,
                    "seed": args.seed,
                    "device": args.device,
                }
                rec.update(
                    _run_worker(spec, args.threads, timeout=600),
                    skipped=False,
                    loadavg=os.getloadavg()[0],
                )
                if "error" in rec:
                    rec.update(seconds_per_iter=None, peak_mb=None, note=f"ERROR {rec['error']}")
                    continue
                rec["note"] = f"reps={rec['reps']}"
                if impl == "broadcast" and k * k * d * 8 >= 16 * MIB:
                    rec["kkd_temporaries"] = rec["peak_extra_mb"] * MIB / (k * k * d * 8)
                    rec["note"] += f", {rec['kkd_temporaries']:.1f} KxKxd temporaries"
                if rec.get("max_rel_diff_vs_gemm") is not None:
                    rec["note"] += f", max rel diff vs gemm {rec['max_rel_diff_vs_gemm']:.1e}"
            gemm, bcast = pair["gemm"], pair["broadcast"]
            if gemm.get("seconds_per_iter") and bcast.get("seconds_per_iter"):
                gemm["speedup"] = bcast["speedup"] = (
                    bcast["seconds_per_iter"] / gemm["seconds_per_iter"]
                )
            for rec in (gemm, bcast):
                speed = f"{rec['speedup']:.1f}x" if "speedup" in rec else "-"
                _print_row(rec, speed, rec.pop("note"))

    k, d = solve_kd
    for update, max_iter in solves:
        impl = f"solve_{update}"
        rec = {
            "K": k,
            "d": d,
            "impl": impl,
            "device": args.device,
            "threads": args.threads,
            "update": update,
            "tol": SOLVE_TOL,
            "max_iter": max_iter,
            "var_bounds": [0.25, 1.25] if update == "both" else None,
        }
        spec = {
            "kind": "solve",
            "K": k,
            "d": d,
            "update": update,
            "max_iter": max_iter,
            "seed": args.seed,
            "device": args.device,
        }
        runs = [_run_worker(spec, args.threads, timeout=600) for _ in range(repeats)]
        good = [r for r in runs if "error" not in r]
        rec["loadavg"] = os.getloadavg()[0]
        records.append(rec)
        if not good:
            rec.update(runs[0], seconds_per_iter=None, peak_mb=None)
            _print_row(rec, "-", f"ERROR {rec['error']}")
            continue
        rec.update(max(good, key=lambda r: r["peak_mb"]))
        rec["peak_mb_runs"] = [r["peak_mb"] for r in good]
        rec["peak_extra_mb_runs"] = [r["peak_extra_mb"] for r in good]
        rec["peak_extra_mb"] = max(rec["peak_extra_mb_runs"])
        rec["seconds_per_iter"] = min(r["seconds_per_iter"] for r in good)
        rec["seconds_total"] = min(r["seconds_total"] for r in good)
        _print_row(
            rec,
            "-",
            f"{rec['iterations']} it ({rec['stop_reason']}, residual "
            f"{rec['final_residual']:.2g}), best {rec['seconds_total']:.1f} s, "
            f"{rec['at_bounds']} at bounds, {len(good)} run(s)",
        )

    print()
    solves_done = [r for r in records if r["impl"].startswith("solve_")]
    if solves_done and all(r.get("peak_mb") is not None for r in solves_done):
        for field, what in (
            ("peak_extra_mb", "solve footprint (peak above baseline)"),
            ("peak_mb", "absolute process peak (torch included)"),
        ):
            worst = max(solves_done, key=lambda r: r[field])
            verdict = "PASS" if worst[field] <= TARGET_SOLVE_MB else "FAIL"
            print(
                f"{verdict}: K={k}, d={d} {what}: {worst[field]:.0f} MB "
                f"({worst['impl']}) <= {TARGET_SOLVE_MB:.0f} MB"
            )
    else:
        print(f"FAIL: K={k}, d={d} solve did not run")
    k, d = speedup_kd
    target = next(
        (r for r in records if r["K"] == k and r["d"] == d and r["impl"] == "broadcast"), None
    )
    if target is not None and target.get("speedup"):
        verdict = "PASS" if target["speedup"] >= TARGET_SPEEDUP else "FAIL"
        print(
            f"{verdict}: K={k}, d={d} per-iteration speedup over broadcast "
            f"{target['speedup']:.1f}x >= {TARGET_SPEEDUP:.0f}x"
        )
    else:
        print(f"FAIL: K={k}, d={d} speedup not measured")
    if args.smoke_test:
        print("smoke test: toy sizes, the verdicts above say nothing about the targets")
    if os.getloadavg()[0] > args.threads:
        print(
            f"note: load average {os.getloadavg()[0]:.1f} > {args.threads} threads: other "
            "processes shared the cores, timings may be disturbed"
        )

    if args.out:
        write_records(args.out, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
