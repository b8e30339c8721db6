"""CIFAR-10 on CPU: data-init, GD and FPI priors at equal objective and equal budget, real images.

    python benchmarks/cifar10_cpu.py [--quick | --smoke-test] [--out PATH] [--data TARBALL]
        [--methods data-init,gd,fpi[,normflows-glow]] [--seeds N] [--epochs N] [--jobs N] [--threads N]
        [--record PATH]

Every run is the ``cifar10_cpu`` experiment (nfpi/presets.py) through the library loop
(``Trainer``, no Ray) on the CIFAR-10 JPEG ImageFolder tarball (all 50k training and 10k test
images at 16 x 16): the same flow, data, steps and objective (lambda 3,333, alpha 10, pi pairwise,
the released Table 1 cifar10 setting) for every method. What differs is the prior: ``data-init``
keeps the class moments of the untrained flow, ``gd`` takes 100 Adam steps on the objective at the
end of every epoch (policy sublinear_v1, lr 0.3 -> 1e-3), ``fpi`` solves the released fixed point at
the end of every epoch. GD and the FPI pay the same statistics pass per epoch.
``--methods ...,normflows-glow`` adds the peer: normflows' Glow at this flow's parameter count,
its class-conditional diagonal gaussians learned by gradient descent with the flow, on the same
data, batch, epochs, optimiser and dequantisation (``run_peer``; needs the ``bench`` extra).

Records: ``method``, ``seed``, ``nf_acc`` (last epoch, full test set), ``test_bpd``,
``nf_acc_after_solve`` (right after the first prior update, end of epoch 0), ``minutes`` (wall
time of the run), ``epochs``, ``lam``. The curves (NF-Acc and bits/dim per epoch) are printed and
logged to MLflow with each run's sample grids, t-SNE and KL heatmaps (``--tracking-uri``, default
the service's store ``results/mlflow.db``, experiment ``cifar10_cpu``; ``--no-mlflow`` logs nothing).

``--jobs N`` runs N methods/seeds at once in separate processes of ``--threads`` threads each
(default 1 x 1: on 2 cores, 2 jobs of 1 thread finish two runs in about the time of one).
``--quick``: 200 training / 100 test images per class, 2 epochs, one seed (about a minute).
``--smoke-test``: a generated 3-class JPEG ImageFolder, 1 epoch, seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from _common import (  # benchmarks/ on sys.path
    ROOT,
    benchmark_parser,
    mean_sd,
    mode_name,
    write_published,
    write_records,
)
from _peer import NAME as PEER

from nfpi.presets import experiment_config, parse_override
from nfpi.prior import PRIOR_METHODS

METHODS = PRIOR_METHODS  # the default runs: the three priors of Table 1
ALL_METHODS = (*METHODS, PEER)  # and the peer, on request (--methods ...,normflows-glow)
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
QUICK = {"data.items_per_class": 200, "data.test_items_per_class": 100, "optim.epochs": 2}
SMOKE = {
    "optim.epochs": 1,
    "optim.batch_size": 8,
    "optim.warmup_steps": 2,
    "flow.hidden": 8,
    "prior.gd.steps_per_solve": 2,
    "eval.tsne_points": 12,
    "eval.samples_per_class": 2,
    "eval.temperatures": (0.75,),
}


def smoke_imagefolder(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    """A tiny JPEG tree ``{train,test}/<class>/*.jpg`` of 16 x 16 coloured noise per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", per_class // 2)):
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, size=3)
            for i in range(n):
                img = np.clip(base + rng.normal(0, 40, size=(16, 16, 3)), 0, 255)
                Image.fromarray(img.astype("uint8")).save(folder / f"{i}.jpg", quality=90)
    return root


def run_one(
    method: str, seed: int, overrides: dict[str, Any], run_dir: str, threads: int
) -> dict[str, Any]:
    """One training run in this process; returns its record, curve and run directory."""
    import torch

    from nfpi.training import Trainer

    if method == PEER:
        return run_peer(seed, overrides, run_dir, threads)
    torch.set_num_threads(threads)
    cfg = experiment_config(
        "cifar10_cpu",
        {
            "prior.method": method,
            "seed": seed,
            "name": f"cifar10_cpu-{method}-s{seed}",
            **overrides,
        },
    )
    t0 = time.perf_counter()
    history = Trainer(cfg, run_dir, lock_run_dir=False).fit()
    minutes = (time.perf_counter() - t0) / 60
    after = next(h for h in history if h["epoch"] == cfg.prior.solve_epoch)
    record = {
        "method": method,
        "seed": seed,
        "nf_acc": history[-1]["nf_acc"],
        "test_bpd": history[-1]["test_bpd"],
        "nf_acc_after_solve": after.get("nf_acc", math.nan),  # NaN: not evaluated (eval.every)
        "minutes": minutes,
        "epochs": cfg.optim.epochs,
        "lam": cfg.prior.objective_for().lam,
    }
    return {"record": record, "history": history, "config": cfg.flat(), "run_dir": run_dir}


def run_peer(seed: int, overrides: dict[str, Any], run_dir: str, threads: int) -> dict[str, Any]:
    """The peer's run: normflows' Glow with class-conditional diagonal gaussians learned by
    gradient descent together with the flow (normflows' class-conditional recipe), its flow
    parameters matched to this experiment's flow, on the experiment's data, batch, epochs,
    optimiser (Adamax at ``optim.lr`` with ``optim.warmup_steps`` of warm-up), gradient clipping
    and dequantisation: the library loop's step without the prior service. NF-Acc is the class
    of the largest ``log p(x | y)`` on the test set, as the project's flows are scored; the same
    epochs are evaluated (``eval.every`` and the last)."""
    import torch
    from _peer import bits_per_dim, class_log_probs, peer_glow
    from torch import nn

    from nfpi.data import dequantization_offset, dequantize
    from nfpi.flows import build_flow
    from nfpi.training.randomness import PHASE_TRAIN, seed_phase
    from nfpi.training.run_data import RunData

    torch.set_num_threads(threads)
    cfg = experiment_config(
        "cifar10_cpu", {"seed": seed, "name": f"cifar10_cpu-{PEER}-s{seed}", **overrides}
    )
    t0 = time.perf_counter()
    cpu = torch.device("cpu")
    data = RunData(cfg, cpu)
    shape, levels = tuple(data.info.shape), data.info.levels
    ours = build_flow(cfg.flow.preset, in_shape=shape, seed=seed, **cfg.flow.overrides())
    n_ours = sum(p.numel() for p in ours.parameters())
    model, width, n_peer = peer_glow(n_ours, ours.spec, shape, data.num_classes, seed)
    offset = dequantization_offset(data.dim, levels)
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.optim.lr)
    warm = max(cfg.optim.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    init = torch.utils.data.DataLoader(data.train_set, cfg.optim.init_batch, shuffle=False)
    x0, y0 = next(iter(init))
    with torch.no_grad():  # normflows' ActNorm initialises itself on its first batch
        model.forward_kld(dequantize(x0, levels=levels), y0)

    def test() -> dict[str, float]:
        gen = torch.Generator().manual_seed(seed)
        model.eval()
        nll = correct = count = 0.0
        with torch.no_grad():
            for x, y in data.test_loader:
                log_p = class_log_probs(model, dequantize(x, gen, levels=levels))
                nll += float(
                    bits_per_dim(log_p.gather(1, y[:, None])[:, 0], data.dim, offset).sum()
                )
                correct += float((log_p.argmax(1) == y).sum())
                count += len(y)
        model.train()
        return {"test_bpd": nll / count, "nf_acc": correct / count}

    history = []
    for epoch in range(cfg.optim.epochs):
        gen = seed_phase(seed, epoch, PHASE_TRAIN)
        data.train_sampler.set_epoch(epoch)
        total = seen = 0.0
        for x, y in data.train_loader:
            if data.augment is not None:
                x = data.augment(x, gen)
            loss = bits_per_dim(model.log_prob(dequantize(x, levels=levels), y), data.dim, offset)
            loss = loss.mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{PEER}: non-finite loss at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        entry: dict[str, float] = {"epoch": epoch, "train_bpd": total / seen}
        if (epoch + 1) % cfg.eval.every == 0 or epoch == cfg.optim.epochs - 1:
            entry.update(test())
        history.append(entry)
        print(f"  {PEER} seed {seed} epoch {epoch}: {entry}", flush=True)
    record = {
        "method": PEER,
        "seed": seed,
        "nf_acc": history[-1]["nf_acc"],
        "test_bpd": history[-1]["test_bpd"],
        "nf_acc_after_solve": history[0].get("nf_acc", math.nan),  # after epoch 0, as the others
        "minutes": (time.perf_counter() - t0) / 60,
        "epochs": cfg.optim.epochs,
        "lam": math.nan,  # no KLD term: its gaussians are learned by the NLL alone
        "params": n_peer,
        "matched_params": n_ours,
        "hidden": width,
    }
    return {"record": record, "history": history, "config": cfg.flat(), "run_dir": run_dir}


def log_to_mlflow(tracking: Any, parent_id: str, result: dict[str, Any]) -> None:
    """One child run per training run: config, per-epoch metrics, final record, pictures."""
    from ray_jobs.tracking import RunLogger, start_run

    rec = result["record"]
    name = f"{rec['method']} seed={rec['seed']}"
    log = RunLogger(tracking, start_run(tracking, name, parent_run_id=parent_id))
    log.params(result["config"])
    for h in result["history"]:
        log.metrics({k: v for k, v in h.items() if k != "epoch"}, step=int(h["epoch"]))
    log.metrics({k: rec[k] for k in ("nf_acc_after_solve", "minutes")}, step=rec["epochs"] - 1)
    plots = Path(result["run_dir"]) / "plots"
    if plots.is_dir():
        log.artifacts(plots, "plots")
    log.finish()


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per method, mean +- std over seeds (``-``: not evaluated, eval.every)."""
    rows = [
        "| method | seeds | NF-Acc (%) | NF-Acc after 1st update (%) | test bits/dim | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for method in ALL_METHODS:
        recs = [r for r in records if r["method"] == method]
        if not recs:
            continue
        col = {key: [r[key] for r in recs] for key in recs[0]}
        rows.append(
            f"| {method} | {len(recs)} | {mean_sd(col['nf_acc'], 100)} | "
            f"{mean_sd(col['nf_acc_after_solve'], 100)} | {mean_sd(col['test_bpd'], 1, 3)} | "
            f"{mean_sd(col['minutes'], 1, 1)} |"
        )
    return "\n".join(rows)


def curves(results: list[dict[str, Any]]) -> str:
    """Markdown: test NF-Acc / bits/dim after each epoch, one column per run."""
    results = sorted(
        results, key=lambda r: (ALL_METHODS.index(r["record"]["method"]), r["record"]["seed"])
    )
    names = [f"{r['record']['method']} s{r['record']['seed']}" for r in results]
    rows = ["| epoch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for e in range(max(len(r["history"]) for r in results)):
        cells = []
        for r in results:
            h = r["history"][e] if e < len(r["history"]) else None
            evaluated = h is not None and "nf_acc" in h  # eval.every may skip epochs
            cells.append(f"{100 * h['nf_acc']:.1f} / {h['test_bpd']:.3f}" if evaluated else "")
        rows.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0], "200+100 images per class, 2 epochs (~1 min)"
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 JPEG tarball or tree"
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {', '.join(ALL_METHODS)} (default: the three priors; "
        f"{PEER} is the normflows peer at matched parameters, needs pip install -e '.[bench]')",
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method (default 1)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here (default 0)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the preset's 8)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--tracking-uri", help="MLflow store (default sqlite under results/)")
    parser.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    parser.add_argument("--keep", type=Path, help="keep the run directories here")
    parser.add_argument(
        "--record", metavar="PATH", help="write {commit, command, date, records} here (published)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run, e.g. prior.resolve_every=0 (a frozen prior) or "
        "ema.enabled=true (the ablations of benchmarks/README.md)",
    )
    args = parser.parse_args(argv)
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(ALL_METHODS)}")
    if PEER in methods and importlib.util.find_spec("normflows") is None:
        parser.error(f"--methods {PEER} needs normflows: pip install -e '.[bench]'")
    args.methods = methods
    if args.jobs < 1 or args.threads < 1 or args.seeds < 1 or args.first_seed < 0:
        parser.error("--jobs, --threads and --seeds must be >= 1, --first-seed >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = tempfile.TemporaryDirectory(prefix="cifar10_cpu-")
    if args.smoke_test:
        data = smoke_imagefolder(Path(work.name) / "data")
        overrides: dict[str, Any] = dict(SMOKE)
    else:
        data = args.data.expanduser().resolve()
        if not data.exists():
            print(
                f"error: no CIFAR-10 data at {data}: pass --data with the cifar10-jpeg.tar.gz "
                "tarball (or an extracted {train,test}/<class>/*.jpg tree)",
                file=sys.stderr,
            )
            return 2
        overrides = dict(QUICK) if args.quick else {}
    overrides["data.root"] = str(data)
    overrides.update(parse_override(text) for text in args.set)
    if args.epochs:
        overrides["optim.epochs"] = args.epochs
    base = experiment_config("cifar10_cpu", overrides)
    epochs = base.optim.epochs
    if "prior.gd.policy" not in overrides:  # the preset's policy, decaying over this run's steps
        overrides["prior.gd.policy.total_steps"] = max(1, base.prior.gd.steps_per_solve * epochs)
    runs_root = args.keep.resolve() if args.keep else Path(work.name) / "runs"

    tracking = parent_id = None
    if not args.no_mlflow:
        from ray_jobs.tracking import resolve_tracking, start_run

        uri = args.tracking_uri or (
            f"sqlite:///{Path(work.name) / 'mlflow.db'}" if args.smoke_test else None
        )
        tracking = resolve_tracking(ROOT / "results", uri, "cifar10_cpu")
        what = " ".join([mode_name(args), *args.set])  # the run's name says what differed
        parent_id = start_run(
            tracking,
            f"cifar10_cpu {what} {time.strftime('%Y%m%d-%H%M%S')}",
            tags={"nfpi.overrides": ", ".join(args.set) or "none"},
        )

    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(m, s) for s in seeds for m in args.methods]
    print(
        f"CIFAR-10 on CPU ({mode_name(args)}): {len(jobs)} runs, {epochs} epochs each, "
        f"{args.jobs} at once x {args.threads} thread(s); data {data}",
        flush=True,
    )
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    os.environ.update(env)  # inherited by the spawned runs
    t0 = time.perf_counter()
    # A kill (SIGTERM) unwinds like an error: the runs' processes stop, the MLflow parent is
    # marked failed instead of staying RUNNING.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        results = run_all(args, jobs, overrides, runs_root, tracking, parent_id)
    except BaseException:
        if tracking is not None:
            from ray_jobs.tracking import RunLogger

            RunLogger(tracking, parent_id).finish("FAILED")
        raise
    report(args, results, epochs, time.perf_counter() - t0, tracking, parent_id)
    work.cleanup()
    return 0


def run_all(
    args: argparse.Namespace,
    jobs: list[tuple[str, int]],
    overrides: dict[str, Any],
    runs_root: Path,
    tracking: Any,
    parent_id: str | None,
) -> list[dict[str, Any]]:
    """Every (method, seed) run, ``args.jobs`` at a time; each logged to MLflow as it ends."""
    results = []
    pool = ProcessPoolExecutor(
        max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")
    )
    try:
        futures = [
            pool.submit(run_one, m, s, overrides, str(runs_root / f"{m}-s{s}"), args.threads)
            for m, s in jobs
        ]
        for future in as_completed(futures):
            result = future.result()
            rec = result["record"]
            print(
                f"  {rec['method']:<9} seed {rec['seed']}: NF-Acc {rec['nf_acc']:.4f} (after the "
                f"first update {rec['nf_acc_after_solve']:.4f}), test bpd {rec['test_bpd']:.4f}, "
                f"{rec['minutes']:.1f} min",
                flush=True,
            )
            if tracking is not None:
                log_to_mlflow(tracking, parent_id, result)
            results.append(result)
    except BaseException:
        # Stop the runs now (shutting down waits for running ones): a failed run or a kill
        # leaves no orphaned training processes behind.
        for child in multiprocessing.active_children():
            child.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def report(
    args: argparse.Namespace,
    results: list[dict[str, Any]],
    epochs: int,
    seconds: float,
    tracking: Any,
    parent_id: str | None,
) -> None:
    """Print the table and the curves, log them to the MLflow parent, write ``--out``."""
    records = [r["record"] for r in results]
    summary = table(records)
    print(f"\nCIFAR-10 on CPU, 16 x 16, equal objective and budget ({seconds:.0f} s)")
    if args.set:
        print("every run with: " + ", ".join(args.set))
    print(summary)
    print("\nTest NF-Acc (%) / bits/dim after each epoch (epoch 0: right after the first update)")
    curve_table = curves(results)
    print(curve_table)
    if tracking is not None:
        from ray_jobs.tracking import RunLogger

        parent = RunLogger(tracking, parent_id)
        parent.text(summary + "\n\n" + curve_table + "\n", "results.md")
        for method in args.methods:
            accs = [r["nf_acc"] for r in records if r["method"] == method]
            parent.metrics({f"nf_acc.{method}": sum(accs) / len(accs)}, step=epochs - 1)
        parent.finish()
    if args.out:
        write_records(args.out, records)
    if args.record:
        write_published(args.record, records)


if __name__ == "__main__":
    sys.exit(main())
