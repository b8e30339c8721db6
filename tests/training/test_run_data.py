"""A run's data (nfpi.training.run_data): each rank's loaders split every batch and pass by the
world size and together cover the data once; a batch larger than the training set is refused."""

import pytest
import torch

from nfpi.errors import ConfigError
from nfpi.presets import experiment_config
from nfpi.training.run_data import RunData

CPU = torch.device("cpu")


def _config(**overrides):
    return experiment_config("smoke", {"optim.batch_size": 32, **overrides})


def test_ranks_share_every_epoch_and_every_pass_without_overlap():
    ranks = [RunData(_config(), CPU, rank, 2) for rank in (0, 1)]
    size = len(ranks[0].train_set)
    assert ranks[0].train_loader.batch_size == 16  # optim.batch_size // world
    assert ranks[0].dim == ranks[0].info.shape[0] * ranks[0].info.shape[1] * ranks[0].info.shape[2]
    for epoch in (0, 1):
        orders = []
        for data in ranks:
            data.train_sampler.set_epoch(epoch)
            orders.append(list(data.train_sampler))
        assert not set(orders[0]) & set(orders[1])
        assert len(orders[0]) == len(orders[1]) >= size // 2 - 1
    assert orders[0] != list(range(0, size, 2))  # a permutation, not the identity
    for loader, n in (("stats_loader", size), ("test_loader", len(ranks[0].test_set))):
        shards = [list(getattr(data, loader).sampler) for data in ranks]
        assert sorted(shards[0] + shards[1]) == list(range(n))


def test_one_rank_sees_the_same_data_the_same_way_twice():
    a, b = RunData(_config(), CPU), RunData(_config(), CPU)
    a.train_sampler.set_epoch(3)
    b.train_sampler.set_epoch(3)
    assert list(a.train_sampler) == list(b.train_sampler)
    assert torch.equal(a.train_set[5][0], b.train_set[5][0])
    assert (a.augment is None) == (not _config().data.augment)


def test_a_batch_larger_than_the_training_set_names_the_field():
    size = len(RunData(_config(), CPU).train_set)
    with pytest.raises(ConfigError) as err:
        RunData(_config(**{"optim.batch_size": size + 1}), CPU)
    assert err.value.field == "optim.batch_size" and str(size) in str(err.value)
