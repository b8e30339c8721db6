"""The single-process experiment loop: schedule, metrics, pictures, checkpoints, exact resume."""

import json
import math

import pytest
import torch

from nfpi.checkpoint import find_checkpoint, load_checkpoint, load_trained
from nfpi.cli import main as cli_main
from nfpi.config import ExperimentConfig, PriorConfig
from nfpi.errors import CheckpointError, ConfigError, NonFiniteLossError
from nfpi.presets import experiment_config
from nfpi.training import Trainer, evaluate


def _cfg(tmp_path, **overrides):
    return experiment_config("smoke", {"eval.plots": False, **overrides})


def _run(tmp_path):
    return tmp_path / "run"


class _Stop(Exception):
    pass


def _stop_after(epoch):
    def callback(trainer, result):
        if result.epoch == epoch:
            raise _Stop

    return callback


def test_sample_grids_show_at_most_100_evenly_spaced_classes():
    from nfpi.training.pictures import MAX_GRID_CLASSES, grid_classes

    assert torch.equal(grid_classes(10), torch.arange(10))
    assert torch.equal(grid_classes(MAX_GRID_CLASSES), torch.arange(MAX_GRID_CLASSES))
    rows = grid_classes(1000)
    assert rows.dtype == torch.int64 and len(rows) == MAX_GRID_CLASSES
    assert rows[0] == 0 and rows[-1] == 999 and bool((rows.diff() > 0).all())
    assert set(rows.diff().tolist()) == {10, 11}  # evenly spaced: 999 / 99 = 10.09


@pytest.mark.slow  # a run with pictures
def test_smoke_run_writes_metrics_checkpoint_and_pictures(tmp_path):
    cfg = _cfg(tmp_path, **{"eval.plots": True, "optim.epochs": 2})
    history = Trainer(cfg, _run(tmp_path)).fit()
    assert len(history) == 2
    last = history[-1]
    for key in ("train_bpd", "test_bpd", "nf_acc", "lr", "kl_min", "kl_mean", "prior_version"):
        assert math.isfinite(last[key]), key
    assert 0.0 <= last["nf_acc"] <= 1.0 and last["test_bpd"] > 0
    first = history[0]
    assert first["prior_version"] == 2 and first["fpi_iterations"] >= 1  # solved at end of epoch 0
    out = tmp_path / "run"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0.0, 1.0]
    assert find_checkpoint(out) == out / "checkpoints" / "epoch-0002" / "state.pt"
    pngs = {p.name for p in (out / "plots").glob("*.png")}
    assert {"samples_T0.7.png", "tsne.png", "kl_heatmap_v2.png", "fpi_residual_v2.png"} <= pngs
    assert ExperimentConfig.from_dict(json.loads((out / "config.json").read_text())) == cfg


@pytest.mark.slow  # three runs
def test_every_prior_method_leaves_the_same_pictures(tmp_path):
    """Samples, t-SNE and the data-init-vs-final KL heatmap under one name for every method;
    only the FPI adds its per-solve heatmap and residual curve (the GD run used to leave one
    heatmap per epoch under its prior version's name, the data-init run one under v1)."""
    common = {}
    for method in ("data-init", "gd", "fpi"):
        cfg = _cfg(tmp_path, **{"eval.plots": True, "optim.epochs": 2, "prior.method": method,
                                "prior.gd.steps_per_solve": 2})  # fmt: skip
        Trainer(cfg, tmp_path / method).fit()
        pngs = {p.name for p in (tmp_path / method / "plots").glob("*.png")}
        per_solve = {p for p in pngs if p.startswith(("kl_heatmap_v", "fpi_residual_v"))}
        assert bool(per_solve) == (method == "fpi"), (method, pngs)
        common[method] = pngs - per_solve
    assert common["data-init"] == common["gd"] == common["fpi"]
    assert {"kl_heatmap_final.png", "samples_T0.7.png", "tsne.png"} <= common["fpi"]


def test_residual_plot_title_counts_the_points_of_its_curve():
    from nfpi.prior import FPIReport
    from nfpi.training.pictures import residual_title

    report = FPIReport(iterations=75, stop_reason="converged", residuals=[1.0] * 65)
    assert residual_title(report) == "FPI residual (converged: 65 iterates, 75 map evaluations)"
    report.iterations = 65
    assert residual_title(report) == "FPI residual (converged: 65 iterates)"


@pytest.mark.slow  # several training runs
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    cfg = _cfg(tmp_path, **{"optim.epochs": 3})
    straight = Trainer(cfg, tmp_path / "a").fit()

    with pytest.raises(_Stop):
        Trainer(cfg, tmp_path / "b", callbacks=[_stop_after(1)]).fit()  # dies after epoch 1
    resumed_trainer = Trainer(cfg, tmp_path / "b")
    resumed = resumed_trainer.fit()
    assert len(resumed) == 3
    for a, b in zip(straight, resumed, strict=True):
        for key in ("train_bpd", "test_bpd", "nf_acc", "kl_min", "prior_version"):
            assert a[key] == b[key], (key, a[key], b[key])
    state_a = load_checkpoint(tmp_path / "a")
    for name, tensor in resumed_trainer.flow.state_dict().items():
        assert torch.equal(tensor, state_a["flow"][name]), name
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0.0, 1.0, 2.0]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, **{"optim.epochs": 3})

    def poison(trainer, result):
        if result.epoch == 0:
            with torch.no_grad():
                next(trainer.flow.parameters()).fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
        Trainer(cfg, _run(tmp_path), callbacks=[poison]).fit()
    state = load_checkpoint(_run(tmp_path))
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["flow"].values() if t.is_floating_point())


def test_resume_refuses_a_different_config(tmp_path):
    Trainer(_cfg(tmp_path, **{"optim.epochs": 1}), _run(tmp_path)).fit()
    changed = _cfg(tmp_path, **{"optim.epochs": 2, "prior.objective.lam": 7.0})
    with pytest.raises(CheckpointError, match="prior.objective.lam"):
        Trainer(changed, _run(tmp_path)).fit()


@pytest.mark.slow  # a short run per method
@pytest.mark.parametrize(
    ("method", "versions"),
    [("data-init", [1, 1, 1]), ("gd", [2, 3, 4]), ("fpi", [1, 2, 2])],
)
def test_prior_schedule_per_method(tmp_path, method, versions):
    cfg = _cfg(
        tmp_path,
        **{
            "optim.epochs": 3,
            "prior.method": method,
            "prior.solve_epoch": 1,
            "prior.gd.steps_per_solve": 5,
        },
    )
    trainer = Trainer(cfg, _run(tmp_path))
    history = trainer.fit()
    assert [int(h["prior_version"]) for h in history] == versions
    assert trainer.ema.active  # fpi: started after the solve; others: from the start


def test_ema_starts_after_first_fpi_solve(tmp_path):
    cfg = _cfg(tmp_path, **{"optim.epochs": 1, "prior.solve_epoch": 3})
    trainer = Trainer(cfg, _run(tmp_path))
    trainer.fit()
    assert not trainer.ema.active and trainer.eval_flow() is trainer.flow


@pytest.mark.slow  # two short runs
def test_ema_disabled_evaluates_the_online_flow_the_prior_was_solved_from(tmp_path):
    on = Trainer(_cfg(tmp_path, **{"optim.epochs": 1}), tmp_path / "on")
    on.fit()
    assert on.ema.active and on.eval_flow() is not on.flow
    off = Trainer(_cfg(tmp_path, **{"optim.epochs": 1, "ema.enabled": False}), tmp_path / "off")
    off.fit()
    assert not off.ema.active and off.eval_flow() is off.flow
    assert off.state_dict()["ema"] is None


def test_in_memory_is_for_image_folders_only(tmp_path):
    with pytest.raises(ConfigError, match=r"data.in_memory.*imagefolder"):
        _cfg(tmp_path, **{"data.in_memory": True})


def test_schedule_rules():
    p = PriorConfig(method="fpi", solve_epoch=2, resolve_every=3)
    assert [e for e in range(12) if p.solves_after(e)] == [2, 5, 8, 11]
    assert [e for e in range(5) if PriorConfig(method="fpi").solves_after(e)] == [0]
    assert all(PriorConfig(method="gd").solves_after(e) for e in range(4))
    assert not any(PriorConfig(method="data-init").solves_after(e) for e in range(4))
    release = PriorConfig(method="fpi", solve_epoch=0, resolve_every=1, solve_until=1)
    assert [e for e in range(6) if release.solves_after(e)] == [0, 1]


def test_bad_values_are_rejected_with_the_field_name(tmp_path):
    with pytest.raises(ConfigError, match="optim.batch_size"):
        Trainer(_cfg(tmp_path, **{"optim.batch_size": 10_000}), _run(tmp_path))
    with pytest.raises(ConfigError, match="data.root"):
        _cfg(tmp_path, **{"data.name": "cifar10"})
    with pytest.raises(ConfigError, match="prior.objective.alpha"):
        _cfg(tmp_path, **{"prior.objective.alpha": 0.0})
    with pytest.raises(ConfigError, match="prior.fpi.tol"):
        _cfg(tmp_path, **{"prior.fpi.tol": -1})
    with pytest.raises(ConfigError, match=r"prior.fpi.form.*one of \('paper', 'reference'\)"):
        _cfg(tmp_path, **{"prior.fpi.form": "papr"})
    with pytest.raises(ConfigError, match="unknown"):
        _cfg(tmp_path, **{"optim.learning_rate": 1.0})


def test_cli_train_and_config(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["config", "--experiment", "smoke", "--set", "prior.objective.lam=42"]) == 0
    assert json.loads(capsys.readouterr().out)["prior"]["objective"]["lam"] == 42.0
    args = [
        "train",
        "--experiment",
        "smoke",
        "--run-dir",
        str(out),
        "--set",
        "optim.epochs=1",
        "--set",
        "eval.plots=false",
    ]
    assert cli_main(args) == 0
    assert find_checkpoint(out) is not None
    assert "nf_acc" in capsys.readouterr().out


@pytest.mark.slow  # a run, then its checkpoint read back
def test_load_trained_gives_the_ema_flow_and_prior_that_were_evaluated(tmp_path):
    trainer = Trainer(_cfg(tmp_path, **{"optim.epochs": 2}), _run(tmp_path))
    history = trainer.fit()
    model = load_trained(_run(tmp_path))
    assert model.epoch == 2 and model.info == trainer.info and model.config == trainer.config
    assert torch.equal(model.prior.means, trainer.prior.means)
    again = evaluate(
        model.flow,
        model.prior,
        trainer.test_loader,
        torch.device("cpu"),
        trainer.config.seed,
        model.info.levels,
    )
    assert again["nf_acc"] == history[-1]["nf_acc"] and again["test_bpd"] == history[-1]["test_bpd"]
