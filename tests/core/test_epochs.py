"""The epoch loop every model shares (nfpi.epochs): checkpoint and metrics after every epoch, an
interrupted run resumed bit-identically, a diverged epoch refused before anything is saved,
callbacks after the save. A toy recipe (a linear model on seeded noise) stands for a model."""

import json
import math

import pytest
import torch

from nfpi.checkpoint import CheckpointStore, find_checkpoint, load_checkpoint
from nfpi.epochs import EpochResult, fit_epochs, refuse_divergence
from nfpi.errors import DivergenceError

KEYS = ("config", "model")


class Toy:
    """A recipe: SGD on a linear regression whose epoch data is a function of (seed, epoch)."""

    def __init__(self, lr: float = 0.1, blow_up_at: int | None = None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)
        self.lr, self.blow_up_at = lr, blow_up_at
        self.epoch, self.history = 0, []

    def run_epoch(self, epoch: int) -> EpochResult:
        gen = torch.Generator().manual_seed(1000 + epoch)
        x = torch.randn(64, 4, generator=gen)
        y = x.sum(dim=1, keepdim=True)
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        if epoch == self.blow_up_at:
            with torch.no_grad():
                self.model.weight.fill_(math.inf)
        return EpochResult(epoch, {"epoch": float(epoch), "train_loss": float(loss.detach())})

    def guarded_state(self):
        return {"model": self.model.state_dict()}

    def state_dict(self):
        return {
            "config": {"lr": self.lr},
            "epoch": self.epoch,
            "history": self.history,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history = state["epoch"], list(state["history"])


def _resume(store: CheckpointStore) -> Toy:
    toy = Toy()
    _, state = store.resume()
    if state is not None:
        toy.load_state_dict(state)
    return toy


def test_every_epoch_is_checkpointed_and_logged_and_the_last_few_kept(tmp_path):
    store = CheckpointStore(tmp_path, required=KEYS)
    seen = []

    def callback(result):  # called after the epoch's checkpoint is written
        seen.append(result.epoch)
        assert load_checkpoint(result.checkpoint_dir, required=KEYS)["epoch"] == result.epoch + 1

    history = fit_epochs(Toy(), 5, store=store, callbacks=[callback])
    assert seen == [0, 1, 2, 3, 4] and len(history) == 5
    assert all(m["epoch_seconds"] >= 0 for m in history)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*"))
    assert kept == ["epoch-0003", "epoch-0004", "epoch-0005"]


def test_a_run_killed_after_epoch_k_resumes_at_k_plus_1_bit_identically(tmp_path):
    whole = Toy()
    fit_epochs(whole, 4, store=CheckpointStore(tmp_path / "whole", required=KEYS))

    class Killed(Exception):
        pass

    def kill_after_1(result):
        if result.epoch == 1:
            raise Killed

    store = CheckpointStore(tmp_path / "r", required=KEYS)
    with pytest.raises(Killed):
        fit_epochs(Toy(), 4, store=store, callbacks=[kill_after_1])
    resumed = _resume(store)
    assert resumed.epoch == 2
    seen = []
    fit_epochs(resumed, 4, store=store, callbacks=[lambda r: seen.append(r.epoch)])
    assert seen == [2, 3]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda h: [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h]
    assert drop(whole.history) == drop(resumed.history)


def test_a_diverged_epoch_is_refused_and_nothing_of_it_saved(tmp_path):
    store = CheckpointStore(tmp_path, required=KEYS)
    toy = Toy(blow_up_at=2)
    with pytest.raises(DivergenceError) as err:
        fit_epochs(toy, 4, store=store)
    assert "epoch 2 diverged" in str(err.value) and "model.weight" in str(err.value)
    assert find_checkpoint(tmp_path).parent.name == "epoch-0002"  # after epochs 0 and 1
    assert toy.epoch == 2 and len(toy.history) == 2
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_without_a_store_the_guard_still_runs_and_says_nothing_was_kept():
    with pytest.raises(DivergenceError, match="keeps no checkpoints"):
        fit_epochs(Toy(blow_up_at=0), 2)
    with pytest.raises(DivergenceError, match="metric train_loss=nan"):
        refuse_divergence(3, {}, {"train_loss": math.nan}, None)
    refuse_divergence(3, {"model": {"w": torch.ones(2)}}, {"train_loss": 1.0}, None)  # fine


def test_a_store_refuses_a_checkpoint_of_another_kind(tmp_path):
    fit_epochs(Toy(), 1, store=CheckpointStore(tmp_path, required=KEYS))
    flow_store = CheckpointStore(tmp_path)  # a flow's: needs config and flow entries
    with pytest.raises(Exception, match="no checkpoint that loads") as err:
        flow_store.resume()
    assert "epoch-0001 does not load" in str(err.value)
