"""Generation throughput of the mef-cifar flow and the cost of NF augmentation per training batch.

Usage::

    python benchmarks/generation_throughput.py --quick              # ~80 s on 2 CPU cores
    python benchmarks/generation_throughput.py --out gen.json       # full, ~2.5 minutes
    python benchmarks/generation_throughput.py --smoke-test         # seconds: toy sizes

Rows (each in a fresh subprocess; ``peak_mb`` is its peak resident set, ``VmHWM``, torch
included; ``base_mb`` the resident set after imports and model construction):

- ``generate_mef_cifar``: :func:`nfpi.downstream.generate_dataset` end to end (latent sampling,
  ``flow.inverse``, ``to_uint8``, ``.npy`` shard + SHA-256 to a temporary directory) with an
  untrained ``mef-cifar`` flow (3x32x32) and a random 16-class diagonal prior: throughput does not
  depend on training. ``per_s`` = images / seconds of the timed call, after a warm-up call on
  a few images. Full mode times 2 batches of 256; ``--quick`` times 1 batch of 64 (a mef-cifar
  batch of 256 takes 30-40 s on 2 cores).
- ``augment_standard``: random crop (padding 4) + flip + RandAugment(2, 9) on a uint8 batch of
  100 3x32x32 images (:class:`nfpi.downstream.BatchCropFlip`, :class:`BatchRandAugment`).
- ``augment_standard_torchvision``: the same standard augmentations as a per-image torchvision
  pipeline (``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``, ``RandAugment(2, 9)``),
  what a Dataset transform would run, for comparison.
- ``augment_standard_plus_nf``: :class:`nfpi.downstream.NFAugment` (p = 0.5, r = 16, partners
  from the batch, 10 classes of 10 images) on the same untrained mef-cifar flow, then the same
  standard augmentations. ``per_s`` = images per second through the augmentation.
- ``classifier_step_resnet18``: for scale, one SGD step of the CNN-Acc ResNet-18 (CIFAR stem) on
  a batch of 100 3x32x32 images.

``--device cuda`` runs the flows, the NF augmentation and the ResNet-18 step on the GPU (the
standard augmentations stay on the CPU, as in the classifier's loop); ``peak_mb`` is then
``torch.cuda.max_memory_allocated``.

Timings are best-of-repetitions (the machine may be shared); workers run with
``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it. ``flow`` names the flow preset of
the generation and NF rows.

``--smoke-test`` runs every row, each still in its own worker process, at toy sizes in seconds:
the ``tiny`` flow preset stands in for mef-cifar (``flow`` says so), generation times 1 batch of
16, the augmentation rows and the ResNet-18 step use batches of 20 and one timed repetition.
"""

from __future__ import annotations

import argparse
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
    device_peak_mb,
    mode_name,
    run_worker,
    synchronize,
    vm,
    worker_env,
    write_records,
)

DEVICE = "cpu"  # --device: set once per worker process

FLOW = "mef-cifar"  # the flow of the generation and NF rows
SMOKE_FLOW = "tiny"  # --smoke-test: the same layer types at toy size


def _random_model(num_classes: int, preset: str, seed: int = 0) -> Any:
    """An untrained ``preset`` flow (3x32x32) with a random diagonal prior, as a TrainedModel."""
    from nfpi.checkpoint import TrainedModel
    from nfpi.config import ExperimentConfig
    from nfpi.data import DatasetInfo
    from nfpi.flows import build_flow
    from nfpi.prior import GaussianPrior

    torch.manual_seed(seed)
    flow = build_flow(preset, in_shape=(3, 32, 32)).eval().to(DEVICE)
    d = flow.latent_dim
    prior = GaussianPrior(0.3 * torch.randn(num_classes, d), var=0.25 + torch.rand(num_classes, d))
    info = DatasetInfo("random", num_classes, (3, 32, 32), tuple(map(str, range(num_classes))))
    config = ExperimentConfig().with_overrides({"flow.preset": preset, "name": "benchmark"})
    return TrainedModel(flow, prior, config, info, epoch=0)


def _best(fn, reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        synchronize(DEVICE)
        t0 = time.perf_counter()
        fn()
        synchronize(DEVICE)
        times.append(time.perf_counter() - t0)
    return min(times), times


def _peak_mb() -> int:
    """The worker's peak: device memory on CUDA, else the resident set (VmHWM)."""
    peak = device_peak_mb(DEVICE)
    return round(peak if peak is not None else vm("VmHWM"))


# ------------------------------------------------------------------------------------------------
# Workers (one per row, in a fresh process)
# ------------------------------------------------------------------------------------------------


def _generate_worker(batch: int, batches: int, preset: str) -> dict[str, Any]:
    from nfpi.downstream import generate_dataset

    k = 16
    model = _random_model(k, preset)
    base = vm("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: allocator, thread pool, first-call dispatch.
        generate_dataset(
            model, Path(tmp) / "warm", per_class=1, temperature=1.0, seed=1, device=DEVICE
        )
        n = batch * batches
        synchronize(DEVICE)
        t0 = time.perf_counter()
        generate_dataset(
            model,
            Path(tmp) / "set",
            per_class=n // k,
            temperature=1.0,
            seed=0,
            batch_size=batch,
            device=DEVICE,
        )
        synchronize(DEVICE)
        seconds = time.perf_counter() - t0
        on_disk = sum(f.stat().st_size for f in (Path(tmp) / "set").iterdir())
    return {
        "what": "generate_mef_cifar",
        "flow": preset,
        "batch": batch,
        "per_s": round(n / seconds, 3),
        "peak_mb": _peak_mb(),
        "base_mb": round(base),
        "images": n,
        "batches": batches,
        "seconds": round(seconds, 2),
        "bytes_on_disk": on_disk,
    }


def _augment_worker(what: str, batch: int, reps: int, preset: str) -> dict[str, Any]:
    from nfpi.downstream import BatchCropFlip, BatchRandAugment

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.arange(batch) % 10
    crop_flip, randaug = BatchCropFlip(4, flip=True), BatchRandAugment(2, 9)
    nf = None
    extra: dict[str, Any] = {}
    if what == "augment_standard_torchvision":
        from torchvision.transforms import v2

        # The same augmentations as a per-image torchvision pipeline (what a Dataset transform
        # does), for comparison with the batched version.
        per_image = v2.Compose(
            [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), v2.RandAugment(2, 9)]
        )

        def crop_flip(images: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
            return images

        def randaug(images: torch.Tensor, _gen: torch.Generator) -> torch.Tensor:
            return torch.stack([per_image(im) for im in images])

    if what == "augment_standard_plus_nf":
        from nfpi.downstream import ClassPCA, NFAugment, NFAugmentConfig

        flow = _random_model(10, preset).flow
        d, r = flow.latent_dim, 16
        # Random class subspaces: the cost of mixing does not depend on the fit.
        axes = torch.linalg.qr(torch.randn(10, d, r, dtype=torch.float64))[0]
        pca = ClassPCA(
            torch.zeros(10, d), axes, torch.ones(10, r), torch.full((10,), 500), torch.ones(10)
        ).to(DEVICE)
        nf = NFAugment(flow, pca, NFAugmentConfig(n_components=r, probability=0.5))
        extra = {"flow": preset, "p": 0.5, "n_components": r}
    base = vm("VmRSS")

    def step() -> None:
        out = x
        if nf is not None:
            out = nf(out, y, gen)
        randaug(crop_flip(out, gen), gen)

    # Warm-up on a tenth of the batch (allocator, thread pool, first-call dispatch): a full
    # NF batch costs tens of seconds on a CPU.
    small_x, small_y = x[: batch // 10], y[: batch // 10]
    if nf is not None:
        nf(small_x, small_y, gen)
        nf.stats = dict.fromkeys(nf.stats, 0)
    randaug(crop_flip(small_x, gen), gen)
    best, times = _best(step, reps)
    row = {
        "what": what,
        "batch": batch,
        "per_s": round(batch / best, 3),
        "peak_mb": _peak_mb(),
        "base_mb": round(base),
        "seconds_per_batch": round(best, 4),
        "seconds_all": [round(t, 4) for t in times],
        **extra,
    }
    if nf is not None:
        row["nf_picked_per_batch"] = round(nf.stats["picked"] / reps, 1)
    return row


def _classifier_worker(batch: int, reps: int) -> dict[str, Any]:
    from nfpi.downstream import build_classifier

    torch.manual_seed(0)
    net = build_classifier("resnet18", 10, 3, 32).to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    base = vm("VmRSS")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    step()
    best, times = _best(step, reps)
    return {
        "what": "classifier_step_resnet18",
        "batch": batch,
        "per_s": round(batch / best, 3),
        "peak_mb": _peak_mb(),
        "base_mb": round(base),
        "seconds_per_batch": round(best, 4),
        "seconds_all": [round(t, 4) for t in times],
    }


def _run_worker(args: list[str], threads: int | None) -> dict[str, Any]:
    """Run this script's worker mode in a fresh process; its last stdout line is JSON."""
    if threads:
        args = [*args, "--threads", str(threads)]
    args = [*args, "--device", DEVICE]
    env = worker_env()  # passive OpenMP waits: RandAugment on 100 images was 10x slower spinning
    stdout = run_worker(__file__, args, env)
    row = json.loads(stdout.strip().splitlines()[-1])
    row["omp_wait_policy"] = env["OMP_WAIT_POLICY"]
    row["threads"] = threads or torch.get_num_threads()
    row["loadavg_1min"] = round(os.getloadavg()[0], 2)
    return row


def main(argv: list[str] | None = None) -> None:
    p = benchmark_parser(
        __doc__.splitlines()[0],
        "generation: 1 batch of 64; NF augmentation and ResNet step: 1 timed batch",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--flow", default=FLOW, help=argparse.SUPPRESS)
    add_device_arg(p)
    args = p.parse_args(argv)
    check_device(args.device)
    global DEVICE
    DEVICE = args.device
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.worker:
        if args.worker == "generate_mef_cifar":
            row = _generate_worker(args.batch, args.batches, args.flow)
        elif args.worker == "classifier_step_resnet18":
            row = _classifier_worker(args.batch, args.reps)
        else:
            row = _augment_worker(args.worker, args.batch, args.reps, args.flow)
        print(json.dumps(row))
        return

    flow, batch = FLOW, 100  # batch: the augmentation and ResNet-18 rows
    if args.smoke_test:
        flow, batch = SMOKE_FLOW, 20
        gen_batch, gen_batches = 16, 1
        aug_reps, nf_reps, step_reps = 1, 1, 1
    elif args.quick:
        gen_batch, gen_batches = 64, 1
        aug_reps, nf_reps, step_reps = 3, 1, 1
    else:
        gen_batch, gen_batches = 256, 2
        aug_reps, nf_reps, step_reps = 10, 3, 5
    gen = ["--batch", str(gen_batch), "--batches", str(gen_batches)]
    plan = [
        ["--worker", "generate_mef_cifar", *gen, "--flow", flow],
        ["--worker", "augment_standard", "--batch", str(batch), "--reps", str(aug_reps)],
        [
            "--worker",
            "augment_standard_torchvision",
            "--batch",
            str(batch),
            "--reps",
            str(aug_reps),
        ],
        [
            "--worker",
            "augment_standard_plus_nf",
            "--batch",
            str(batch),
            "--reps",
            str(nf_reps),
            "--flow",
            flow,
        ],
        ["--worker", "classifier_step_resnet18", "--batch", str(batch), "--reps", str(step_reps)],
    ]
    mode = {
        "smoke": f"smoke test: flow preset {flow!r} instead of {FLOW!r}, toy batches "
        "(the numbers mean nothing)",
        "quick": f"quick mode: generation times {gen_batches} batch of {gen_batch} "
        "(full mode: 2 x 256)",
        "full": "full mode",
    }[mode_name(args)]
    print(
        f"torch {torch.__version__}, {args.device}: {device_name(args.device)}, "
        f"{args.threads or torch.get_num_threads()} threads, {mode}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        f"{'what':<30} {'batch':>5} {'images/s':>9} {'s/batch':>8} {'peak MiB':>9} "
        f"{'base MiB':>9} {'load':>5}"
    )
    records = []
    for worker_args in plan:
        row = _run_worker(worker_args, args.threads)
        records.append(row)
        per_batch = row.get("seconds_per_batch", row["batch"] / row["per_s"])
        print(
            f"{row['what']:<30} {row['batch']:>5} {row['per_s']:>9.2f} {per_batch:>8.3f} "
            f"{row['peak_mb']:>9} {row['base_mb']:>9} {row['loadavg_1min']:>5.1f}",
            flush=True,
        )
    by = {r["what"]: r for r in records}
    std, nf = by["augment_standard"], by["augment_standard_plus_nf"]
    step = by["classifier_step_resnet18"]
    print(
        f"\nNF augmentation (p = 0.5, {flow}) costs {nf['seconds_per_batch']:.2f} s per batch "
        f"of {batch} vs {std['seconds_per_batch'] * 1e3:.1f} ms for crop + flip + RandAugment "
        f"({nf['seconds_per_batch'] / std['seconds_per_batch']:.0f}x) and "
        f"{step['seconds_per_batch']:.2f} s for a ResNet-18 training step "
        f"({nf['seconds_per_batch'] / step['seconds_per_batch']:.1f}x the step)."
    )
    if args.out:
        write_records(args.out, records)


if __name__ == "__main__":
    main()
