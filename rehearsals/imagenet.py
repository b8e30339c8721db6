"""ImageNet's shape at toy size through the Ray service: K = 1000 classes, 32 x 32 x 3 (d = 3072).

    python rehearsals/imagenet.py --results-dir /tmp/imagenet-toy --out toy.json
    python rehearsals/imagenet.py --smoke-test --out toy.json   # what the suite runs

Writes a generated ImageFolder (``write_imagefolder``: ``train/class_0000 .. class_0999``, a few
32 x 32 JPEGs per class, under the results dir, never in git), then runs one Tune trial whose
trainable does what :func:`ray_jobs.sweep.run_trial` does for a flow space (a Ray Train run
that reports every epoch to Tune) with 2 Train workers (gloo): per-class statistics for 1000
classes all-reduced over the ranks every epoch, the FPI solved in the prior actor at K = 1000,
d = 3072, NF-Acc over 1000 classes, sample grids (100 of the 1000 classes, evenly spaced) and
the t-SNE with 1000 prior means; the images decoded once into the uint8 cache
(``data.decode_cache``) that both ranks memory-map.

The prior refresh is measured inside that run: ``prior_refresh_s`` (rank 0's wall time from
sending the all-reduced statistics to the actor until the solved prior is back: transfer,
solve, state fetch) and ``prior_stats_s`` (the statistics pass incl. the all-reduce) per
epoch, and the actor's peak resident memory (``VmHWM`` of its process) against an idle
:class:`nfpi.prior.PriorService` actor of the same K, d started alongside (torch and Ray's
worker runtime included in both; the difference is what solving costs).

Uses the connected Ray if there is one (the suite's session), else starts a local one.
Exit status 1 if a check fails (each is named).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfpi.config import ExperimentConfig
from nfpi.data import write_imagefolder
from nfpi.errors import ConfigError
from nfpi.presets import experiment_config
from rehearsals.multinode import report_checks

__all__ = ["MIN_PER_CLASS", "RefreshProbe", "data_overrides", "main", "rehearse"]

log = logging.getLogger("nfpi.rehearsal")

NUM_CLASSES = 1000
SHAPE = (3, 32, 32)
#: Fewer training images per class collapse the data-init class variances (2 near-identical
#: images per class put epoch 0 at 1e8-1e9 bits/dim, which the divergence check refuses).
MIN_PER_CLASS = 6


def _actor_numbers(_: Any = None) -> tuple[float, float, float]:
    """(peak RSS MiB, RSS MiB, CPU seconds so far) of the calling process: run in the actor."""
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return _status_mib("VmHWM"), _status_mib("VmRSS"), use.ru_utime + use.ru_stime


def _status_mib(field: str) -> float:
    """A /proc/self/status memory field (``VmHWM``, ``VmRSS``) of the calling process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


@dataclass(frozen=True)
class RefreshProbe:
    """A worker callback: rank 0 appends one JSON line per epoch to ``path`` with the epoch's
    prior refresh timings and solver numbers, the actor's and its own peak memory, and the
    number of classes in the all-reduced statistics' prior."""

    path: Path

    def __call__(self, trainer: Any, result: Any) -> None:
        if trainer.rank != 0:
            return
        import ray

        actor = trainer.schedule.client.actor
        mem = ray.get(actor.__ray_call__.remote(_actor_numbers), timeout=120)
        m = result.metrics
        record = {
            "epoch": result.epoch,
            "world": trainer.world,
            "prior_classes": int(trainer.prior.means.shape[0]),
            "prior_dim": int(trainer.prior.means.shape[1]),
            "prior_refresh_s": m.get("prior_refresh_s"),
            "prior_stats_s": m.get("prior_stats_s"),
            "fpi_iterations": m.get("fpi_iterations"),
            "fpi_converged": m.get("fpi_converged"),
            "epoch_seconds": m.get("epoch_seconds"),
            "nf_acc": m.get("nf_acc"),
            "actor_peak_mib": mem[0],
            "actor_rss_mib": mem[1],
            # CPU seconds of the actor's process since it started (the solves, mostly): robust
            # to other jobs on the machine, unlike prior_refresh_s.
            "actor_cpu_s": mem[2],
            "rank0_peak_mib": _status_mib("VmHWM"),
            "loadavg_1min": os.getloadavg()[0],  # timings on a shared machine: read with it
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def data_overrides(root: Path, cache_dir: Path) -> dict[str, Any]:
    """The dotted overrides that point an experiment at the toy ImageFolder."""
    return {
        "data.name": "imagefolder",
        "data.root": str(root),
        "data.image_size": SHAPE[1],
        "data.items_per_class": None,
        "data.test_items_per_class": None,
        "data.decode_cache": True,
        "data.cache_dir": str(cache_dir),
    }


def _config(root: Path, cache_dir: Path, *, epochs: int, max_iter: int) -> ExperimentConfig:
    """The smoke experiment on the toy ImageFolder, FPI re-solved every epoch in the actor
    (``max_iter`` iterations at most, not required to converge: the iteration count is part of
    the record), pictures on (sampling over 1000 classes)."""
    return experiment_config(
        "smoke",
        {
            **data_overrides(root, cache_dir),
            "name": "imagenet-toy",
            "optim.epochs": epochs,
            "optim.batch_size": 100,
            "prior.method": "fpi",
            "prior.solve_epoch": 0,
            "prior.resolve_every": 1,
            "prior.solve_until": None,
            "prior.fpi.max_iter": max_iter,
            "prior.fpi.require_convergence": False,
            "eval.plots": True,
            "eval.tsne_points": 200,
            "eval.samples_per_class": 1,
        },
    )


def _idle_actor_memory(dim: int) -> tuple[float, float]:
    """Peak and current RSS (MiB) of a PriorService actor of K = 1000 classes that never
    solved: the baseline of the actor's memory."""
    import ray

    from nfpi.prior import PriorService

    actor = ray.remote(num_cpus=0)(PriorService).remote("fpi", NUM_CLASSES, dim)
    try:
        peak, rss, _ = ray.get(actor.__ray_call__.remote(_actor_numbers), timeout=300)
        return peak, rss
    finally:
        ray.kill(actor)


def imagenet_trial(tune_config: dict[str, Any], config: dict[str, Any], spec: Any) -> dict:
    """The Tune trial: what :func:`ray_jobs.sweep.run_trial` does for a flow space (a Ray Train
    run reporting every epoch to Tune), with the refresh probe in its workers."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_jobs.train import final_metrics, run_experiment

    experiment = ExperimentConfig.from_dict(config).with_overrides(tune_config)
    result = run_experiment(
        experiment,
        spec["settings"],
        f"imagenet-toy-{tune.get_context().get_trial_id()}",
        storage=spec["settings"].storage / "imagenet-toy" / "train",
        train_callbacks=[TuneReportCallback()],
        worker_callbacks=[RefreshProbe(spec["probe"])],
    )
    if result.error is not None:
        raise result.error
    return final_metrics(result)


def rehearse(
    results_dir: Path, *, smoke: bool, epochs: int, max_iter: int, per_class: int
) -> tuple[dict[str, Any], list[str]]:
    """One Tune trial around a 2-worker Train run at K = 1000; returns the record and the
    failed checks (empty when everything holds)."""
    import ray
    from ray import tune

    from nfpi.checkpoint import find_checkpoint, load_checkpoint
    from ray_jobs.settings import RaySettings
    from ray_jobs.tracking import resolve_tracking

    if per_class < MIN_PER_CLASS:
        raise ConfigError(
            "per_class",
            per_class,
            f"an int >= {MIN_PER_CLASS}: with fewer images a class's data-init variances collapse",
        )
    if (results_dir / "runs").exists():
        raise FileExistsError(f"{results_dir} holds runs of an earlier rehearsal: pass a fresh one")
    errors: list[str] = []
    t0 = time.perf_counter()
    root = write_imagefolder(
        results_dir / "imagenet-toy",
        num_classes=NUM_CLASSES,
        shape=SHAPE,
        train_per_class=per_class,
        test_per_class=1,
    )
    write_s = time.perf_counter() - t0
    config = _config(root, results_dir / "decoded", epochs=epochs, max_iter=max_iter)
    tracking = resolve_tracking(results_dir, None, "nfpi-imagenet-toy")
    dim = SHAPE[0] * SHAPE[1] * SHAPE[2]
    probe_path = results_dir / "refresh.jsonl"
    started = not ray.is_initialized()
    if started:  # a private local Ray ("local": never attach to a `ray start` cluster)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        settings = RaySettings(
            results_dir=results_dir, tracking=tracking, num_workers=2, max_failures=0
        )
        idle_peak, idle_rss = _idle_actor_memory(dim)
        spec = {"settings": settings, "probe": probe_path}
        trainable = tune.with_resources(
            tune.with_parameters(imagenet_trial, config=config.to_dict(), spec=spec),
            {"cpu": 0.01},
        )
        t0 = time.perf_counter()
        grid = tune.Tuner(
            trainable,
            param_space={"prior.method": "fpi"},
            tune_config=tune.TuneConfig(metric="nf_acc", mode="max", num_samples=1),
            run_config=tune.RunConfig(name="imagenet-toy", storage_path=str(settings.storage)),
        ).fit()
        run_s = time.perf_counter() - t0
    finally:
        if started:
            ray.shutdown()
    trial = grid[0]
    final = dict(trial.metrics or {})
    epochs_rec = (
        [json.loads(line) for line in probe_path.read_text().splitlines()]
        if probe_path.exists()
        else []
    )
    run_dirs = sorted((results_dir / "runs").glob("imagenet-toy-*"))
    state_path = find_checkpoint(run_dirs[0]) if len(run_dirs) == 1 else None
    state = load_checkpoint(state_path) if state_path is not None else {}
    plots = sorted(p.name for d in run_dirs for p in (d / "plots").glob("*.png"))
    record = {
        "classes": NUM_CLASSES,
        "dim": dim,
        "train_images": NUM_CLASSES * per_class,
        "test_images": NUM_CLASSES,
        "workers": 2,
        "epochs": epochs,
        "fpi_max_iter": max_iter,
        "write_imagefolder_s": round(write_s, 1),
        "tune_trial_s": round(run_s, 1),
        "idle_actor_peak_mib": round(idle_peak, 1),
        "idle_actor_rss_mib": round(idle_rss, 1),
        "per_epoch": epochs_rec,
        "final": {k: final.get(k) for k in ("epoch", "nf_acc", "test_bpd", "train_bpd")},
        "plots": plots,
        "trial_error": None if trial.error is None else str(trial.error),
        "smoke": smoke,
    }
    if trial.error is not None:
        errors.append(f"the Tune trial failed: {trial.error}")
    if len(epochs_rec) != epochs:
        errors.append(f"{len(epochs_rec)} epochs probed, {epochs} expected")
    for r in epochs_rec:
        if (r["world"], r["prior_classes"], r["prior_dim"]) != (2, NUM_CLASSES, dim):
            errors.append(f"epoch {r['epoch']}: world, K, d = {r['world'], r['prior_classes']}")
        if not r["fpi_iterations"]:
            errors.append(f"epoch {r['epoch']}: no FPI solve reported")
    means = state.get("prior", {}).get("means")
    if means is None or tuple(means.shape) != (NUM_CLASSES, dim):
        errors.append("the final checkpoint's prior is not 1000 x 3072")
    if final.get("nf_acc") is None or final.get("epoch") != epochs - 1:
        errors.append(f"Tune got no final NF-Acc: {final}")
    for want in ("samples_T0.7.png", "tsne.png"):
        if want not in plots:
            errors.append(f"{want} missing from the run's plots ({plots})")
    return record, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", help="where everything goes (default: a temporary one)")
    parser.add_argument("--epochs", type=int, help="epochs of the Train run (1 smoke, 2)")
    parser.add_argument("--max-iter", type=int, help="FPI iterations per solve (3 smoke, 20)")
    parser.add_argument("--per-class", type=int, help="train images per class (2 smoke, 4)")
    parser.add_argument("--out", metavar="PATH", help="write the record as JSON")
    parser.add_argument("--smoke-test", action="store_true", help="the suite's sizes")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with tempfile.TemporaryDirectory(prefix="nfpi-imagenet-toy-") as tmp:
        results = Path(args.results_dir or tmp).expanduser().resolve()
        record, errors = rehearse(
            results,
            smoke=args.smoke_test,
            epochs=args.epochs or (1 if args.smoke_test else 2),
            max_iter=args.max_iter or (3 if args.smoke_test else 20),
            per_class=args.per_class or (MIN_PER_CLASS if args.smoke_test else 8),
        )
    print(
        f"\nK = {record['classes']}, d = {record['dim']}, {record['train_images']} train images, "
        f"2 Train workers; FPI max_iter {record['fpi_max_iter']}; idle actor peak "
        f"{record['idle_actor_peak_mib']:.0f} MiB"
    )
    print(
        f"{'epoch':>5}{'refresh_s':>10}{'stats_s':>9}{'iters':>6}{'actor_cpu':>10}"
        f"{'actor_peak':>11}{'+idle':>7}{'rank0_peak':>11}{'epoch_s':>9}{'nf_acc':>8}{'load':>6}"
    )
    for r in record["per_epoch"]:
        print(
            f"{r['epoch']:>5}{r['prior_refresh_s']:>10.2f}{r['prior_stats_s']:>9.2f}"
            f"{r['fpi_iterations'] or 0:>6.0f}{r['actor_cpu_s']:>10.1f}{r['actor_peak_mib']:>11.0f}"
            f"{r['actor_peak_mib'] - record['idle_actor_peak_mib']:>7.0f}"
            f"{r['rank0_peak_mib']:>11.0f}{r['epoch_seconds']:>9.1f}{r['nf_acc']:>8.4f}"
            f"{r['loadavg_1min']:>6.1f}"
        )
    print(f"final {record['final']}; the Tune trial took {record['tune_trial_s']:.0f} s")
    return report_checks(args.out, {"record": record}, errors)


if __name__ == "__main__":
    from rehearsals.imagenet import main as _main  # workers import the probe by name

    sys.exit(_main())
