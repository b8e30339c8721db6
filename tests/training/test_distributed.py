"""Data-parallel statistics without Ray: two gloo processes sum to one process's statistics."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from nfpi.data import BatchAugment, dequantize, load_dataset
from nfpi.data.sharding import IndexedDataset, ShardSampler
from nfpi.flows import build_flow
from nfpi.training import collect_statistics

pytestmark = pytest.mark.slow  # gloo process groups in spawned processes


def _stats(rank: int, world: int) -> torch.Tensor:
    dataset, info = load_dataset("digits", "train", items_per_class=30)
    flow = build_flow("tiny", in_shape=info.shape, seed=0)
    first = torch.stack([dataset[i][0] for i in range(64)])
    half = torch.full(first.shape, 0.5)  # bin centres: the same init in every process
    flow.data_init(dequantize(first, noise=half, levels=info.levels))
    flow.eval()
    loader = DataLoader(
        IndexedDataset(dataset), 37, sampler=ShardSampler(len(dataset), rank=rank, world=world)
    )
    stats = collect_statistics(
        flow,
        loader,
        info.num_classes,
        torch.device("cpu"),
        seed=5,
        augment=BatchAugment(info.shape, flip=False),
        levels=info.levels,
    )
    return torch.cat([stats.count, stats.mean().flatten(), stats.var().flatten()])


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_stats(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_reduced_statistics_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(rank0, rank1)  # every rank holds the reduced statistics
    single = _stats(0, 1)
    assert torch.equal(rank0[:10], single[:10])  # counts
    # Same images, same per-sample noise and augmentation; only the float64 summation order and
    # the batch composition of the float32 flow differ.
    torch.testing.assert_close(rank0, single, rtol=1e-5, atol=1e-6)


def _ddp_grads(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Gradients of one DDP step with the library's timed all-reduce hook and with DDP's
    default, from the same weights and shards."""
    from nfpi.training.distributed import CommTimer, wrap_ddp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {}
        for name, timer in (("default", None), ("timed", CommTimer())):
            torch.manual_seed(0)
            net = torch.nn.Sequential(
                torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3)
            )
            if timer is None:
                model = torch.nn.parallel.DistributedDataParallel(net)
            else:
                model = wrap_ddp(net, torch.device("cpu"), timer)
            x = torch.randn(8, 6, generator=torch.Generator().manual_seed(rank))
            model(x).square().sum().backward()
            out[name] = [p.grad.clone() for p in net.parameters()]
            if timer is not None:
                out["timer"] = timer.reset()
        torch.save(out, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_timed_allreduce_hook_leaves_gradients_unchanged(tmp_path):
    mp.spawn(_ddp_grads, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        out = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        assert all(torch.equal(a, b) for a, b in zip(out["default"], out["timed"], strict=True))
        seconds, calls = out["timer"]
        assert calls >= 1 and seconds > 0
