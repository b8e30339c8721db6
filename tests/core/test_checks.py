"""Cheap checks before a run (nfpi.checks): data paths, batch sizes, and warnings for schedules
sized for a much longer run than the one asked for."""

import math

import pytest
import torch
from ema_pytorch import EMA

from nfpi.checks import ema_window_steps, preflight, schedule_warnings, train_set_size
from nfpi.errors import ConfigError, DatasetNotFoundError
from nfpi.presets import experiment_config


def test_a_short_run_on_the_paper_schedule_is_warned_about(tmp_path):
    """10 epochs of CIFAR-10 at the paper's batch 512: the 1000 warm-up steps outlast the run
    (970 steps), and an EMA updated every 10 steps after step 100 (ema-pytorch's defaults)
    averages more steps than it ran for. The release's EMA (every step from step 0) does not."""
    root = {"data.root": str(tmp_path), "optim.epochs": 10}
    released = preflight(experiment_config("cifar10", root))
    assert len(released) == 1 and "optim.warmup_steps=1000" in released[0]
    config = experiment_config(
        "cifar10", {**root, "ema.update_every": 10, "ema.update_after_step": 100}
    )
    warnings = preflight(config)
    assert len(warnings) == 2
    assert "optim.warmup_steps=1000" in warnings[0] and "970" in warnings[0]
    assert "ema.beta=0.9999" in warnings[1] and "-quick" in warnings[1]


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("cifar10", {}),  # the paper's 500 epochs
        ("cifar10-quick", {}),
        ("cifar100-quick", {}),
        ("digits", {}),
        ("smoke", {}),
    ],
)
def test_the_experiments_schedules_fit_their_runs(name, overrides, tmp_path):
    config = experiment_config(name, {"data.root": str(tmp_path), **overrides})
    if config.data.name == "digits":
        config = experiment_config(name, overrides)
    assert preflight(config) == []


def test_ema_window_matches_ema_pytorch():
    """The window the warning computes is ema-pytorch's decay after the same number of steps."""
    config = experiment_config("cifar10", {"data.root": "/x"})
    steps = 5000
    ema = EMA(torch.nn.Linear(2, 2), beta=config.ema.beta, power=config.ema.power,
              update_every=config.ema.update_every, update_after_step=config.ema.update_after_step)  # fmt: skip
    ema.step.fill_(steps)
    decay = ema.get_current_decay()
    # ema-pytorch computes the decay in float32.
    want = config.ema.update_every / (1 - decay)
    assert ema_window_steps(config, steps) == pytest.approx(want, rel=1e-4)
    assert math.isinf(ema_window_steps(config, config.ema.update_after_step))


def test_train_set_sizes_without_reading_the_data():
    assert train_set_size(experiment_config("digits")) == 1437
    assert train_set_size(experiment_config("smoke")) == 200
    assert train_set_size(experiment_config("cifar100", {"data.root": "/x"})) == 50000
    assert train_set_size(experiment_config("imagenet", {"data.root": "/x"})) is None
    assert schedule_warnings(experiment_config("imagenet", {"data.root": "/x"}), None) == []


def test_preflight_errors_name_the_field_or_path(tmp_path):
    with pytest.raises(ConfigError, match="optim.batch_size.*number of workers \\(3\\)"):
        preflight(experiment_config("digits"), num_workers=3)
    with pytest.raises(ConfigError, match="training set size \\(1437\\)"):
        preflight(experiment_config("digits", {"optim.batch_size": 2000}))
    missing = tmp_path / "nope"
    with pytest.raises(DatasetNotFoundError, match=str(missing)):
        preflight(experiment_config("cifar10", {"data.root": str(missing)}))
    # A download creates the folder: no error.
    preflight(experiment_config("cifar10", {"data.root": str(missing), "data.download": True}))
