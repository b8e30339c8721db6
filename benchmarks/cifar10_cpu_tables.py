"""Tables 2, 3 and 5 on CPU CIFAR-10 (16 x 16): NF-Acc and CNN-Acc against lambda, what the KLD
term moves, and NF augmentation for a small classifier.

    python benchmarks/cifar10_cpu_tables.py [--quick | --smoke-test] [--out PATH] [--record PATH]
        [--tables 2,3,5] [--seeds N] [--first-seed S] [--lambdas L,...] [--items-per-class N]
        [--epochs N] [--work DIR] [--data TARBALL] [--jobs N] [--set KEY=VALUE ...]

Every flow is the ``cifar10_cpu`` experiment (nfpi/presets.py: glow-small width 32 at 16 x 16, the
prior re-solved after every epoch, no EMA, no augmentation) through the library loop, at a
smaller budget than ``cifar10_cpu.py`` (``--items-per-class``, default 1,000 training images per
class, and ``--epochs``, default 4; NF-Acc on the full 10k test set after the last epoch, no
pictures); each run is :func:`cifar10_cpu.run_one`, so its run directory is
the one ``cifar10_cpu.py --keep`` writes. Run directories are kept under ``--work`` and a finished
one is reused: the same command with more seeds, lambdas or tables trains only what is new.

- Table 2: the FPI prior of the released CIFAR-10 setting (``cifar10/mean_var``: reference form,
  alpha 10, pi pairwise) at each of ``--lambdas``;
- Table 3: #1 none (data-init), #2 means only from identity variances (lambda 5,556), #3
  variances only (lambda 1,111), #4 both (lambda 3,333: Table 2's row at that lambda, run once),
  the released settings' update and lambda with this preset's schedule;
- CNN-Acc for every flow of Tables 2 and 3: a small timm classifier (``CNN``: timm's resnet10t) trained on ``--cnn-per-class`` images per class drawn from the flow and its prior
  (T = 1), tested on the real test set; the same classifier on as many real images is the
  reference (seed 0's #4 run);
- Table 5: the same classifier trained on ``--t5-per-class`` real images per class with standard
  augmentation (crop + flip) alone and with the NF augmentation (latent mixup in the class's
  principal subspace, p = 0.5, 16 components) of seed 0's #4 FPI flow, ``--t5-seeds`` classifier
  seeds each; top-1 and top-5 on the real test set.

Records (one per flow run and one per Table 5 classifier): ``table`` (``2``, ``3``, ``2,3`` or
``5``), ``row``, ``lam``, ``seed``, ``nf_acc``, ``test_bpd``, ``cnn_acc``, ``cnn_top5``,
``real_acc`` (the reference, where run), ``aug``, ``top1``, ``top5`` (Table 5), ``minutes``,
``epochs``, ``items_per_class``. ``--out`` / ``--record`` are rewritten after every run.

``--quick``: 200 training images per class, 2 epochs, lambdas 0 and 3,333, classifiers of 2
epochs (a few minutes). ``--smoke-test``: a generated 3-class image folder, 1 epoch, seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from _common import benchmark_parser, mean_sd, mode_name, write_published, write_records
from cifar10_cpu import DEFAULT_DATA, SMOKE, run_one, smoke_imagefolder

from nfpi.presets import experiment_config, parse_override, released_overrides

# Table 3's rows: what each released setting changes in the cifar10_cpu preset (the update, the
# variances' start and lambda; the schedule stays the preset's).
TABLE3 = {
    "#1 none (data-init)": {"prior.method": "data-init"},
    "#2 means only (identity start)": "cifar10/mean",
    "#3 variances only": "cifar10/var",
    "#4 means and variances": "cifar10/mean_var",
}
PRESET_LAM = experiment_config("cifar10_cpu", {"data.root": "/x"}).prior.objective.lam
# 0, two of the paper's CIFAR-10 lambdas (1e5 and 3e5 over 90, nfpi.presets.TABLE2_LAMBDAS; the
# second is the preset's) and two past them, 10x and 33x.
LAMBDAS = (0.0, 1e5 / 90, PRESET_LAM, 3e6 / 90, 1e7 / 90)
# A classifier cheap enough for a CPU: timm's resnet10t with its ImageNet stem (one step of 100
# images at 16 x 16 on one thread: 0.79 s at a load average of 10, against 2.96 s with the CIFAR
# stem and 7.7 s for the paper's ResNet-18 with it, same run).
CNN = {
    "cnn.model": "resnet10t",
    "cnn.cifar_stem": False,
    "cnn.epochs": 10,
    "cnn.batch_size": 100,
    "cnn.eval_batch_size": 500,
}
STANDARD = {"cnn.crop": True, "cnn.flip": True}
NF = {"n_components": 16, "probability": 0.5, "weights": "uniform"}  # the table5 space's


def table3_overrides(row: str) -> dict[str, Any]:
    spec = TABLE3[row]
    if isinstance(spec, dict):
        return dict(spec)
    released = released_overrides(spec, "as_released")
    return {
        "prior.fpi.update": released["prior.fpi"]["update"],
        "prior.fpi.variance_init": released["prior.fpi"]["variance_init"],
        "prior.objective.lam": released["prior.objective"]["lam"],
    }


def flow_specs(tables: tuple[str, ...], lambdas: list[float]) -> list[dict[str, Any]]:
    """The distinct flows of one seed: ``{table, row, lam, method, overrides}``; a Table 2 lambda
    whose config equals a Table 3 row's is that row (``table`` ``2,3``)."""
    specs: list[dict[str, Any]] = []
    if "3" in tables:
        for row in TABLE3:
            o = table3_overrides(row)
            method = o.pop("prior.method", "fpi")
            lam = o.get("prior.objective.lam", PRESET_LAM) if method == "fpi" else 0.0
            specs.append({"table": "3", "row": row, "lam": lam, "method": method, "overrides": o})
    if "2" in tables:
        for lam in lambdas:
            o = {"prior.fpi.update": "both", "prior.fpi.variance_init": "data"}
            o["prior.objective.lam"] = lam
            same = next((s for s in specs if s["overrides"] == o), None)
            if same is not None:
                same["table"] = "2,3"
                continue
            specs.append(
                {
                    "table": "2",
                    "row": f"lambda {lam:.6g}",
                    "lam": lam,
                    "method": "fpi",
                    "overrides": o,
                }
            )
    return specs


def tag(spec: dict[str, Any]) -> str:
    """The run directory of a flow setting (seeds below it, as cifar10_cpu.py --keep)."""
    if spec["method"] != "fpi":
        return spec["method"]
    o = spec["overrides"]
    return f"{o['prior.fpi.update']}-{o['prior.fpi.variance_init']}-lam{spec['lam']:.6g}"


def flow_task(
    spec: dict[str, Any],
    seed: int,
    overrides: dict[str, Any],
    work: str,
    cnn: dict[str, Any],
    reference: bool,
) -> dict[str, Any]:
    """Train (or reuse) one flow, then its CNN-Acc; returns the record."""
    from nfpi.downstream import DownstreamConfig, run_downstream

    t0 = time.perf_counter()
    run_dir = Path(work) / tag(spec) / f"{spec['method']}-s{seed}"
    result = run_one(spec["method"], seed, {**overrides, **spec["overrides"]}, str(run_dir), 1)
    rec = result["record"]
    down = {**cnn, "downstream.reference": reference}
    if reference:  # as many real images as generated ones
        down["downstream.items_per_class"] = cnn["downstream.per_class"]
    res = run_downstream(run_dir, DownstreamConfig.from_overrides(down), run_dir / "cnn")
    return {
        "table": spec["table"],
        "row": spec["row"],
        "lam": spec["lam"],
        "seed": seed,
        "nf_acc": rec["nf_acc"],
        "test_bpd": rec["test_bpd"],
        "cnn_acc": res.metrics["cnn_acc"],
        "cnn_top5": res.metrics["cnn_top5"],
        "real_acc": res.metrics.get("real_acc"),
        "minutes": (time.perf_counter() - t0) / 60,
        "epochs": rec["epochs"],
    }


def table5_task(flow_dir: str, aug: str, seed: int, cnn: dict[str, Any], per_class: int) -> dict:
    """One Table 5 classifier on ``per_class`` real images per class."""
    from nfpi.downstream import DownstreamConfig, run_downstream

    t0 = time.perf_counter()
    nf = cnn.pop("nf_components")
    down = {
        **{k: v for k, v in cnn.items() if k != "downstream.per_class"},
        **STANDARD,
        **({"cnn.nf_augment": {**NF, "n_components": nf}} if aug == "standard + NF" else {}),
        "downstream.kind": "augment",
        "downstream.items_per_class": per_class,
        "cnn.seed": seed,
    }
    out = Path(flow_dir) / f"table5-{per_class}-{aug.replace(' + ', '+')}-s{seed}"
    res = run_downstream(flow_dir, DownstreamConfig.from_overrides(down), out)
    return {
        "table": "5",
        "row": aug,
        "aug": aug,
        "seed": seed,
        "top1": res.metrics["aug_acc"],
        "top5": res.metrics["aug_top5"],
        "minutes": (time.perf_counter() - t0) / 60,
        "items_per_class": per_class,
    }


def pct(values: list[float]) -> str:
    return mean_sd(values, 100.0)


def flow_table(records: list[dict[str, Any]], which: str) -> str:
    head = "setting" if which == "3" else "lambda"
    lines = [
        (
            f"| {head} | seeds | NF-Acc (%) | CNN-Acc (%) | NF-Acc per seed | CNN-Acc per seed | "
            "test bits/dim |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        if which in str(r["table"]).split(","):
            groups.setdefault((r["row"], r["lam"]), []).append(r)
    # Table 2 by lambda, Table 3 by row (#1 ... #4)
    groups = dict(sorted(groups.items(), key=lambda kv: kv[0][1] if which == "2" else kv[0][0]))
    for (row, lam), recs in groups.items():
        first = f"{row}, lambda {lam:.6g}" if which == "3" else f"{lam:.6g}"

        def per(key: str, recs: list[dict[str, Any]] = recs) -> str:
            return " / ".join(f"{100 * r[key]:.2f}" for r in recs)

        lines.append(
            f"| {first} | {len(recs)} | {pct([r['nf_acc'] for r in recs])} | "
            f"{pct([r['cnn_acc'] for r in recs])} | {per('nf_acc')} | {per('cnn_acc')} | "
            f"{mean_sd([r['test_bpd'] for r in recs], 1.0, 3)} |"
        )
    return "\n".join(lines)


def table5(records: list[dict[str, Any]]) -> str:
    lines = [
        "| augmentation | seeds | top-1 (%) | top-5 (%) | top-1 per seed |",
        "|---|---|---|---|---|",
    ]
    for aug in ("standard", "standard + NF"):
        recs = [r for r in records if r["table"] == "5" and r["aug"] == aug]
        if recs:
            top1 = [r["top1"] for r in recs]
            per_seed = " / ".join(f"{100 * a:.2f}" for a in top1)
            lines.append(
                f"| {aug} | {len(recs)} | {pct(top1)} | "
                f"{pct([r['top5'] for r in recs])} | {per_seed} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0], "200 images per class, 2 epochs, 2 lambdas (a few minutes)"
    )
    parser.add_argument("--tables", default="2,3,5", help="comma-separated subset of 2, 3, 5")
    parser.add_argument(
        "--seeds", type=int, help="flow seeds (default 2; 1 with --quick/--smoke-test)"
    )
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here")
    parser.add_argument("--lambdas", help="Table 2's lambdas, comma-separated")
    parser.add_argument("--items-per-class", type=int, help="flow training images per class")
    parser.add_argument("--epochs", type=int, help="flow epochs (default 4)")
    parser.add_argument("--cnn-per-class", type=int, help="generated images per class (200)")
    parser.add_argument("--cnn-epochs", type=int, help="classifier epochs (10)")
    parser.add_argument("--t5-per-class", type=int, help="Table 5's real images per class (200)")
    parser.add_argument("--t5-seeds", type=int, help="Table 5's classifier seeds (3)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CIFAR-10 tarball")
    parser.add_argument("--work", type=Path, help="run directories (kept; default a temp dir)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (processes, 1 thread)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every flow"
    )
    parser.add_argument(
        "--record", metavar="PATH", help="write {commit, command, date, records} here (published)"
    )
    args = parser.parse_args(argv)
    args.tables = tuple(t for t in args.tables.split(",") if t)
    if not args.tables or any(t not in ("2", "3", "5") for t in args.tables):
        parser.error(f"--tables {','.join(args.tables)!r}: choose from 2, 3, 5")
    if args.lambdas:
        try:
            args.lambdas = [float(x) for x in args.lambdas.split(",") if x]
        except ValueError:
            parser.error(f"--lambdas {args.lambdas!r}: comma-separated numbers, e.g. 0,1000")
        if not args.lambdas or min(args.lambdas) < 0:
            parser.error("--lambdas: at least one lambda, each >= 0")
    else:
        args.lambdas = (
            [PRESET_LAM] if args.smoke_test else [0.0, PRESET_LAM] if args.quick else list(LAMBDAS)
        )
    small = args.quick or args.smoke_test
    defaults = {
        "seeds": 1 if small else 2,
        "cnn_per_class": 4 if args.smoke_test else 20 if args.quick else 200,
        "cnn_epochs": 1 if args.smoke_test else 2 if args.quick else 10,
        "t5_per_class": 3 if args.smoke_test else 20 if args.quick else 200,
        "t5_seeds": 1 if small else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("seeds", "cnn_per_class", "cnn_epochs", "t5_per_class", "t5_seeds", "jobs"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.first_seed < 0:
        parser.error("--first-seed must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="cifar10_cpu_tables-")
    work = (args.work or Path(tmp.name) / "runs").expanduser().resolve()
    if args.smoke_test:
        data = smoke_imagefolder(Path(tmp.name) / "data")
        overrides: dict[str, Any] = {**SMOKE, "data.test_items_per_class": None}
        cnn = {**CNN, "cnn.batch_size": 4, "cnn.eval_batch_size": 8, "nf_components": 2}
    else:
        data = args.data.expanduser().resolve()
        if not data.exists():
            print(
                f"error: no CIFAR-10 data at {data}: pass --data with the cifar10-jpeg.tar.gz "
                "tarball",
                file=sys.stderr,
            )
            return 2
        overrides = {
            "data.items_per_class": args.items_per_class or (200 if args.quick else 1000),
            "optim.epochs": 2 if args.quick else 4,
        }
        cnn = {**CNN, "nf_components": NF["n_components"]}
    cnn.update({"cnn.epochs": args.cnn_epochs, "downstream.per_class": args.cnn_per_class})
    overrides["data.root"] = str(data)
    if args.epochs:
        overrides["optim.epochs"] = args.epochs
    overrides.update(parse_override(text) for text in args.set)
    # NF-Acc and bits/dim after the last epoch only; no pictures (the tables need neither).
    overrides.setdefault("eval.every", overrides.get("optim.epochs", 8))
    overrides.setdefault("eval.plots", False)
    base = experiment_config("cifar10_cpu", overrides)
    overrides["prior.gd.policy.total_steps"] = max(
        1, base.prior.gd.steps_per_solve * base.optim.epochs
    )  # as cifar10_cpu.py sets it: its run directories are reused as they are
    specs = flow_specs(args.tables, args.lambdas) if {"2", "3"} & set(args.tables) else []
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    items = base.data.items_per_class
    print(
        f"CIFAR-10 CPU tables {','.join(args.tables)} ({mode_name(args)}): {len(specs)} flows x "
        f"{len(seeds)} seed(s), {base.optim.epochs} epochs, {items or 'all'} images per class; "
        f"runs in {work}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    records: list[dict[str, Any]] = []

    def done(rec: dict[str, Any]) -> None:
        rec.setdefault("items_per_class", items)
        records.append(rec)
        what = (
            f"NF-Acc {rec['nf_acc']:.4f} CNN-Acc {rec['cnn_acc']:.4f} bpd {rec['test_bpd']:.3f}"
            if rec["table"] != "5"
            else f"top-1 {rec['top1']:.4f} top-5 {rec['top5']:.4f}"
        )
        print(
            f"  {rec['row']:<32} seed {rec['seed']}: {what} ({rec['minutes']:.1f} min)", flush=True
        )
        if args.out:
            write_records(args.out, records)
        if args.record:
            write_published(args.record, records)

    # Order: every flow of the first seed, Table 2's flows of the others, Table 5's classifiers
    # (on the first seed's #4 flow, once it is trained), then Table 3's other rows of later seeds.
    first = [(s, seed) for seed in seeds for s in specs if seed == seeds[0] or "2" in s["table"]]
    rest = [(s, seed) for seed in seeds for s in specs if (s, seed) not in first]
    t5_flow = table3_overrides("#4 means and variances")
    t5_spec = {"method": "fpi", "lam": t5_flow["prior.objective.lam"], "overrides": t5_flow}
    t5_dir = work / tag(t5_spec) / f"fpi-s{seeds[0]}"
    t5 = (
        [(t5_dir, aug, s) for s in range(args.t5_seeds) for aug in ("standard", "standard + NF")]
        if "5" in args.tables
        else []
    )
    flow_cnn = {k: v for k, v in cnn.items() if k != "nf_components"}

    def flow_args(spec: dict[str, Any], seed: int) -> tuple:
        reference = spec["row"].startswith("#4") and seed == seeds[0]
        return (spec, seed, overrides, str(work), flow_cnn, reference)

    def t5_flow_ready() -> None:  # a Table 5 run without Table 3 trains the flow it uses
        if not (t5_dir / "checkpoints").is_dir():
            run_one("fpi", seeds[0], {**overrides, **t5_flow}, str(t5_dir), 1)

    t0 = time.perf_counter()
    if args.jobs == 1:  # in this process, in order
        for spec, seed in first:
            done(flow_task(*flow_args(spec, seed)))
        if t5:
            t5_flow_ready()
        for flow_dir, aug, s in t5:
            done(table5_task(str(flow_dir), aug, s, dict(cnn), args.t5_per_class))
        for spec, seed in rest:
            done(flow_task(*flow_args(spec, seed)))
    else:
        pool = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
        try:
            futures = [pool.submit(flow_task, *flow_args(s, seed)) for s, seed in first]
            if t5:
                t5_key = next(
                    (
                        i
                        for i, (s, seed) in enumerate(first)
                        if s["overrides"] == t5_flow and seed == seeds[0]
                    ),
                    None,
                )
                if t5_key is None:
                    t5_flow_ready()
                else:
                    done(futures.pop(t5_key).result())
            futures += [
                pool.submit(table5_task, str(d), aug, s, dict(cnn), args.t5_per_class)
                for d, aug, s in t5
            ]
            futures += [pool.submit(flow_task, *flow_args(s, seed)) for s, seed in rest]
            for future in as_completed(futures):
                done(future.result())
        except BaseException:
            # Stop the runs now: a failed run or a kill leaves no training process behind.
            for child in multiprocessing.active_children():
                child.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    print(
        f"\nCIFAR-10 on CPU, 16 x 16, {items or 'all'} training images per class, "
        f"{base.optim.epochs} epochs ({time.perf_counter() - t0:.0f} s)"
    )
    if args.set:
        print("every flow with: " + ", ".join(args.set))
    print(
        f"CNN-Acc: {cnn['cnn.model']} on {args.cnn_per_class} generated images per class, "
        f"{args.cnn_epochs} epochs"
    )
    for which in ("2", "3"):
        if which in args.tables:
            print(f"\nTable {which}:\n{flow_table(records, which)}")
    refs = [r["real_acc"] for r in records if r.get("real_acc") is not None]
    if refs:
        print(
            f"(the same classifier on {args.cnn_per_class} real images per class: "
            f"{100 * refs[0]:.2f} %)"
        )
    if "5" in args.tables:
        print(
            f"\nTable 5 ({cnn['cnn.model']}, {args.t5_per_class} real images per class, "
            f"{args.cnn_epochs} epochs):\n{table5(records)}"
        )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
