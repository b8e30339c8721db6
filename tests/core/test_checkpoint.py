"""Checkpoints stay good: nothing diverged is saved, messages say truthfully what is left, a
diverged run resumes with new optimiser knobs, loading never runs code, one run per directory."""

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nfpi.checkpoint import (
    MAX_PARAMETER_ABS,
    find_checkpoint,
    load_checkpoint,
    load_trained,
    lock_run_dir,
    save_checkpoint,
)
from nfpi.cli import main as cli_main
from nfpi.errors import (
    CheckpointError,
    ConfigError,
    DivergenceError,
    NonFiniteLossError,
    RunDirectoryLockedError,
)
from nfpi.presets import experiment_config
from nfpi.training import Trainer, is_wall_clock

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**overrides):
    return experiment_config("smoke", {"eval.plots": False, **overrides})


# ------------------------------------------------------------------------------- divergence
def test_divergence_inside_epoch_0_saves_nothing_and_says_there_is_no_checkpoint(tmp_path):
    """Before: with one step per epoch, ``optim.lr=1e6`` ended epoch 0 with test_bpd=nan and
    weights of magnitude 2e5, which were saved as the only checkpoint (and resumed from by the
    next launch); with several steps per epoch the NonFiniteLossError said "the last good
    checkpoint is in .../checkpoints" although none existed. Now the epoch is refused before the
    save and both messages say that no checkpoint exists yet."""
    one_step = _cfg(
        **{"optim.lr": 1e6, "optim.batch_size": 200, "optim.epochs": 3, "prior.method": "data-init"}
    )
    with pytest.raises(DivergenceError, match="no checkpoint has been saved") as err:
        Trainer(one_step, tmp_path / "one").fit()
    assert "test_bpd=nan" in str(err.value) and f"beyond {MAX_PARAMETER_ABS:g}" in str(err.value)
    assert err.value.checkpoint is None
    assert find_checkpoint(tmp_path / "one") is None
    assert not (tmp_path / "one" / "checkpoints").exists()

    several = _cfg(**{"optim.lr": 1e6, "optim.epochs": 3})  # 4 steps per epoch
    with pytest.raises(NonFiniteLossError, match="no checkpoint has been saved") as err:
        Trainer(several, tmp_path / "several").fit()
    assert "epoch 0" in str(err.value) and "is intact" not in str(err.value)


@pytest.mark.slow  # several training runs
def test_divergence_after_a_good_epoch_keeps_it_and_resume_with_recovers(tmp_path):
    """Before: a later divergence said the last good checkpoint "is intact" without checking,
    and re-running with a lower optim.lr, as the message advised, was refused as a config
    change. Now the good checkpoint stays, byte for byte, the message names it, and
    ``resume_overrides`` (``--resume-with``) resumes it with other optimiser knobs."""
    run = tmp_path / "run"
    cfg = _cfg(**{"optim.epochs": 1})
    Trainer(cfg, run).fit()
    good = find_checkpoint(run)
    good_bytes = good.read_bytes()

    # Resumed with a learning rate that diverges inside epoch 1.
    with pytest.raises(DivergenceError, match="is intact") as err:
        Trainer(cfg, run, resume_overrides={"optim.lr": 1e6, "optim.epochs": 3}).fit()
    assert err.value.checkpoint == str(good) and str(good) in str(err.value)
    assert "after 1 epochs" in str(err.value) and "--resume-with optim.lr" in str(err.value)
    assert find_checkpoint(run) == good and good.read_bytes() == good_bytes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0001", "last_good"]

    # A changed optim.lr without saying so is still refused, pointing at --resume-with.
    with pytest.raises(CheckpointError, match=r"--resume-with optim\.lr=\.\.\."):
        Trainer(cfg.with_overrides({"optim.lr": 1e-3, "optim.epochs": 3}), run).fit()
    # Only the optimiser knobs may change on resume.
    with pytest.raises(ConfigError, match="resume_overrides"):
        Trainer(cfg, run, resume_overrides={"prior.objective.lam": 1.0})
    changed = cfg.with_overrides({"prior.objective.lam": 7.0})
    with pytest.raises(CheckpointError, match="prior.objective.lam"):
        Trainer(changed, run, resume_overrides={"optim.lr": 1e-3, "optim.epochs": 3}).fit()

    # The explicit override resumes the good checkpoint with the new rate (warm-up is over).
    trainer = Trainer(cfg, run, resume_overrides={"optim.lr": 1e-3, "optim.epochs": 3})
    history = trainer.fit()
    assert len(history) == 3 and trainer.resumed_from is not None
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3]
    assert history[-1]["lr"] == 1e-3 and trainer.config.optim.lr == 1e-3
    saved = json.loads((run / "checkpoints" / "epoch-0003" / "config.json").read_text())
    assert saved["optim"]["lr"] == 1e-3  # the config that ran is the config saved


@pytest.mark.slow  # several training runs
def test_resume_with_the_saved_rate_is_bit_identical_to_a_plain_resume(tmp_path):
    """The schedule rebuilt by ``resume_overrides`` continues exactly where the saved one was
    (mid warm-up here): with the checkpoint's own rate the run equals a plain resume."""
    cfg = _cfg(**{"optim.epochs": 1, "optim.warmup_steps": 7})
    Trainer(cfg, tmp_path / "a").fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    plain = Trainer(cfg.with_overrides({"optim.epochs": 2}), tmp_path / "a")
    plain.fit()
    same = Trainer(
        cfg, tmp_path / "b", resume_overrides={"optim.lr": cfg.optim.lr, "optim.epochs": 2}
    )
    same.fit()
    for name, tensor in plain.flow.state_dict().items():
        assert torch.equal(tensor, same.flow.state_dict()[name]), name
    for a, b in zip(plain.history, same.history, strict=True):
        assert {k: v for k, v in a.items() if not is_wall_clock(k)} == {
            k: v for k, v in b.items() if not is_wall_clock(k)
        }


def test_exploding_gd_prior_ends_with_the_divergence_error_not_exit_0(tmp_path):
    """Before: a GD prior whose means ran off (train/test bits/dim 8e11, finite) trained to the
    end, saved every epoch and ``python -m nfpi train`` exited 0. Now the first implausible
    epoch raises DivergenceError out of the command line."""
    args = ["train", "--experiment", "smoke", "--run-dir", str(tmp_path / "gd")]
    for item in (
        "eval.plots=false",
        "optim.epochs=2",
        "prior.method=gd",
        "prior.gd.policy.name=constant",
        "prior.gd.policy.lr0=1e6",
        "prior.gd.policy.lr_min=0",
        "prior.gd.steps_per_solve=5",
        "prior.objective.lam=1e9",
    ):
        args += ["--set", item]
    with pytest.raises(DivergenceError, match=r"test_bpd=[0-9.e+]+ > 1000 bits/dim"):
        cli_main(args)
    assert find_checkpoint(tmp_path / "gd") is None


def test_save_and_load_refuse_diverged_states(tmp_path, checkpoint):
    """``save_checkpoint`` itself refuses a non-finite state (for any caller), and a diverged
    checkpoint written by an earlier release is refused on load instead of being resumed."""
    state = load_checkpoint(checkpoint)
    state.pop("_file")
    name = next(k for k, v in state["flow"].items() if v.is_floating_point())
    state["flow"][name] = state["flow"][name].clone().fill_(float("nan"))
    with pytest.raises(DivergenceError, match=f"non-finite values in flow.{name}"):
        save_checkpoint(tmp_path / "run", state)
    assert not (tmp_path / "run" / "checkpoints").exists()
    poisoned = tmp_path / "old" / "state.pt"
    poisoned.parent.mkdir()
    torch.save(state, poisoned)  # what the old save_checkpoint wrote
    with pytest.raises(CheckpointError, match="diverged state"):
        load_trained(poisoned)


# ---------------------------------------------------------------------------- safe loading
class _RunsCode:
    """Unpickling this runs a shell command (``__reduce__``): what a hostile state.pt holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_code_is_refused_and_runs_nothing(tmp_path, checkpoint):
    """Before the restructure every torch.load used weights_only=False and this payload ran
    inside ``load_trained``; checkpoint.py now loads with weights_only=True, which this test
    pins: CheckpointError naming the refusal, and the command never ran."""
    marker = tmp_path / "pwned"
    state = load_checkpoint(checkpoint)
    state.pop("_file")
    state["extra"] = _RunsCode(marker)
    hostile = tmp_path / "run" / "checkpoints" / "epoch-0001"
    hostile.mkdir(parents=True)
    torch.save(state, hostile / "state.pt")
    (hostile.parent / "last_good").write_text("epoch-0001\n")
    for load in (load_checkpoint, load_trained):
        with pytest.raises(CheckpointError, match="could run code"):
            load(tmp_path / "run")
    with pytest.raises(CheckpointError, match="could run code"):
        Trainer(_cfg(**{"optim.epochs": 1}), tmp_path / "run").fit()  # the resume path
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the refusal is torch's, not a parse error
        torch.load(hostile / "state.pt", weights_only=True)


def test_every_torch_load_in_the_tree_passes_weights_only_true():
    """Before: benchmarks/ray_overhead.py read checkpoints with weights_only=False (and two
    tests relied on the default). Every call now says weights_only=True explicitly."""
    offenders = []
    for folder in ("nfpi", "ray_jobs", "benchmarks", "tests", "search_spaces", "rehearsals"):
        for file in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                ):
                    flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        offenders.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


# ------------------------------------------------------------------------------ run lock
@pytest.mark.slow  # a run in a subprocess
def test_a_second_run_in_a_live_runs_directory_is_refused_naming_the_holder(tmp_path):
    """Before: a second ``Trainer.fit`` on the directory of a live run silently resumed from
    that run's newest checkpoint and both wrote into it. Now it raises RunDirectoryLockedError
    naming the holder's pid; once the holder is gone (even killed), the directory is free."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "nfpi", "train", "--experiment", "smoke", "--run-dir", str(run)]
    cmd += ["--set", "optim.epochs=1000", "--set", "eval.plots=false"]
    first = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while find_checkpoint(run) is None:  # polled: the first run has saved an epoch
            assert first.poll() is None, "the first run ended early"
            assert time.monotonic() < deadline, "the first run saved no checkpoint"
            time.sleep(0.2)
        with pytest.raises(RunDirectoryLockedError, match=f"process {first.pid} on host"):
            Trainer(_cfg(**{"optim.epochs": 1}), run).fit()
        with pytest.raises(RunDirectoryLockedError, match="another run directory"):
            cli_main(["train", "--experiment", "smoke", "--run-dir", str(run)])
    finally:
        first.kill()
        first.wait(timeout=60)
    with lock_run_dir(run):  # released by the OS with the killed process
        pass


# ------------------------------------------------------------------------- CheckpointStore
def _state(epoch: int) -> dict:
    return {"config": {"k": 1}, "model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}


def test_the_store_writes_on_the_main_process_only(tmp_path):
    from nfpi.checkpoint import CheckpointStore

    other = CheckpointStore(tmp_path / "r", main=False, required=("config", "model"))
    assert other.save(_state(1)) is None
    other.write_config({"k": 1})
    other.write_metrics([{"epoch": 0.0}])
    assert not (tmp_path / "r").exists()
    main = CheckpointStore(tmp_path / "r", required=("config", "model"))
    assert main.save(_state(1)).name == "epoch-0001"
    main.write_config({"k": 1})
    main.write_metrics([{"epoch": 0.0, "loss": 1.5}])
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"k": 1}
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == '{"epoch": 0.0, "loss": 1.5}\n'
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
    ]  # fmt: skip  (no .tmp left behind)


def test_the_store_resumes_the_newest_the_named_or_none_after_fresh(tmp_path):
    from nfpi.checkpoint import CheckpointStore

    synced = []
    store = CheckpointStore(tmp_path, required=("config", "model"), sync=lambda: synced.append(1))
    assert store.resume() == (None, None)  # an empty directory: start at epoch 0
    for epoch in (1, 2):
        store.save(_state(epoch))
    store.write_metrics([{"epoch": 0.0}, {"epoch": 1.0}])
    path, state = store.resume()
    assert state["epoch"] == 2 and path.parent.name == "epoch-0002"
    # --resume-from an earlier epoch: made the newest, so a later plain resume takes it too.
    path, state = store.resume(tmp_path / "checkpoints" / "epoch-0001")
    assert state["epoch"] == 1 and store.resume()[1]["epoch"] == 1
    # --fresh: the earlier files moved aside (all ranks wait for it), then epoch 0.
    assert store.resume(fresh=True) == (None, None) and synced == [1]
    assert not (tmp_path / "checkpoints").exists() and store.resume() == (None, None)
    assert len(list(tmp_path.glob("previous-*/checkpoints/epoch-0002"))) == 1
