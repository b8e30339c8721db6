"""What NF augmentation costs a classifier epoch: served from a precomputed pool against run in
the loop, both against the standard augmentations alone (same run, same classifier, same data).

Usage::

    python benchmarks/augment_cost.py --quick             # ~2 minutes on 2 CPU cores
    python benchmarks/augment_cost.py --out aug.json      # full: mef-cifar flow, ResNet-18
    python benchmarks/augment_cost.py --device cuda       # flows and classifier on the GPU
    python benchmarks/augment_cost.py --smoke-test        # seconds: toy sizes

Rows (``setting``), each a fresh worker process training the same classifier on the same
images (random uint8 3x32x32, 10 classes) for ``epochs`` epochs with crop + flip + RandAugment:

- ``standard``: the standard augmentations only;
- ``nf_pool``: plus NF augmentation served from a pool (:mod:`nfpi.downstream.pool`:
  ``PooledNFDataset``, p = 0.5, 2 variants per image and round, a new round every epoch, the
  worst case for the reader: every measured epoch opens and checks a round);
- ``nf_online``: plus NF augmentation in the loop (:class:`nfpi.downstream.NFAugment`, p = 0.5).

The NF rows use the same untrained flow (data-initialised; the cost does not depend on training)
and class subspaces (r = 16, 4 in the smoke test). ``epoch_s`` is the last epoch's wall time (the
first warms up), ``vs_standard`` its ratio to the standard row's; ``cpu_s_per_epoch`` the
worker's CPU seconds (all threads) of the classifier run over its epochs and ``cpu_vs_standard``
its ratio (the work: on a shared machine the load changes the wall times, not this). ``pool_build_s`` (``nf_pool``
row): building the rounds the run reads, before training, with Ray tasks in parallel
(``ray_jobs/augment_pool.py``, one per shard, the class-subspace fit included) when Ray is
installed and the device is the CPU, else in this process (``pool_builder`` says which;
``--pool-builder ray|process`` forces one); ``pool_mb`` the pool's size on disk. Workers run
with ``OMP_WAIT_POLICY=PASSIVE``.

``--smoke-test``: 100 images, the ``tiny`` flow, timm's ``resnet10t``, 2 epochs, the pool built
in process (the Ray builder writes the same bytes: ``tests/downstream/test_pool.py``;
``--pool-builder ray`` runs it here too), in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import (  # benchmarks/ is on sys.path
    add_device_arg,
    benchmark_parser,
    check_device,
    device_name,
    mode_name,
    run_worker,
    worker_env,
    write_records,
)

K = 10
SETTINGS = ("standard", "nf_pool", "nf_online")


class RandomImages(torch.utils.data.Dataset):
    """``n`` random uint8 3x32x32 images with balanced labels (``targets``), seeded."""

    shape = (3, 32, 32)

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, *self.shape), dtype=torch.uint8, generator=gen)
        self.targets = torch.arange(n) % K

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


def _configs(args: argparse.Namespace):
    from nfpi.downstream import ClassifierConfig, NFAugmentConfig, PoolConfig

    clf = ClassifierConfig(
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch,
        randaugment=True,
        device=args.device,
        eval_batch_size=100,
    )
    r = 4 if args.smoke_test else 16
    aug = NFAugmentConfig(
        n_components=r,
        probability=0.5,
        per_class_fit_samples=max(r + 1, min(100, args.images // K)),
    )
    pool = PoolConfig(
        variants=2,
        refresh_every=1,
        probability=0.5,
        shard_size=max(K, args.images // 4),
        batch_size=min(100, args.images),
    )
    return clf, aug, pool


def _flow_checkpoint(folder: Path, preset: str, images: RandomImages) -> Path:
    """An untrained, data-initialised ``preset`` flow written as an nfpi checkpoint (what the
    pool builder and the pool key read)."""
    from nfpi.config import ExperimentConfig
    from nfpi.data import DatasetInfo
    from nfpi.downstream.pca import bin_centres
    from nfpi.flows import build_flow
    from nfpi.prior import GaussianPrior

    torch.manual_seed(0)
    flow = build_flow(preset, in_shape=RandomImages.shape)
    flow.data_init(bin_centres(images.images[:256], torch.float32))
    config = ExperimentConfig().with_overrides({"flow.preset": preset, "name": "benchmark"})
    info = DatasetInfo("random", K, RandomImages.shape, tuple(map(str, range(K))))
    d = flow.latent_dim
    state = {
        "config": config.to_dict(),
        "flow": flow.state_dict(),
        "ema": None,
        "prior": GaussianPrior(torch.zeros(K, d), var=torch.ones(K, d)).state_dict(),
        "data_info": dataclasses.asdict(info),
        "epoch": 0,
    }
    file = folder / "flow" / "state.pt"
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    return file


def _build_pool(args: argparse.Namespace, file: Path, data: RandomImages) -> dict[str, Any]:
    """Build the rounds the nf_pool row reads; Ray tasks when possible."""
    _, aug, pool = _configs(args)
    root = Path(args.pool_root)
    has_ray = importlib.util.find_spec("ray") is not None
    if args.pool_builder == "ray" and not has_ray:
        raise SystemExit("--pool-builder ray: ray is not installed (pip install ray)")
    use_ray = args.pool_builder == "ray" or (
        args.pool_builder == "auto" and args.device == "cpu" and has_ray and not args.smoke_test
    )
    t0 = time.perf_counter()
    if use_ray:
        import ray

        from ray_jobs.augment_pool import build_pool

        os.environ.pop("RAY_ADDRESS", None)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": worker_env()})  # fmt: skip
        try:
            build = build_pool(file, data, aug, pool, args.epochs, root=root)
        finally:
            ray.shutdown()
        store = build.store
    else:
        from nfpi.downstream.pool import pooled_dataset

        pooled, _ = pooled_dataset(
            file, data, aug, pool, args.epochs, root=root, device=args.device
        )
        store = pooled.store
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in store.dir.rglob("*.npy"))
    return {
        "pool_build_s": round(seconds, 2),
        "pool_builder": "ray_tasks" if use_ray else "in_process",
        "pool_rounds": len(pool.rounds_for(args.epochs)),
        "pool_mb": round(size / 2**20, 1),
        "pool_key": store.key,
    }


def _setting_worker(args: argparse.Namespace) -> dict[str, Any]:
    from nfpi.checkpoint import load_trained
    from nfpi.downstream import NFAugment, train_classifier
    from nfpi.downstream.pca import ClassPCA
    from nfpi.downstream.pool import PooledNFDataset, PoolStore

    clf, aug, pool = _configs(args)
    data, test = RandomImages(args.images, 0), RandomImages(100, 1)
    train: Any = data
    nf = None
    if args.worker == "nf_pool":
        store = PoolStore.for_flow(args.pool_root, args.flow_file, data, aug, pool)
        train = PooledNFDataset(data, store, pool)
    elif args.worker == "nf_online":
        flow = load_trained(args.flow_file, device=args.device).flow
        pca = ClassPCA.fit(
            flow, data, K, aug.n_components, per_class_samples=aug.per_class_fit_samples
        )
        nf = NFAugment(flow, pca, aug, data)
    cpu0 = time.process_time()
    result = train_classifier(train, test, K, clf, nf_augment=nf)
    cpu_s = time.process_time() - cpu0
    epochs = [h["epoch_seconds"] for h in result.history]
    if nf is not None:
        per_epoch = round(nf.stats["augmented"] / len(epochs))
    else:
        per_epoch = int(train.served.sum()) if args.worker == "nf_pool" else 0
    return {
        "setting": args.worker,
        "epoch_s": round(epochs[-1], 3),
        "epoch_s_all": [round(e, 3) for e in epochs],
        # CPU seconds (all threads) of the whole classifier run, per epoch: the work, which the
        # machine's load does not change (passive OpenMP waits), unlike epoch_s.
        "cpu_s_per_epoch": round(cpu_s / len(epochs), 3),
        "nf_augmented_per_epoch": per_epoch,
        "threads": torch.get_num_threads(),
        "loadavg_1min": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(__doc__.splitlines()[0], "400 images, the tiny flow, resnet10t")
    add_device_arg(p)
    p.add_argument("--images", type=int, help="training images (default 1000; 400 quick)")
    p.add_argument("--flow", help="flow preset of the NF rows (default mef-cifar; tiny quick)")
    p.add_argument("--model", help="classifier (timm name; default resnet18; resnet10t quick)")
    p.add_argument("--epochs", type=int, default=2, help="classifier epochs (the last is timed)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument(
        "--pool-builder",
        choices=("auto", "ray", "process"),
        default="auto",
        help="who builds the pool: Ray tasks, this process, or auto (Ray tasks on the CPU when "
        "Ray is installed, except in the smoke test)",
    )
    for hidden in ("--worker", "--pool-root", "--flow-file"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    check_device(args.device)
    small = args.quick or args.smoke_test
    args.images = args.images or (100 if args.smoke_test else 400 if args.quick else 1000)
    args.flow = args.flow or ("tiny" if small else "mef-cifar")
    args.model = args.model or ("resnet10t" if small else "resnet18")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(_setting_worker(args)))
        return

    print(
        f"torch {torch.__version__}, {args.device}: {device_name(args.device)}, "
        f"{mode_name(args)} mode, {args.images} images, flow {args.flow}, classifier "
        f"{args.model}, {args.epochs} epochs, load average {os.getloadavg()[0]:.1f}\n"
    )
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = RandomImages(args.images, 0)
        file = _flow_checkpoint(Path(tmp), args.flow, data)
        args.pool_root = str(Path(tmp) / "pools")
        build = _build_pool(args, file, data)
        env = worker_env()
        common = ["--images", str(args.images), "--flow", args.flow, "--model", args.model]
        common += ["--epochs", str(args.epochs), "--batch", str(args.batch)]
        common += ["--device", args.device, "--pool-root", args.pool_root, "--flow-file", str(file)]
        common += ["--threads", str(args.threads)] if args.threads else []
        common += ["--smoke-test"] if args.smoke_test else []
        for setting in SETTINGS:
            out = run_worker(__file__, ["--worker", setting, *common], env)
            row = json.loads(out.strip().splitlines()[-1])
            row.update(
                flow=args.flow, model=args.model, images=args.images, device=args.device,
                pool_build_s=None, pool_builder=None, pool_rounds=None, pool_mb=None,
            )  # fmt: skip
            if setting == "nf_pool":
                row.update({k: v for k, v in build.items() if k != "pool_key"})
            records.append(row)
    std = records[0]["epoch_s"]
    print(
        f"{'setting':<10} {'epoch_s':>8} {'vs standard':>11} {'cpu_s/epoch':>11} {'cpu vs std':>10}"
        f" {'NF images/epoch':>15} {'pool_build_s':>12} {'load':>5}"
    )
    std_cpu = records[0]["cpu_s_per_epoch"]
    for r in records:
        r["vs_standard"] = round(r["epoch_s"] / std, 3)
        r["cpu_vs_standard"] = round(r["cpu_s_per_epoch"] / std_cpu, 3)
        build_s = "-" if r["pool_build_s"] is None else f"{r['pool_build_s']:.1f}"
        print(
            f"{r['setting']:<10} {r['epoch_s']:>8.2f} {r['vs_standard']:>10.2f}x"
            f" {r['cpu_s_per_epoch']:>11.2f} {r['cpu_vs_standard']:>9.2f}x"
            f" {r['nf_augmented_per_epoch']:>15} {build_s:>12} {r['loadavg_1min']:>5.1f}"
        )
    pool_row = records[1]
    verdict = "PASS" if pool_row["vs_standard"] <= 1.5 else "FAIL"
    print(
        f"\nnf_pool epoch / standard epoch: {pool_row['vs_standard']:.2f}x (target <= 1.5x) -> "
        f"{verdict}; nf_online: {records[2]['vs_standard']:.2f}x; CPU seconds per epoch: "
        f"nf_pool {pool_row['cpu_vs_standard']:.2f}x, nf_online "
        f"{records[2]['cpu_vs_standard']:.2f}x. Pool: "
        f"{pool_row['pool_rounds']} rounds x 2 variants of {args.images} images, "
        f"{pool_row['pool_mb']} MB, built in {pool_row['pool_build_s']} s "
        f"({pool_row['pool_builder']})"
    )
    if args.out:
        write_records(args.out, records)


if __name__ == "__main__":
    main()
