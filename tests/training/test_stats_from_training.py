"""prior.stats_from_training: the prior update takes the class statistics gathered during the
epoch's training pass instead of a separate statistics pass."""

from __future__ import annotations

import pytest
import torch

from nfpi.errors import ConfigError
from nfpi.presets import experiment_config
from nfpi.prior import ClassStatistics
from nfpi.training import Trainer, loop


def _trainer(tmp_path, **overrides) -> Trainer:
    cfg = experiment_config(
        "smoke", {"eval.plots": False, "optim.epochs": 1, "optim.batch_size": 16, **overrides}
    )
    return Trainer(cfg, tmp_path / "run")


def _spy(trainer: Trainer) -> tuple[list, list]:
    """Record the statistics every prior update receives, and every separate pass."""
    updates, passes = [], []
    update, statistics = trainer.schedule.update, trainer._statistics

    def spy_update(stats):
        updates.append(stats)
        return update(stats)

    def spy_statistics(flow, epoch):
        passes.append(epoch)
        return statistics(flow, epoch)

    trainer.schedule.update = spy_update
    trainer._statistics = spy_statistics
    return updates, passes


@pytest.mark.slow
def test_gathered_statistics_are_the_training_latents_exactly(tmp_path, monkeypatch):
    """With the flow frozen (learning rate 0), the gathered statistics equal, bit for bit, a
    separate eval-mode pass of the same flow over the very inputs the training pass saw (its
    images with their dequantisation noise and augmentation, in its batches)."""
    trainer = _trainer(tmp_path, **{"prior.stats_from_training": True})
    trainer.scheduler.base_lrs = [0.0]
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    seen, before = [], {}
    real_nll = loop.nll_nats

    def recording_nll(flow, prior, x, y, levels):
        if not seen:  # the flow at the epoch's first step (after its data-init)
            before.update({k: v.clone() for k, v in trainer.flow.state_dict().items()})
        seen.append((x.detach().clone(), y.clone()))
        return real_nll(flow, prior, x, y, levels)

    monkeypatch.setattr(loop, "nll_nats", recording_nll)
    updates, passes = _spy(trainer)
    trainer.fit()
    assert passes == [0]  # the data-init pass only: the epoch's update took no separate pass
    assert len(updates) == 1 and updates[0] is trainer.gathered_stats
    gathered = updates[0]
    # lr 0: the flow is the one that produced every training batch's latents.
    for key, value in trainer.flow.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The data-init prior's means are the shift of the gathered sums (all-reducible).
    assert torch.equal(gathered.shift, trainer.schedule.initial.means.double())

    flow = trainer.flow.eval()
    expected = ClassStatistics.empty(
        trainer.num_classes, trainer.dim, shift=gathered.shift, device=trainer.device
    )
    with torch.no_grad():
        for x, y in seen:
            expected.update_(flow(x)[0], y)
    n_train = len(trainer.train_set)
    assert int(gathered.count.sum()) == n_train - n_train % 16  # the last partial batch dropped
    for name in ("count", "sum", "sumsq"):
        assert torch.equal(getattr(gathered, name), getattr(expected, name)), name


@pytest.mark.slow
def test_default_takes_a_separate_pass(tmp_path):
    trainer = _trainer(tmp_path)
    updates, passes = _spy(trainer)
    trainer.fit()
    assert passes == [0, 0]  # data-init, then the update after epoch 0
    assert trainer.gathered_stats is None
    assert int(updates[0].count.sum()) == len(trainer.train_set)  # every image, once


def test_clean_statistics_need_the_separate_pass():
    with pytest.raises(ConfigError, match="prior.stats_from_training"):
        experiment_config(
            "smoke",
            {
                "data.augment": True,
                "prior.stats_augment": False,
                "prior.stats_from_training": True,
            },
        )
    # Without augmentation the training pass sees clean images: allowed.
    cfg = experiment_config(
        "smoke",
        {"data.augment": False, "prior.stats_augment": False, "prior.stats_from_training": True},
    )
    assert cfg.prior.stats_from_training
