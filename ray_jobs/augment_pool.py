"""NF-augmented pools built by Ray tasks in parallel (the library part: :mod:`nfpi.downstream.pool`).

    python ray_jobs/augment_pool.py results/runs/flow-abc123 --epochs 30 \\
        --set nf_augment.n_components=16 --set pool.variants=2 --set pool.refresh_every=5
    python ray_jobs/augment_pool.py --smoke-test           # seconds: a toy flow and pool

One task fits the class subspaces (:class:`~nfpi.downstream.pca.ClassPCA`) through the flow; then
every shard of every missing round is one task (``num_cpus`` each, a GPU each with
``--use-gpu``): it loads the flow once per worker process, augments its items and writes its
shard straight to the pool folder (streamed: the driver never holds images), returning the
shard's size and SHA-256. The driver holds each round's file lock while its shards run and writes
the round's manifest when the last one is back, so concurrent trials of the same flow and
settings build a round once and then share it; a trial that finds the rounds built loads no flow
at all. The results folder must be shared storage on a multi-node cluster (like checkpoints).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from nfpi.checkpoint import find_checkpoint, load_trained
from nfpi.config import ExperimentConfig
from nfpi.data import load_dataset
from nfpi.downstream.nf_augment import NFAugmentConfig
from nfpi.downstream.pca import ClassPCA
from nfpi.downstream.pool import (
    PoolConfig,
    PoolStore,
    ShardRecord,
    build_shard,
    default_root,
    pool_augmenter,
)
from nfpi.errors import CheckpointError, ConfigError
from nfpi.presets import parse_override

__all__ = ["PoolBuild", "build_pool", "main", "train_set_of"]

log = logging.getLogger("nfpi.ray.pool")

_FLOWS: dict[tuple[str, bool, str], tuple[torch.nn.Module, int]] = {}  # per worker process


def _flow(file: str, use_ema: bool, device: str) -> tuple[torch.nn.Module, int]:
    """The flow of ``file`` and the grey levels of its data (``DatasetInfo.levels``)."""
    key = (file, use_ema, device)
    if key not in _FLOWS:
        _FLOWS.clear()  # one flow per worker at a time
        model = load_trained(file, device=device, use_ema=use_ema)
        _FLOWS[key] = (model.flow, model.info.levels)
    return _FLOWS[key]


def _device(use_gpu: bool) -> str:
    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"


def _fit_pca_task(
    file: str, dataset: Any, num_classes: int, aug: NFAugmentConfig, use_gpu: bool
) -> ClassPCA:
    flow, levels = _flow(file, aug.use_ema, _device(use_gpu))
    pca = ClassPCA.fit(
        flow,
        dataset,
        num_classes,
        aug.n_components,
        per_class_samples=aug.per_class_fit_samples,
        batch_size=aug.fit_batch_size,
        seed=aug.seed,
        levels=levels,
    )
    return pca.to("cpu") if hasattr(pca, "to") else pca


def _shard_task(
    file: str,
    dataset: Any,
    pca: ClassPCA,
    aug: NFAugmentConfig,
    pool: PoolConfig,
    store: PoolStore,
    round_: int,
    index: int,
    start: int,
    end: int,
    use_gpu: bool,
) -> ShardRecord:
    device = _device(use_gpu)
    flow, levels = _flow(file, aug.use_ema, device)
    pca = pca.to(device) if hasattr(pca, "to") else pca
    augment = pool_augmenter(flow, pca, aug, dataset, levels)
    images = build_shard(augment, dataset, start, end, pool, round_, index)
    return store.write_shard(round_, index, start, images)


@dataclass
class PoolBuild:
    """What :func:`build_pool` did: the store, the rounds it built (others existed), the wall
    seconds, and the shards it wrote."""

    store: PoolStore
    built: list[int] = field(default_factory=list)
    seconds: float = 0.0
    shards: int = 0


def train_set_of(checkpoint: str | Path) -> Any:
    """The un-augmented training set of a flow's checkpoint, as ``run_downstream`` loads it."""
    file = find_checkpoint(checkpoint)
    if file is None:
        raise CheckpointError(f"no checkpoint at {checkpoint}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    config = ExperimentConfig.from_dict(state["config"])
    data = config.data
    train, _ = load_dataset(data.name, "train", seed=config.seed, **data.split_kwargs("train"))
    return train


def build_pool(
    checkpoint: str | Path,
    dataset: Any,
    augment: NFAugmentConfig,
    pool: PoolConfig,
    epochs: int,
    *,
    root: str | Path | None = None,
    num_cpus: float = 1,
    use_gpu: bool = False,
    escape_placement_group: bool = False,
) -> PoolBuild:
    """Build, with parallel Ray tasks, every round that ``epochs`` classifier epochs read and
    that does not exist yet, for the flow of ``checkpoint`` on ``dataset`` (the un-augmented
    training set). The same pool :func:`nfpi.downstream.pool.pooled_dataset` opens (same key,
    same default root next to the flow's run directory, same bytes).

    ``escape_placement_group``: run the tasks outside the caller's placement group (a Tune
    trial's driver holds only a token-sized one).
    """
    file = find_checkpoint(checkpoint)
    if file is None:
        raise CheckpointError(f"no checkpoint at {checkpoint} to build an NF pool from")
    store = PoolStore.for_flow(root or default_root(file), file, dataset, augment, pool)
    result = PoolBuild(store)
    missing = [r for r in pool.rounds_for(epochs) if not store.complete(r)]
    if not missing:
        return result
    t0 = time.perf_counter()
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": 1 if use_gpu else 0}
    if escape_placement_group:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=None)
    with ExitStack() as locks:
        todo = []
        for r in missing:
            locks.enter_context(store.lock(r))
            if not store.complete(r):  # another builder may have finished it meanwhile
                todo.append(r)
        if not todo:
            return result
        targets = torch.as_tensor(dataset.targets) if hasattr(dataset, "targets") else None
        k = int(targets.max()) + 1 if targets is not None and targets.numel() else None
        if k is None:
            k = load_trained(file).info.num_classes
        data_ref = ray.put(dataset)
        pca_ref = (
            ray.remote(_fit_pca_task)
            .options(**options)
            .remote(str(file), data_ref, k, augment, use_gpu)
        )
        shard_task = ray.remote(_shard_task).options(**options)
        pending = {
            shard_task.remote(
                str(file), data_ref, pca_ref, augment, pool, store, r, i, a, b, use_gpu
            ): r
            for r in todo
            for i, (a, b) in enumerate(store.shard_ranges())
        }
        done: dict[int, list[ShardRecord]] = {r: [] for r in todo}
        expected = len(store.shard_ranges())
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            r = pending.pop(ready[0])
            done[r].append(ray.get(ready[0]))
            if len(done[r]) == expected:
                store.finish_round(r, done[r], time.perf_counter() - t0)
                result.built.append(r)
                result.shards += expected
                log.info("NF pool %s: round %d built (%d shards)", store.key, r, expected)
    result.seconds = time.perf_counter() - t0
    return result


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _configs(overrides: list[str]) -> tuple[NFAugmentConfig, PoolConfig]:
    aug: dict[str, Any] = {}
    pool: dict[str, Any] = {}
    for item in overrides:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        if section == "nf_augment" and name:
            aug[name] = value
        elif section == "pool" and name:
            pool[name] = value
        else:
            raise ConfigError(key, value, "a nf_augment.<field> or pool.<field> key")
    return (
        NFAugmentConfig.from_dict(aug, path="nf_augment"),
        PoolConfig.from_dict(pool, path="pool"),
    )


def _smoke_checkpoint(folder: Path) -> Path:
    """A toy trained flow (the `smoke` experiment, 1 epoch) to build a pool from."""
    from nfpi.presets import experiment_config
    from nfpi.training import Trainer

    config = experiment_config("smoke", {"optim.epochs": 1, "eval.plots": False})
    Trainer(config, folder / "flow").fit()
    return folder / "flow"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="the flow: a run directory or checkpoint")
    parser.add_argument("--epochs", type=int, default=30, help="classifier epochs to cover")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", help="pools folder (default: <flow run dir>/nf_pools)")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per task")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per task")
    parser.add_argument("--address", help="Ray cluster address (default: start a local one)")
    parser.add_argument("--smoke-test", action="store_true", help="a toy flow and pool")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke_test:
            checkpoint = _smoke_checkpoint(Path(tmp))
            sets = ["nf_augment.n_components=2", "nf_augment.per_class_fit_samples=5"]
            sets += ["pool.shard_size=40", "pool.refresh_every=1", "pool.batch_size=20"]
            epochs = 2
        elif args.checkpoint is None:
            parser.error("give a flow checkpoint (or --smoke-test)")
        else:
            checkpoint, sets, epochs = Path(args.checkpoint), args.set, args.epochs
        aug, pool = _configs(sets)
        ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=False)
        dataset = train_set_of(checkpoint)
        build = build_pool(
            checkpoint,
            dataset,
            aug,
            pool,
            epochs,
            root=args.root,
            num_cpus=args.num_cpus,
            use_gpu=args.use_gpu,
        )
        print(
            f"pool {build.store.dir}: rounds {pool.rounds_for(epochs)}, built {build.built} "
            f"({build.shards} shards) in {build.seconds:.1f} s"
        )
    return 0


if __name__ == "__main__":
    from ray_jobs.augment_pool import main as _main  # run as the module: tasks import it by name

    sys.exit(_main())
