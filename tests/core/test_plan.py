"""The trial plan: one builder per trial, what ``--plan`` shows, and that a trial runs exactly the
config its plan row was made from."""

import json
import math
from types import SimpleNamespace

import pytest

from nfpi.config import ExperimentConfig
from nfpi.plan import PLAN_FIELDS, flow_cost, plan_of
from nfpi.presets import experiment_config
from search_spaces import load_space

ROOT = {"data.root": "/data/placeholder"}


def _plans(space: str, overrides: dict) -> list:
    s, _ = load_space(space).with_options(overrides)
    return [t.plan() for t in s.trials(overrides, n_random=1)]


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_table1_gd_rows_run_their_course(dataset):
    """Issue 19: five policies at five different mid-run learning rates (a >= 2x span), each
    decaying one ending near its lr_min at the last GD step the run takes."""
    plans = _plans("table1", {**ROOT, "dataset": dataset})
    gd = [p for p in plans if p.method == "gd"]
    assert len(gd) == 5 and len({p.policy for p in gd}) == 5
    mids = [p.lr_mid for p in gd]
    assert len(set(mids)) == 5 and max(mids) / min(mids) >= 2
    for p in gd:
        assert p.gd_steps == 500 * 100 and p.solve_epochs == list(range(500))
        assert p.lr_start == 0.1 and p.lr_end <= 2 * p.lr_min
    fpi = [p for p in plans if p.method == "fpi"]
    assert [p.solve_epochs for p in fpi] == [[0]]
    assert all(p.gd_steps is None and p.lr_mid is None for p in plans if p.method != "gd")


def test_gd_horizon_follows_the_run_not_a_constant():
    """The same policy over a shorter run still ends at lr_min on that run's last step."""
    space, _ = load_space("table1").with_options(ROOT)
    gd = space.trial(space.samples()[1], {**ROOT, "optim.epochs": 7})
    plan = gd.plan()
    assert gd.config.prior.gd.policy.total_steps == plan.gd_steps == 700
    assert plan.lr_end == plan.lr_min


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
@pytest.mark.parametrize("variant", ["as_released", "paper"])
def test_table3_solves_once_after_epoch_0_with_the_releases_ema(dataset, variant):
    plans = _plans("table3", {**ROOT, "dataset": dataset, "variant": variant})
    assert [p.solve_epochs for p in plans] == [[], [0], [0], [0]]
    assert {(p.ema_update_every, p.ema_update_after_step) for p in plans} == {(1, 0)}
    k = 10 if dataset == "cifar10" else 100
    for p in plans[1:]:
        assert p.lam_released == pytest.approx(p.lam * k * (k - 1))


def test_released_subsets_change_the_training_images():
    full = _plans("table3", ROOT)
    sub = _plans("table3", {**ROOT, "train_set": "released"})
    assert [p.train_images for p in full] == [50_000] * 4
    # data-init, mean and var: 500 per class; mean_var: all images (method notes section 10)
    assert [p.train_images for p in sub] == [5_000, 5_000, 5_000, 50_000]
    assert sub[0].gpu_hours < full[0].gpu_hours


def test_plan_records_are_flat_and_complete():
    plan = plan_of(experiment_config("digits", {"prior.method": "gd"}), "gd")
    rec = plan.record()
    assert tuple(rec) == PLAN_FIELDS
    json.dumps(rec)  # flat and serialisable
    # digits: two solves (epochs 0 and 1) of 500 GD steps under the release's knots
    assert (rec["solve_epochs"], rec["gd_steps"], rec["policy"]) == (
        [0, 1],
        1000,
        "geometric_knots",
    )
    assert rec["train_images"] == 1437 and rec["gpu_hours"] > 0


def test_flow_cost_counts_the_flow_of_the_config():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nfpi.flows import build_flow

    config = experiment_config("digits")
    flops, params = flow_cost(config)
    flow = build_flow("tiny", in_shape=(1, 8, 8), **config.flow.overrides())
    assert params == sum(p.numel() for p in flow.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        flow(torch.zeros(2, 1, 8, 8))
    assert flops == counter.get_total_flops() / 2 > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mef-cifar", "mef-cifar-attn"])
def test_the_stored_paper_flow_costs_are_what_counting_gives(preset):
    import json as _json

    from nfpi import plan

    key = _json.dumps([preset, [3, 32, 32], {}])
    assert plan._KNOWN_COST[key] == plan._count.__wrapped__(key)


@pytest.mark.parametrize(
    ("space", "overrides"),
    [
        ("table1", {**ROOT, "dataset": "cifar100", "gd_weights": "as_released"}),
        ("table3", {**ROOT, "variant": "paper", "train_set": "released"}),
        ("digits", {}),
    ],
)
def test_a_trial_runs_the_config_its_plan_row_shows(monkeypatch, space, overrides):
    """run_trial hands Ray Train exactly the config --plan made its row from."""
    from ray_jobs import sweep

    ran = []

    def fake_run_experiment(config, *args, **kwargs):
        ran.append(config)
        return SimpleNamespace(metrics={"nf_acc": 0.5}, checkpoint=None)

    monkeypatch.setattr(sweep, "run_experiment", fake_run_experiment)
    monkeypatch.setattr(sweep, "TuneReportCallback", lambda: None)
    ids = iter(f"abcde_{i:05d}" for i in range(100))
    context = SimpleNamespace(get_trial_id=lambda: next(ids))
    monkeypatch.setattr(sweep.tune, "get_context", lambda: context)
    settings = SimpleNamespace(storage=_Storage())
    spec = sweep.SweepSpec(space, space, overrides, settings)  # type: ignore[arg-type]
    s, _ = load_space(space).with_options(overrides)
    rows = [t.plan() for t in s.trials(overrides, n_random=1)]
    for sample, row in zip(s.samples(n_random=1), rows, strict=True):
        sweep.run_trial(sample, spec)
        config: ExperimentConfig = ran[-1]
        assert config == config.resolved()  # nothing left to derive at run time
        assert plan_of(config, row.trial) == row
        assert config == s.trial(sample, overrides).config


class _Storage:
    def __truediv__(self, other):
        return self


def test_plan_command_writes_records_without_ray(tmp_path, capsys):
    import sys

    from ray_jobs.sweep import main

    out = tmp_path / "plan.json"
    assert main(["--space", "table1", "--set", "dataset=cifar10", "--plan", "--out", str(out)]) == 0
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
    records = json.loads(out.read_text())
    assert len(records) == 7 and all(tuple(r) == PLAN_FIELDS for r in records)
    text = capsys.readouterr().out
    assert "7 flow run(s), " in text and "H100-hours in all" in text
    assert "data.root is not set" in text
    assert "data.root is not set" in text
    assert all(math.isfinite(r["gpu_hours"]) for r in records)


def test_downstream_plan_counts_a_shared_flow_once(capsys):
    from ray_jobs.sweep import print_plan

    space, rest = load_space("table5_swin").with_options({**ROOT})
    assert print_plan(space, rest, None, None, 15.0) == 0
    text = capsys.readouterr().out
    assert "1 flow run(s) (4 trials share them)" in text
    assert "classifiers' cost" in text


def test_plan_needs_no_required_paths(capsys):
    from ray_jobs.sweep import print_plan

    space, rest = load_space("table6_eva02").with_options({})
    assert print_plan(space, rest, None, None, 15.0) == 0
    text = capsys.readouterr().out
    assert "cnn.pretrained_path is not set" in text and "data.root is not set" in text
