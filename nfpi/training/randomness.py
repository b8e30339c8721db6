"""Randomness of a run as a function of (seed, epoch, phase), so that a resumed run is
bit-identical to an uninterrupted one without relying on saved RNG state alone."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from nfpi.data import epoch_seed

__all__ = ["PHASE_STATS", "PHASE_TRAIN", "get_rng_state", "seed_phase", "set_rng_state"]

PHASE_TRAIN, PHASE_STATS = 0, 1


def seed_phase(seed: int, epoch: int, phase: int) -> torch.Generator:
    """Seed every global RNG from (seed, epoch, phase) and return a CPU generator for the
    augmentation: the randomness of an epoch is then the same whether the run got there
    directly or resumed."""
    s = epoch_seed(seed, 2 * epoch + phase)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
    return torch.Generator().manual_seed(s)


def get_rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values (a checkpoint loads them with
    ``torch.load(weights_only=True)``: numpy's array becomes a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(
        (kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached))
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
