"""Training throughput and peak memory of the flow presets, and the cost of the matrix exponential.

Usage::

    python benchmarks/train_throughput.py --quick            # ~1 minute on 2 CPU cores
    python benchmarks/train_throughput.py --out bench.json   # full: batch 64, several steps
    python benchmarks/train_throughput.py --smoke-test       # seconds: the tiny preset, batch 2

Training rows: one float32 step = forward, class-conditional diagonal-gaussian NLL, backward,
Adamax step, on random dequantised 3x32x32 images. Each model runs in a fresh subprocess whose
peak resident set (``VmHWM`` from /proc/self/status, MiB) is its ``peak_mb``; ``images_per_s``
is the batch over the fastest timed step (best-of, because the machine may be shared),
``images_per_s_median`` over the median one.

Matrix-exponential rows: ``torch.linalg.matrix_exp`` on a batch of per-pixel coupling matrices
against a Taylor-series loop that checks convergence with a host sync (``.item()``) per term, as
the released MEF code does; forward alone and forward + backward.

``--smoke-test`` runs the same two workers at toy sizes in seconds: the ``tiny`` flow preset
(unless ``--models`` is given) at batch 2 for one timed step, and the matrix exponential on
[64, 6, 6] and [16, 24, 24] batches once each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

import torch
from _common import (  # benchmarks/ is on sys.path
    benchmark_parser,
    mode_name,
    run_worker,
    vm,
    worker_env,
    write_records,
)

MEF_REFERENCE_PARAMS = 42.9e6
MODELS = ["mef-cifar", "glow-small"]  # full and --quick


# ------------------------------------------------------------------------------------------------
# Training step (runs inside a fresh worker process)
# ------------------------------------------------------------------------------------------------


def _train_worker(model: str, batch: int, steps: int, warmup: int, seed: int) -> dict[str, Any]:
    from nfpi.flows import build_flow

    rss_base = vm("VmRSS")
    torch.manual_seed(seed)
    flow = build_flow(model, in_shape=(3, 32, 32))
    n_params = sum(p.numel() for p in flow.parameters())
    d, k = flow.latent_dim, 10
    # Class gaussians (diagonal), fixed: the flow's training step is what is measured.
    means = torch.randn(k, d) * 0.1
    log_std = torch.zeros(k, d)

    def images() -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.randint(0, 256, (batch, 3, 32, 32)).float()
        x = (pixels + torch.rand_like(pixels)) / 256 * 2 - 1
        return x, torch.randint(0, k, (batch,))

    flow.data_init(images()[0])
    opt = torch.optim.Adamax(flow.parameters(), lr=1e-3)
    times, cpu_times = [], []
    for i in range(warmup + steps):
        x, y = images()
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        z, logdet = flow(x)
        mu, ls = means[y], log_std[y]
        log_p = (-0.5 * ((z - mu) * torch.exp(-ls)) ** 2 - ls).sum(1) - 0.5 * d * math.log(
            2 * math.pi
        )
        # bits/dim of the dequantised 8-bit images ([-1, 1] scaling adds d log 128).
        loss = (-(log_p + logdet).mean() + d * math.log(128)) / (d * math.log(2))
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{model}: non-finite loss at step {i}")
    return {
        "bench": "train_step",
        "model": model,
        "batch": batch,
        "images_per_s": round(batch / min(times), 3),
        "images_per_s_median": round(batch / statistics.median(times), 3),
        "step_s_best": round(min(times), 3),
        "step_s_all": [round(t, 3) for t in times],
        # CPU seconds (all threads) of the step: with passive OpenMP waits this is close to the
        # work itself, so cpu/threads estimates the step time on an otherwise idle machine.
        "cpu_s_per_step": round(statistics.median(cpu_times), 3),
        "steps": steps,
        "peak_mb": round(vm("VmHWM")),
        "rss_base_mb": round(rss_base),
        "params": n_params,
        "threads": torch.get_num_threads(),
        "bits_per_dim_last": round(loss.item(), 4),
        "loadavg_1min": os.getloadavg()[0],
    }


def _run_worker(args: list[str], threads: int | None) -> list[dict]:
    """Run this script's worker mode in a fresh process; its last stdout line is JSON."""
    if threads:
        args = [*args, "--threads", str(threads)]
    env = worker_env()
    stdout = run_worker(__file__, args, env)
    rows = json.loads(stdout.strip().splitlines()[-1])
    rows = rows if isinstance(rows, list) else [rows]
    for row in rows:
        row["omp_wait_policy"] = env["OMP_WAIT_POLICY"]
    return rows


def train_row(model: str, batch: int, steps: int, warmup: int, threads: int | None) -> dict:
    args = ["--worker", model, "--batch", str(batch), "--steps", str(steps)]
    return _run_worker([*args, "--warmup", str(warmup)], threads)[0]


# ------------------------------------------------------------------------------------------------
# Matrix exponential
# ------------------------------------------------------------------------------------------------


def taylor_host_sync(a: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scaling-and-squaring Taylor series that stops when the largest term's 1-norm drops
    below ``eps``: one ``.item()`` (a host synchronisation on a GPU) per term, like the
    released MEF code's ``expm``."""
    norm = torch.linalg.matrix_norm(a, ord=1).max().item()
    squarings = math.ceil(math.log2(max(norm, 0.5))) + 1
    a = a / 2**squarings
    out = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    term, k = a, 2
    while torch.linalg.matrix_norm(term, ord=1).max().item() > eps:
        out = out + term
        term = torch.matmul(a, term) / k
        k += 1
    for _ in range(squarings):
        out = torch.matmul(out, out)
    return out


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matrix_exp_rows(shapes: list[tuple[int, int]], reps: int) -> list[dict]:
    rows = []
    impls = {"matrix_exp": torch.linalg.matrix_exp, "taylor_host_sync": taylor_host_sync}
    for n, c in shapes:
        gen = torch.Generator().manual_seed(0)
        # Like the coupling's M = rescale * tanh(...) at its initial rescale 1/c.
        m = torch.tanh(torch.randn(n, c, c, generator=gen)) / c
        g = torch.randn(n, c, c, generator=gen) / (n * c)
        ref = torch.linalg.matrix_exp(m.double())
        for impl, fn in impls.items():
            err = (fn(m).double() - ref).abs().max().item()
            leaf = m.clone().requires_grad_()

            def fwd_bwd(fn=fn, leaf=leaf, g=g) -> None:
                leaf.grad = None
                (fn(leaf) * g).sum().backward()

            for passes, call in (
                ("forward", lambda fn=fn, m=m: fn(m)),
                ("forward_backward", fwd_bwd),
            ):
                rows.append(
                    {
                        "bench": "matrix_exp",
                        "impl": impl,
                        "shape": f"[{n}, {c}, {c}]",
                        "pass": passes,
                        "seconds": round(_time(call, reps), 6),
                        "max_abs_err": float(f"{err:.2e}"),
                    }
                )
    return rows


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__.splitlines()[0], "batch 16, 2 timed steps (~1 min)")
    p.add_argument(
        "--models",
        nargs="+",
        help="flow presets (default mef-cifar glow-small; tiny with --smoke-test)",
    )
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed training steps per model")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--shapes", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker == "matrix_exp":
        print(json.dumps(matrix_exp_rows(json.loads(args.shapes), args.reps)))
        return
    if args.worker:
        row = _train_worker(args.worker, args.batch, args.steps, args.warmup, seed=0)
        print(json.dumps(row))
        return

    if args.smoke_test:
        models, batch, steps = args.models or ["tiny"], args.batch or 2, args.steps or 1
        shapes, reps = [(64, 6), (16, 24)], 1
    elif args.quick:
        models, batch, steps = args.models or MODELS, args.batch or 16, args.steps or 2
        shapes, reps = [(16 * 16 * 16, 6), (16 * 4 * 4, 24)], 2
    else:
        models, batch, steps = args.models or MODELS, args.batch or 64, args.steps or 3
        shapes, reps = [(64 * 16 * 16, 6), (64 * 4 * 4, 24)], 5
    records: list[dict] = []
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{mode_name(args)} mode, workers with OMP_WAIT_POLICY="
        f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        f"{'model':<12} {'batch':>5} {'images/s':>9} {'(median)':>9} {'peak MiB':>9} {'params':>12}"
        f" {'load':>5} {'cpu s/step':>10} {'idle est. img/s':>15}"
    )
    for model in models:
        row = train_row(model, batch, steps, args.warmup, args.threads)
        records.append(row)
        print(
            f"{row['model']:<12} {row['batch']:>5} {row['images_per_s']:>9.2f} "
            f"{row['images_per_s_median']:>9.2f} {row['peak_mb']:>9} {row['params']:>12,}"
            f" {row['loadavg_1min']:>5.1f} {row['cpu_s_per_step']:>10.1f}"
            f" {row['batch'] * row['threads'] / row['cpu_s_per_step']:>15.2f}",
            flush=True,
        )
        if model == "mef-cifar":
            rel = abs(row["params"] - MEF_REFERENCE_PARAMS) / MEF_REFERENCE_PARAMS
            assert rel < 5e-3, f"mef-cifar has {row['params']:,} parameters, reference 42.9 M"

    mrows = _run_worker(
        ["--worker", "matrix_exp", "--shapes", json.dumps(shapes), "--reps", str(reps)],
        args.threads,
    )
    records += mrows
    print(f"\n{'shape':<16} {'pass':<17} {'matrix_exp s':>12} {'taylor+sync s':>14} {'ratio':>7}")
    for shape in dict.fromkeys(r["shape"] for r in mrows):
        for passes in ("forward", "forward_backward"):
            t = {
                r["impl"]: r["seconds"]
                for r in mrows
                if r["shape"] == shape and r["pass"] == passes
            }
            print(
                f"{shape:<16} {passes:<17} {t['matrix_exp']:>12.4f} {t['taylor_host_sync']:>14.4f} "
                f"{t['taylor_host_sync'] / t['matrix_exp']:>6.2f}x"
            )
    if args.out:
        write_records(args.out, records)


if __name__ == "__main__":
    main()
