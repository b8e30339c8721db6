"""Table 1 at toy scale: data-init, GD under each learning-rate policy, and FPI priors on
scikit-learn's digits, equal epoch budgets, several seeds; NF-Acc and test bits/dim (mean +- std).

    python benchmarks/table1_digits.py [--quick | --smoke-test] [--out PATH] [--epochs N]
        [--methods data-init,gd,fpi] [--policies P,...] [--curves] [--set KEY=VALUE ...] [--record PATH]

Single-process runs of the library loop (no Ray), the ``digits`` experiment (tiny MEF flow)
with plots off. Every method runs the preset's schedule (prior updates at the end of epochs 0
and 1, then frozen) at the same objective (``prior.objective``: lambda 1000, alpha 10, pi
pairwise); GD runs ``--gd-steps`` Adam steps per update (default: the preset's), its policy
decaying over all of the run's GD steps; ``geometric_knots`` is the release's default policy.
Records: ``method`` (data-init, gd, fpi), ``policy`` (GD only), ``seed``, ``nf_acc``,
``test_bpd``, ``epochs``, ``lam``.

``--smoke-test`` runs every method and policy once, 1 epoch of a toy run (20 training and 10 test
digits per class, batch 50, MEF hidden width 8, 2 GD steps per epoch), in seconds.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import (  # benchmarks/ is on sys.path
    add_device_arg,
    benchmark_parser,
    check_device,
    write_published,
    write_records,
)

from nfpi.presets import experiment_config, parse_override
from nfpi.prior import POLICY_POWERS, PRIOR_METHODS
from nfpi.training import Trainer

# --smoke-test: a toy run of the same shape, seconds per method.
SMOKE = {
    "data.items_per_class": 20,
    "data.test_items_per_class": 10,
    "optim.batch_size": 50,
    "optim.warmup_steps": 5,
    "flow.hidden": 8,
}


def _variants(total_gd_steps: int, gd_steps: int) -> list[tuple[str, str | None, dict]]:
    out: list[tuple[str, str | None, dict]] = [("data-init", None, {"prior.method": "data-init"})]
    for policy in ("geometric_knots", *POLICY_POWERS):
        out.append(
            (
                "gd",
                policy,
                {
                    "prior.method": "gd",
                    "prior.gd.steps_per_solve": gd_steps,
                    "prior.gd.policy": {
                        "name": policy,
                        "lr0": 0.1,
                        "lr_min": 1e-3,
                        "total_steps": total_gd_steps,
                    },
                },
            )
        )
    out.append(("fpi", None, {"prior.method": "fpi"}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0], "8 epochs, 1 seed (~1-2 minutes)")
    parser.add_argument(
        "--epochs",
        type=int,
        help="epochs per run (default 30; 8 with --quick, 1 with --smoke-test)",
    )
    parser.add_argument(
        "--seeds", type=int, help="seeds per method (default 3; 1 with --quick or --smoke-test)"
    )
    parser.add_argument(
        "--gd-steps",
        type=int,
        help="GD steps per prior update (default: the preset's; 2 with --smoke-test)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(PRIOR_METHODS),
        help=f"comma-separated subset of {', '.join(PRIOR_METHODS)} (default: all)",
    )
    parser.add_argument(
        "--policies",
        help="comma-separated GD learning-rate policies (default: geometric_knots and all five "
        f"of {', '.join(POLICY_POWERS)})",
    )
    parser.add_argument(
        "--curves",
        action="store_true",
        help="evaluate after every epoch and print the mean NF-Acc curve of each row",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config overrides for every run (e.g. prior.objective.lam=300)",
    )
    parser.add_argument(
        "--record", metavar="PATH", help="write {commit, command, date, records} here (published)"
    )
    add_device_arg(parser)
    args = parser.parse_args(argv)
    check_device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in PRIOR_METHODS for m in methods):
        parser.error(f"--methods {args.methods!r}: choose from {', '.join(PRIOR_METHODS)}")
    all_policies = ("geometric_knots", *POLICY_POWERS)
    policies = all_policies if args.policies is None else tuple(args.policies.split(","))
    if not policies or any(p not in all_policies for p in policies):
        parser.error(f"--policies {args.policies!r}: choose from {', '.join(all_policies)}")
    smoke = args.smoke_test
    epochs = args.epochs or (1 if smoke else 8 if args.quick else 30)
    seeds = args.seeds or (1 if smoke or args.quick else 3)
    extra = {**(SMOKE if smoke else {}), **dict(parse_override(s) for s in args.set)}
    base = experiment_config("digits", {"optim.epochs": epochs, **extra})
    gd_steps = args.gd_steps or (2 if smoke else base.prior.gd.steps_per_solve)
    gd_prior = base.prior.replace(method="gd")
    updates = sum(gd_prior.solves_after(e) for e in range(epochs))  # GD updates in a run
    records, curves = [], {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for method, policy, overrides in _variants(max(1, updates * gd_steps), gd_steps):
            if method not in methods or (policy is not None and policy not in policies):
                continue
            for seed in range(seeds):
                cfg = experiment_config(
                    "digits",
                    {
                        "seed": seed,
                        "optim.epochs": epochs,
                        "eval.plots": False,
                        "eval.every": 1 if args.curves else epochs,
                        "device": args.device,
                        **overrides,
                        **extra,
                    },
                )
                run_dir = Path(tmp) / f"{method}-{policy}-{seed}"
                history = Trainer(cfg, run_dir).fit()
                final = history[-1]  # the last epoch is always evaluated
                if args.curves:  # otherwise only the last epoch has test metrics
                    curves.setdefault((method, policy), []).append([h["nf_acc"] for h in history])
                rec = {
                    "method": method,
                    "policy": policy,
                    "seed": seed,
                    "nf_acc": final["nf_acc"],
                    "test_bpd": final["test_bpd"],
                    "epochs": epochs,
                    "lam": cfg.prior.objective_for().lam,
                }
                records.append(rec)
                print(
                    f"  {method:<9} {policy or '':<15} seed {seed}: NF-Acc {rec['nf_acc']:.4f}  "
                    f"test bpd {rec['test_bpd']:.4f}",
                    flush=True,
                )
    toy = ", smoke test: 20 digits per class, MEF hidden 8" if smoke else ""
    print(
        f"\nTable 1 on digits ({epochs} epochs, {seeds} seed(s){toy}, "
        f"{time.perf_counter() - t0:.0f} s)"
    )
    print(f"{'method':<10}{'policy':<16}{'NF-Acc (%)':>18}{'test bits/dim':>20}")
    rows: dict[tuple, list[dict]] = {}
    for rec in records:
        rows.setdefault((rec["method"], rec["policy"]), []).append(rec)
    for (method, policy), recs in rows.items():
        acc = [100 * r["nf_acc"] for r in recs]
        bpd = [r["test_bpd"] for r in recs]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        print(
            f"{method:<10}{policy or '-':<16}{statistics.mean(acc):>11.2f} +- {sd(acc):<4.2f}"
            f"{statistics.mean(bpd):>13.4f} +- {sd(bpd):.4f}"
        )
    if args.set:
        print("every run with: " + ", ".join(args.set))
    if args.curves:
        print(
            "\nMean test NF-Acc (%) after each epoch (the first prior update is at the end of "
            f"epoch {base.prior.solve_epoch})"
        )
        print(f"{'epoch':<6}" + "".join(f"{m + (' ' + p if p else ''):>22}" for m, p in curves))
        for e in range(epochs):
            row = [statistics.mean(c[e] for c in runs) for runs in curves.values()]
            print(f"{e:<6}" + "".join(f"{100 * v:>22.2f}" for v in row))
    if args.out:
        write_records(args.out, records)
    if args.record:
        write_published(args.record, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
