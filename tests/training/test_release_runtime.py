"""The release's run-time behaviour that the as_released presets reproduce (method notes section
10): where a solve starts, when the EMA starts, how many images the ActNorm init sees."""

import pytest
import torch

from nfpi.presets import experiment_config, released_overrides
from nfpi.prior import ClassStatistics, FPIConfig, Objective, PriorService


def _stats(shift: float, seed: int) -> ClassStatistics:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(300, 4, generator=gen, dtype=torch.float64) + shift
    y = torch.arange(300) % 3
    z = z + 2.0 * y[:, None]
    return ClassStatistics.from_batch(z, y, 3)


def _service(start: str) -> PriorService:
    fpi = FPIConfig.reference(update="variance", start=start, tol=1e-3)
    return PriorService("fpi", 3, 4, objective=Objective(lam=10.0), fpi=fpi)


def test_a_variances_only_solve_from_the_current_gaussians_keeps_the_data_init_means():
    """The release: a ``var`` solve iterates from the untrained flow's gaussians, so the means
    stay the untrained flow's class means, not the class means of the statistics it solves."""
    untrained, trained = _stats(0.0, 0), _stats(5.0, 1)
    current = _service("current")
    init = current.initialize(untrained).build()
    solved = current.update(trained).build()
    # The reference form keeps its state in float32 (the release): the means are the data-init
    # means rounded to float32, and stay exactly that.
    assert torch.equal(solved.means, init.means.float().double())
    assert not torch.equal(solved.var, init.var)  # the variances did move
    # Starting from the statistics instead (the paper variant's reading), the means follow them.
    fresh = _service("statistics")
    fresh.initialize(untrained)
    assert torch.equal(fresh.update(trained).build().means, trained.mean().float().double())


def _trainer(tmp_path, **overrides):
    from nfpi.training import Trainer

    config = experiment_config(
        "smoke",
        {
            **released_overrides("cifar10/var", "as_released"),
            "eval.plots": False,
            "optim.epochs": 2,
            **overrides,
        },
    )
    return Trainer(config, tmp_path / "run")


@pytest.mark.slow
def test_as_released_var_run_keeps_the_untrained_means_through_training(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit()
    initial = trainer.schedule.initial.means
    assert torch.equal(trainer.prior.means, initial.float().to(initial.dtype))
    assert trainer.schedule.version == 2  # data-init, then one solve (after epoch 0)


@pytest.mark.slow
def test_ema_starts_at_its_start_epoch_for_every_method(tmp_path):
    """``ema.start_epoch=1`` (the release): no EMA during epoch 0, whatever the method; its
    first update copies the online weights at the start of epoch 1."""
    for method in ("data-init", "fpi"):
        trainer = _trainer(
            tmp_path / method,
            **{"prior.method": method, "ema.start_epoch": 1, "ema.update_every": 1,
               "ema.update_after_step": 0, "optim.epochs": 1},
        )  # fmt: skip
        trainer.fit()
        assert not trainer.ema.active, method  # one epoch: the EMA never started
        trainer = _trainer(
            tmp_path / f"{method}-2",
            **{"prior.method": method, "ema.start_epoch": 1, "ema.update_every": 1,
               "ema.update_after_step": 0},
        )  # fmt: skip
        trainer.fit()
        assert trainer.ema.active, method


@pytest.mark.slow
def test_actnorm_init_sees_init_batch_images(tmp_path, monkeypatch):
    seen = []
    trainer = _trainer(tmp_path, **{"optim.init_batch": 7})
    original = trainer.flow.data_init
    monkeypatch.setattr(trainer.flow, "data_init", lambda x: (seen.append(len(x)), original(x)))
    trainer._start()
    assert seen == [7]
