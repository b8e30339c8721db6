"""Tables 2 and 3 at toy scale: NF-Acc against lambda, and what the KLD term moves, on digits.

    python benchmarks/digits_tables.py [--quick | --smoke-test] [--out PATH] [--record PATH]
        [--tables 3,2] [--seeds N] [--first-seed S] [--lambdas L,...] [--epochs N] [--set K=V ...]

Single-process runs of the library loop (no Ray) of the ``digits`` experiment (tiny MEF flow,
30 epochs) with the prior section and schedule of the release's CIFAR-10 configs
(:func:`nfpi.presets.released_overrides`, variant ``as_released``: reference form, alpha 10, pi
pairwise, each setting its own lambda, one solve after epoch 0 from the gaussians the run holds,
then frozen; method notes section 10), the rows of
``search_spaces/table3.py`` and ``search_spaces/table2.py`` on the digits flow:

- Table 3: #1 none (``data-init``: the untrained flow's class moments), #2 means only from
  identity variances (``cifar10/mean``, lambda 5,556), #3 variances only (``cifar10/var``, lambda
  1,111), #4 both (``cifar10/mean_var``, lambda 3,333);
- Table 2: ``cifar10/mean_var`` (Table 3's #4) at each of ``--lambdas`` (a run whose config equals
  a Table 3 row's is run once and reported in both).

Runs go seed by seed (every row of seed 0, then of seed 1...), and ``--out`` / ``--record`` are
rewritten after every run, so a run cut short keeps what finished. Records: ``table`` (``2``,
``3`` or ``2,3``), ``row``, ``setting``, ``lam``, ``seed``, ``nf_acc``, ``test_bpd``,
``fpi_converged`` (the last solve's, null for data-init), ``minutes``, ``epochs``.

``--quick``: 8 epochs, one seed, lambdas 0, 1,111 and 11,111. ``--smoke-test``: 1 epoch of a toy
run (20 training and 10 test digits per class, MEF hidden width 8), Table 3 and the one
lambda of Table 2 that is its #4 (run once), in seconds.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import benchmark_parser, mode_name, write_published, write_records
from table1_digits import SMOKE

from nfpi.presets import experiment_config, parse_override, released_overrides
from nfpi.training import Trainer

TABLE3 = (
    ("#1 none (data-init)", "data-init", {"prior.method": "data-init"}),
    (
        "#2 means only (identity start)",
        "cifar10/mean",
        released_overrides("cifar10/mean", "as_released"),
    ),
    ("#3 variances only", "cifar10/var", released_overrides("cifar10/var", "as_released")),
    (
        "#4 means and variances",
        "cifar10/mean_var",
        released_overrides("cifar10/mean_var", "as_released"),
    ),
)
# 0, three of CIFAR-10's Table 2 lambdas (nfpi.presets.TABLE2_LAMBDAS: 1e4, 1e5, 3e5 over 90) and
# two past them.
LAMBDAS = (0.0, 1e4 / 90, 1e5 / 90, 3e5 / 90, 1e6 / 90, 5e6 / 90)


def rows(tables: tuple[str, ...], lambdas: list[float]) -> list[dict[str, Any]]:
    """The distinct runs of one seed: ``{table, row, setting, lam, overrides}``."""
    out: list[dict[str, Any]] = []
    if "3" in tables:
        for row, setting, overrides in TABLE3:
            lam = overrides.get("prior.objective", {}).get("lam", 0.0)
            out.append(
                {"table": "3", "row": row, "setting": setting, "lam": lam, "overrides": overrides}
            )
    if "2" in tables:
        for lam in lambdas:
            overrides = released_overrides("cifar10/mean_var", "as_released", lam=lam)
            same = next((r for r in out if r["overrides"] == overrides), None)
            if same is not None:
                same["table"] = "2,3"
                continue
            row = f"lambda {lam:.6g}"
            out.append(
                {
                    "table": "2",
                    "row": row,
                    "setting": "cifar10/mean_var",
                    "lam": lam,
                    "overrides": overrides,
                }
            )
    return out


def run(spec: dict[str, Any], seed: int, epochs: int, extra: dict[str, Any], tmp: str) -> dict:
    cfg = experiment_config(
        "digits",
        {
            "seed": seed,
            "optim.epochs": epochs,
            "eval.plots": False,
            "eval.every": epochs,
            **spec["overrides"],
            **extra,
        },
    )
    t0 = time.perf_counter()
    history = Trainer(
        cfg, Path(tmp) / f"{spec['setting'].replace('/', '_')}-{spec['lam']:.6g}-{seed}"
    ).fit()
    converged = [h["fpi_converged"] for h in history if "fpi_converged" in h]
    return {
        "table": spec["table"],
        "row": spec["row"],
        "setting": spec["setting"],
        "lam": spec["lam"],
        "seed": seed,
        "nf_acc": history[-1]["nf_acc"],
        "test_bpd": history[-1]["test_bpd"],
        "fpi_converged": bool(converged[-1]) if converged else None,
        "minutes": (time.perf_counter() - t0) / 60,
        "epochs": epochs,
    }


def table(records: list[dict[str, Any]], which: str) -> str:
    """Markdown: one row per setting of Table ``which`` (``"3"``: the four rows; ``"2"``: the
    lambdas, ascending), mean +- std over seeds, and each seed's NF-Acc."""
    head = "setting" if which == "3" else "lambda"
    lines = [
        f"Table {which} on digits:",
        f"| {head} | seeds | NF-Acc (%) | per seed | test bits/dim |",
        "|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if which in r["table"].split(","):
            groups.setdefault((r["row"], r["lam"]), []).append(r)
    if which == "2":
        groups = dict(sorted(groups.items(), key=lambda kv: kv[0][1]))
    for (row, lam), recs in groups.items():
        acc = [100 * r["nf_acc"] for r in recs]
        bpd = [r["test_bpd"] for r in recs]
        sd = lambda v: f" +- {statistics.stdev(v):.2f}" if len(v) > 1 else ""
        if which == "3":
            first = f"{row}, lambda {lam:.6g}"
        else:
            first = f"{lam:.6g}" + (" (= #4)" if "3" in recs[0]["table"] else "")
        lines.append(
            f"| {first} | {len(recs)} | {statistics.mean(acc):.2f}{sd(acc)} | "
            f"{' / '.join(f'{a:.2f}' for a in acc)} | {statistics.mean(bpd):.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__.split("\n\n")[0], "8 epochs, 1 seed, 3 lambdas (~10 min)")
    parser.add_argument("--tables", default="3,2", help="comma-separated subset of 3, 2")
    parser.add_argument("--seeds", type=int, help="seeds (default 2; 1 with --quick/--smoke-test)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here")
    parser.add_argument("--lambdas", help="Table 2's lambdas, comma-separated")
    parser.add_argument("--epochs", type=int, help="epochs per run (default 30)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run"
    )
    parser.add_argument(
        "--record", metavar="PATH", help="write {commit, command, date, records} here (published)"
    )
    args = parser.parse_args(argv)
    tables = tuple(t for t in args.tables.split(",") if t)
    if not tables or any(t not in ("2", "3") for t in tables):
        parser.error(f"--tables {args.tables!r}: choose from 2, 3")
    try:
        lambdas = (
            [float(x) for x in args.lambdas.split(",") if x]
            if args.lambdas
            else [3e5 / 90]
            if args.smoke_test
            else [0.0, 1e5 / 90, 1e6 / 90]
            if args.quick
            else list(LAMBDAS)
        )
    except ValueError:
        parser.error(f"--lambdas {args.lambdas!r}: comma-separated numbers, e.g. 0,100,1000")
    if not lambdas or min(lambdas) < 0:
        parser.error("--lambdas: at least one lambda, each >= 0")
    if (args.seeds is not None and args.seeds < 1) or args.first_seed < 0:
        parser.error("--seeds must be >= 1 and --first-seed >= 0")
    seeds = args.seeds or (1 if args.smoke_test or args.quick else 2)
    epochs = args.epochs or (1 if args.smoke_test else 8 if args.quick else 30)
    extra = {**(SMOKE if args.smoke_test else {}), **dict(parse_override(s) for s in args.set)}
    specs = rows(tables, lambdas)
    print(
        f"digits tables {','.join(tables)} ({mode_name(args)}): {len(specs)} settings x {seeds} "
        f"seed(s), {epochs} epochs each",
        flush=True,
    )
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="digits_tables-") as tmp:
        for seed in range(args.first_seed, args.first_seed + seeds):
            for spec in specs:
                rec = run(spec, seed, epochs, extra, tmp)
                records.append(rec)
                print(
                    f"  {rec['row']:<32} seed {seed}: NF-Acc {rec['nf_acc']:.4f}  test bpd "
                    f"{rec['test_bpd']:.4f}  ({rec['minutes']:.1f} min)",
                    flush=True,
                )
                if args.out:  # rewritten after every run: a cut-short sweep keeps its rows
                    write_records(args.out, records)
                if args.record:
                    write_published(args.record, records)
    toy = ", smoke test: 20 digits per class, MEF hidden 8" if args.smoke_test else ""
    print(f"\nDigits, {epochs} epochs{toy} ({time.perf_counter() - t0:.0f} s)")
    if args.set:
        print("every run with: " + ", ".join(args.set))
    for which in ("3", "2"):
        if which in tables:
            print(f"\n{table(records, which)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
