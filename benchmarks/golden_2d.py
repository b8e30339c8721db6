"""The 2-D golden case (method notes section 4): CIFAR-10 t-SNE embedding, lambda 1000, alpha 10.

Usage::

    python benchmarks/golden_2d.py                      # a few seconds; --quick is the same run
    python benchmarks/golden_2d.py --out golden.json --data /path/to/cifar10_tsne2d.npz
    python benchmarks/golden_2d.py --smoke-test         # runs without the data file too

Three solves from the class statistics (means, unbiased variances) of the 50,000 points, all with
``Objective(lam=1000, alpha=10, pi="pairwise")``:

- ``reference``: the released code's variant, ``FPIConfig.reference(summed_q=False,
  isotropic_mean=True)`` from the data start. The authors' stored
  output stops after 20 iterations with last changes 0.0753 (mu) and 0.0119 (v).
- ``paper_mean_only``: paper form, ``update="mean"`` (variances fixed at the class variances),
  ``tol=1e-9``.
- ``paper_bounded``: paper form, ``update="both"``, ``var_bounds=(1, 2000)``, ``tol=1e-9``.

For the paper forms the autograd gradient of the objective (``prior_objective``, pi detached) is
evaluated at the result: ``grad_max_abs`` is its largest magnitude over the free coordinates
(the means, and the variances strictly inside the bounds), ``grad_max_abs_start`` the same at the
data start for scale; at the bounds the gradient must point outward (``grad_outward_at_bounds``).

Output: a table and the results as one JSON object (keys ``reference``, ``paper_mean_only`` and
``paper_bounded``, each holding ``iterations``, ``converged``, ``mean`` (K x 2), ``var`` (K x 2),
``last_change_mean``, ``last_change_var`` and the fields above); ``--out`` writes one flat record
per solve: ``solve`` (the name), ``data`` (the file, or ``synthetic``) and those fields, with
``mean``, ``var`` and ``grad_at_bounds`` as JSON text and ``config`` as ``config.<field>``.

``--smoke-test`` is the same run when the data file exists (it takes seconds); without it, the
solves run on synthetic 2-D blobs of the golden case's scale (10 classes x 500 points, means
N(0, 15^2), variances 400-1500), say so, and skip the comparison with the stored output.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch
from _common import (  # benchmarks/ is on sys.path
    add_device_arg,
    benchmark_parser,
    check_device,
    write_records,
)

from nfpi.prior import ClassStatistics, FPIConfig, Objective, prior_objective, solve_fpi

DEFAULT_DATA = "/work/shared/data/cifar10_tsne2d.npz"
LAM, ALPHA, PI = 1000.0, 10.0, "pairwise"
OBJECTIVE = Objective(lam=LAM, alpha=ALPHA, pi=PI)
SYNTHETIC = "synthetic"  # the ``data`` field of a smoke test without the data file
BOUNDS = (1.0, 2000.0)
EXPECTED = {"iterations": 20, "last_change_mean": 0.0753, "last_change_var": 0.0119}


def load_statistics(path: str) -> ClassStatistics:
    if not os.path.isfile(path):
        raise SystemExit(
            f"error: golden data not found at {path!r}; pass --data PATH to the "
            "cifar10_tsne2d.npz file (x: float32 [50000, 2], y: int64 [50000])"
        )
    with np.load(path) as data:
        missing = {"x", "y"} - set(data.files)
        if missing:
            raise SystemExit(
                f"error: {path!r} lacks the arrays {sorted(missing)} (has {data.files})"
            )
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
    if x.ndim != 2 or x.shape[1] != 2 or y.shape != (x.shape[0],):
        raise SystemExit(
            f"error: expected x [N, 2] and y [N], got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    return ClassStatistics.from_batch(x, y, int(y.max()) + 1)


def synthetic_statistics(k: int = 10, n: int = 500, seed: int = 0) -> ClassStatistics:
    """Class statistics of 2-D gaussian blobs at the golden case's scale (means within ~25 of
    the origin, variances 400-1500): what ``--smoke-test`` solves when the data file is absent."""
    gen = torch.Generator().manual_seed(seed)
    f64 = {"dtype": torch.float64}
    means = 15.0 * torch.randn(k, 2, generator=gen, **f64)
    std = (400.0 + 1100.0 * torch.rand(k, 2, generator=gen, **f64)).sqrt()
    y = torch.arange(k).repeat_interleave(n)
    x = means[y] + std[y] * torch.randn(k * n, 2, generator=gen, **f64)
    return ClassStatistics.from_batch(x, y, k)


def _gradient(
    means: torch.Tensor, var: torch.Tensor, m: torch.Tensor, s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    mu = means.detach().clone().requires_grad_(True)
    v = var.detach().clone().requires_grad_(True)
    loss = prior_objective(mu, v, m, s, lam=LAM, alpha=ALPHA, pi=PI)
    g_mu, g_v = torch.autograd.grad(loss, (mu, v))
    return g_mu, g_v


def solve(name: str, config: FPIConfig, stats: ClassStatistics) -> dict[str, Any]:
    t0 = time.perf_counter()
    prior, report = solve_fpi(stats, OBJECTIVE, config)
    elapsed = time.perf_counter() - t0
    out: dict[str, Any] = {
        "iterations": report.iterations,
        "converged": report.converged,
        "stop_reason": report.stop_reason,
        "mean": prior.means.tolist(),
        "var": prior.var.tolist(),
        "last_change_mean": report.residuals_mean[-1],
        "last_change_var": report.residuals_var[-1],
        "seconds": elapsed,
        "config": {
            k: v
            for k, v in config.to_dict().items()
            if k
            in (
                "form",
                "update",
                "summed_q",
                "isotropic_mean",
                "tol",
                "var_bounds",
                "damping",
                "round_float32",
            )
        },
    }
    if config.form == "reference":
        out["expected"] = EXPECTED
        out["matches_expected"] = (
            report.iterations == EXPECTED["iterations"]
            and round(out["last_change_mean"], 4) == EXPECTED["last_change_mean"]
            and round(out["last_change_var"], 4) == EXPECTED["last_change_var"]
        )
        return out

    m, s = stats.mean(), stats.var()
    g_mu, g_v = _gradient(prior.means, prior.var, m, s)
    g0_mu, g0_v = _gradient(m, s, m, s)
    free_v = torch.zeros_like(prior.var, dtype=torch.bool)
    outward = True
    if config.update != "mean":
        free_v = torch.ones_like(free_v)
        if config.var_bounds is not None:
            lo, hi = config.var_bounds
            at_lo = prior.var <= lo * (1 + 1e-12)
            at_hi = prior.var >= hi * (1 - 1e-12)
            free_v = ~(at_lo | at_hi)
            # Outward: L decreases when leaving the box (dL/dv > 0 at v_min, < 0 at v_max).
            outward = bool((g_v[at_lo] > 0).all() and (g_v[at_hi] < 0).all())
            out["grad_at_bounds"] = g_v[~free_v].tolist()
    free = torch.cat([g_mu.flatten(), g_v[free_v]])
    free0 = torch.cat([g0_mu.flatten(), g0_v[free_v]])
    out.update(
        grad_max_abs=float(free.abs().max()),
        grad_max_abs_mean=float(g_mu.abs().max()),
        grad_max_abs_var_free=float(g_v[free_v].abs().max()) if free_v.any() else 0.0,
        grad_max_abs_start=float(free0.abs().max()),
        free_var_coords=int(free_v.sum()),
        at_lower_bound=report.at_lower_bound,
        at_upper_bound=report.at_upper_bound,
        at_bounds=report.at_lower_bound + report.at_upper_bound,
        grad_outward_at_bounds=outward,
        anderson_accepted=report.anderson_accepted,
        anderson_rejected=report.anderson_rejected,
    )
    return out


def _print_table(results: dict[str, dict[str, Any]], stats: ClassStatistics) -> None:
    print(
        f"{'solve':<16} {'iters':>5} {'conv':>5} {'last dmu':>10} {'last dv':>10} "
        f"{'|grad| free':>11} {'|grad| start':>12} {'at bounds':>9} {'time':>7}"
    )
    for name, r in results.items():
        grad = f"{r['grad_max_abs']:.2e}" if "grad_max_abs" in r else "-"
        grad0 = f"{r['grad_max_abs_start']:.2e}" if "grad_max_abs_start" in r else "-"
        bounds = str(r["at_bounds"]) if "at_bounds" in r else "-"
        print(
            f"{name:<16} {r['iterations']:>5} {r['converged']!s:>5} "
            f"{r['last_change_mean']:>10.4g} {r['last_change_var']:>10.4g} {grad:>11} "
            f"{grad0:>12} {bounds:>9} {r['seconds']:>6.2f}s"
        )
    ref = results["reference"]
    print(
        f"reference vs stored output: {ref['iterations']} iterations, last changes "
        f"{ref['last_change_mean']:.4f} (mu) / {ref['last_change_var']:.4f} (v); expected "
        f"{EXPECTED['iterations']}, {EXPECTED['last_change_mean']} / "
        f"{EXPECTED['last_change_var']}: "
        + {True: "MATCH", False: "MISMATCH", None: "n/a (synthetic data)"}[ref["matches_expected"]]
    )
    bnd = results["paper_bounded"]
    print(
        f"paper_bounded: {bnd['at_lower_bound']} variances at v_min, {bnd['at_upper_bound']} at "
        f"v_max, gradient outward there: {bnd['grad_outward_at_bounds']}"
    )
    print()
    m, s = stats.mean().tolist(), stats.var().tolist()
    cols = [("data", m, s)] + [(name, r["mean"], r["var"]) for name, r in results.items()]
    print(
        f"{'class':>5} " + " ".join(f"{name + ' mu':>21} {name + ' v':>17}" for name, _, _ in cols)
    )
    for y in range(len(m)):
        cells = []
        for _, mu, v in cols:
            cells.append(f"({mu[y][0]:>8.2f},{mu[y][1]:>8.2f}) ({v[y][0]:>7.1f},{v[y][1]:>7.1f})")
        print(f"{y:>5} " + "   ".join(cells))


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0], "same run (it is fast)")
    parser.add_argument("--data", default=DEFAULT_DATA, help=f"npz file (default {DEFAULT_DATA})")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch intra-op threads (default: all cores available)",
    )
    add_device_arg(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    torch.set_num_threads(args.threads)
    if args.smoke_test and not os.path.isfile(args.data):
        data, stats = SYNTHETIC, synthetic_statistics()
        print(
            f"smoke test: golden data not found at {args.data!r}; solving synthetic 2-D blobs "
            "instead (10 classes x 500 points), so the stored-output check does not apply"
        )
    else:
        data, stats = args.data, load_statistics(args.data)
    stats = stats.to(args.device)  # --device cuda: the solves run on the GPU (float64)
    print(
        f"torch {torch.__version__}, {args.device}, threads {args.threads}; {data}: "
        f"K={stats.num_classes}, "
        f"N={int(stats.count.sum())}; lambda={LAM:g} alpha={ALPHA:g} pi={PI}"
    )
    configs = {
        "reference": FPIConfig.reference(summed_q=False, isotropic_mean=True),
        "paper_mean_only": FPIConfig(update="mean", tol=1e-9),
        "paper_bounded": FPIConfig(update="both", var_bounds=BOUNDS, tol=1e-9),
    }
    results = {name: solve(name, config, stats) for name, config in configs.items()}
    if data == SYNTHETIC:
        results["reference"]["matches_expected"] = None
    _print_table(results, stats)
    text = json.dumps(results)
    print()
    print(text)
    if args.out:
        write_records(args.out, [{"solve": n, "data": data, **r} for n, r in results.items()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
