"""A resume never starts from scratch over existing history (issue 22, high): the newest
checkpoint that verifies is taken, or the run refuses in one line naming what is missing and
``--fresh``; rotation keeps the newest *written* checkpoints; ``--resume-from EPOCH|PATH``."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from nfpi.checkpoint import (
    checkpoint_epoch,
    find_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from nfpi.cli import main as cli_main
from nfpi.entry import run_cli
from nfpi.errors import CheckpointError
from nfpi.presets import experiment_config
from nfpi.training import Trainer, is_wall_clock

SMOKE = {"eval.plots": False}


def _cfg(epochs):
    return experiment_config("smoke", {**SMOKE, "optim.epochs": epochs})


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A smoke run of 2 epochs (checkpoints epoch-0001 and epoch-0002), trained once; every
    test works on its own copy."""
    run = tmp_path_factory.mktemp("history") / "run"
    Trainer(_cfg(2), run).fit()
    return run


@pytest.fixture
def run(two_epochs, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(two_epochs, copy)
    return copy


def _history(run_dir):
    return [
        {k: v for k, v in json.loads(line).items() if not is_wall_clock(k)}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def _snapshot(run_dir):
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".nfpi-run.lock"
    }


# ------------------------------------------------------- damaged history: recover or refuse
@pytest.mark.parametrize("damage", ["pointer deleted", "pointer dangling", "state symlink broken"])
def test_damaged_pointer_resumes_from_the_newest_checkpoint_that_verifies(run, damage, caplog):
    """Before: with ``last_good`` missing or naming a missing checkpoint, a resume started again
    at epoch 0 (exit 0) and overwrote the earlier epochs. Now it continues from the newest
    checkpoint that loads, says so, and keeps the earlier history."""
    root = run / "checkpoints"
    before = _history(run)
    if damage == "pointer deleted":
        (root / "last_good").unlink()
        expect = "epoch-0002"
    elif damage == "pointer dangling":
        shutil.rmtree(root / "epoch-0002")  # last_good still names it
        expect = "epoch-0001"
    else:
        state = root / "epoch-0002" / "state.pt"
        state.unlink()
        state.symlink_to(root / "nowhere.pt")
        expect = "epoch-0001"
    trainer = Trainer(_cfg(3), run)
    history = trainer.fit()
    assert trainer.resumed_from is not None and trainer.resumed_from.parent.name == expect
    assert "newest checkpoint" in caplog.text
    assert len(history) == 3
    kept = 2 if expect == "epoch-0002" else 1
    assert _history(run)[:kept] == before[:kept]  # the epochs it had were not trained again


@pytest.mark.parametrize("damage", ["checkpoints deleted", "all corrupt"])
def test_history_without_a_usable_checkpoint_refuses_in_one_line_and_changes_nothing(
    run, damage, capsys
):
    """Before: a run directory whose checkpoints were all gone or corrupt but whose
    metrics.jsonl held 2 epochs was trained again from epoch 0, exit 0. Now the command stops
    with one line naming what is missing and the two ways on; no file is touched."""
    root = run / "checkpoints"
    if damage == "checkpoints deleted":
        for folder in root.glob("epoch-*"):
            shutil.rmtree(folder)
    else:
        for state in root.glob("epoch-*/state.pt"):
            state.write_bytes(state.read_bytes()[:100])
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match="--fresh") as err:
        resume_checkpoint(run)
    assert "metrics.jsonl holds 2 epoch(s)" in str(err.value)
    assert "--resume-from" in str(err.value)
    argv = ["train", "--experiment", "smoke", "--set", "eval.plots=false", "--run-dir", str(run)]
    assert run_cli(cli_main, argv, prog="nfpi") == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if "error" in x.lower()]
    assert len(errors) == 1 and "--fresh" in errors[0], errors
    assert _snapshot(run) == before


def test_a_first_save_cut_short_is_not_history(tmp_path):
    """A run killed inside its first ``torch.save`` left only ``epoch-0001/state.pt.tmp``:
    nothing was kept, so the next launch simply starts (no refusal, no --fresh needed)."""
    folder = tmp_path / "checkpoints" / "epoch-0001"
    folder.mkdir(parents=True)
    (folder / "state.pt.tmp").write_bytes(b"partial")
    (tmp_path / "metrics.jsonl").write_text("")
    assert resume_checkpoint(tmp_path) == (None, None)


def test_fresh_moves_the_earlier_run_aside_and_starts_at_epoch_0(run):
    """``--fresh`` starts again on purpose; the earlier files are kept, not deleted."""
    before = _snapshot(run)
    for folder in (run / "checkpoints").glob("epoch-*"):
        shutil.rmtree(folder)  # nothing usable left, as in the refused case above
    trainer = Trainer(_cfg(1), run, fresh=True)
    trainer.fit()
    assert trainer.resumed_from is None and checkpoint_epoch(run) == 1
    (previous,) = run.glob("previous-*")
    moved = _snapshot(previous)
    assert moved["metrics.jsonl"] == before["metrics.jsonl"]
    assert moved["config.json"] == before["config.json"]


# -------------------------------------------------------------------------------- rotation
def _state(epoch):
    return {"config": {}, "epoch": epoch, "flow": {"w": torch.full((2,), float(epoch))}}


def test_rotation_keeps_the_newest_written_not_the_highest_epochs(tmp_path):
    """Before: rotation kept the highest epoch numbers, so after a resume from an earlier epoch
    (epochs 3-5 saved, then epoch 2 written again) it deleted the checkpoint it had just
    written, and ``last_good`` named a missing folder. Now the newest written ones stay."""
    for epoch in (1, 2, 3, 4, 5):
        save_checkpoint(tmp_path, _state(epoch))
    save_checkpoint(tmp_path, _state(2))  # the first epoch after a resume from epoch 1
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "epoch-0002" / "state.pt"
    assert load_checkpoint(tmp_path)["epoch"] == 2
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*"))
    assert names == ["epoch-0002", "epoch-0004", "epoch-0005"]
    save_checkpoint(tmp_path, _state(3))
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*"))
    assert names == ["epoch-0002", "epoch-0003", "epoch-0005"]


# ---------------------------------------------------------------------------- --resume-from
def test_resume_from_an_earlier_epoch_trains_again_bit_identical(run, tmp_path):
    """``--resume-from 1`` of a 2-epoch run trains epoch 2 again, exactly as the first time,
    and that checkpoint becomes the run's newest; a missing epoch is one line listing those
    there are."""
    first = load_checkpoint(run)
    argv = ["train", "--experiment", "smoke", "--set", "eval.plots=false", "--run-dir", str(run)]
    assert cli_main([*argv, "--set", "optim.epochs=2", "--resume-from", "1"]) == 0
    again = load_checkpoint(run)
    assert Path(again["_file"]).parent.name == "epoch-0002"
    for key, value in first["flow"].items():
        assert torch.equal(value, again["flow"][key]), key
    assert [{k: v for k, v in m.items() if not is_wall_clock(k)} for m in again["history"]] == [
        {k: v for k, v in m.items() if not is_wall_clock(k)} for m in first["history"]
    ]
    with pytest.raises(CheckpointError, match=r"no checkpoint after 7 epochs \(it has: 1, 2\)"):
        cli_main([*argv, "--resume-from", "7"])


def test_resume_from_a_path_outside_the_run_directory_is_copied_in(run, tmp_path):
    """A checkpoint from elsewhere is copied beside (never over) the run's own folders and
    becomes its newest: a later plain resume continues from what it trained."""
    elsewhere = tmp_path / "kept"
    shutil.copytree(run / "checkpoints" / "epoch-0001", elsewhere)
    trainer = Trainer(_cfg(2), run, resume_from=elsewhere)
    trainer.fit()
    assert (run / "checkpoints" / "imported-epoch-0001" / "state.pt").is_file()
    assert trainer.resumed_from.parent.name == "imported-epoch-0001"
    assert find_checkpoint(run).parent.name == "epoch-0002"
