"""The one place that writes and reads checkpoints and trained models.

A run directory holds its checkpoints as one folder per saved epoch, the last few kept, and a
``last_good`` pointer naming the newest one that passed its checks::

    run_dir/checkpoints/
      epoch-0003/state.pt, config.json
      epoch-0004/state.pt, config.json
      last_good                        "epoch-0004"

A checkpoint is a dict of tensors and plain Python values only, written atomically (temporary
file, then rename) and read with ``torch.load(weights_only=True)``: loading one never runs code.
:func:`load_trained` reads back the (EMA) flow and the prior of any checkpoint for generation,
evaluation and augmentation; it is what every downstream use of a trained flow imports.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nfpi.config import ExperimentConfig
from nfpi.data import DatasetInfo
from nfpi.errors import CheckpointError
from nfpi.flows import FlowModel, build_flow
from nfpi.prior import GaussianPrior

__all__ = [
    "CHECKPOINT_FILE",
    "TrainedModel",
    "checkpoint_epoch",
    "find_checkpoint",
    "load_checkpoint",
    "load_trained",
    "save_checkpoint",
]

CHECKPOINT_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINTS_DIR = "checkpoints"
LAST_GOOD = "last_good"


def _epoch_dir(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], *, keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of epoch ``state["epoch"]`` under ``run_dir`` and point
    ``last_good`` at it; keep the newest ``keep`` checkpoints. Returns the checkpoint's folder
    (what Ray Train uploads)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    folder = root / _epoch_dir(int(state["epoch"]))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, folder / CHECKPOINT_FILE)
    _write_text(folder / "config.json", json.dumps(state["config"], indent=2, default=str))
    _write_text(folder / META_FILE, json.dumps({"epoch": int(state["epoch"])}) + "\n")
    _write_text(root / LAST_GOOD, folder.name + "\n")
    for old in sorted(p for p in root.glob("epoch-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint file ``path`` names: a ``state.pt``, a checkpoint folder, a run's
    ``checkpoints`` folder or the run directory itself (then the ``last_good`` one); ``None``
    if there is none yet."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / CHECKPOINT_FILE).is_file():
        return path / CHECKPOINT_FILE
    root = path if (path / LAST_GOOD).exists() else path / CHECKPOINTS_DIR
    pointer = root / LAST_GOOD
    if not pointer.is_file():
        return None
    file = root / pointer.read_text().strip() / CHECKPOINT_FILE
    return file if file.is_file() else None


def checkpoint_epoch(path: str | Path) -> int | None:
    """The number of finished epochs in the checkpoint at ``path`` (from its small ``meta.json``,
    without loading the state), or ``None`` when there is no checkpoint there."""
    file = find_checkpoint(path)
    if file is None:
        return None
    try:
        return int(json.loads((file.parent / META_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state dict of the checkpoint at ``path`` (see :func:`find_checkpoint`), loaded with
    ``weights_only=True``. Raises :class:`CheckpointError` naming the file and the fix."""
    file = find_checkpoint(path)
    if file is None:
        raise CheckpointError(
            f"no checkpoint at {path}: pass a run directory, its checkpoints/ folder, an "
            f"epoch-NNNN folder or a {CHECKPOINT_FILE}"
        )
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user-facing error
        # torch's weights-only unpickler wraps the real failure in advice about weights_only,
        # which does not apply (a checkpoint never needs code to load): report the inner error.
        inner = err.__context__ if err.__context__ is not None else err
        reason = (str(inner).strip().splitlines() or [""])[0][:120]
        raise CheckpointError(
            f"cannot read checkpoint {file}: it is corrupt, truncated or not an nfpi checkpoint "
            f"({type(inner).__name__}: {reason}); resume from an earlier epoch-NNNN folder or "
            "start a fresh run directory"
        ) from None
    if not isinstance(state, dict) or "config" not in state or "flow" not in state:
        raise CheckpointError(f"{file} is not an nfpi checkpoint (no config/flow entries)")
    state["_file"] = str(file.resolve())
    return state


@dataclass
class TrainedModel:
    """A trained flow and its prior, read back from a checkpoint by :func:`load_trained`."""

    flow: FlowModel
    prior: GaussianPrior
    config: ExperimentConfig
    info: DatasetInfo
    epoch: int
    path: Path | None = None  # the checkpoint file it was read from


def load_trained(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> TrainedModel:
    """The (EMA) flow and the prior of a checkpoint, in eval mode, for generation, evaluation
    or augmentation. ``use_ema`` falls back to the online weights when the EMA had not started."""
    state = load_checkpoint(path)
    config = ExperimentConfig.from_dict(state["config"])
    info = DatasetInfo(**state["data_info"])
    flow = build_flow(
        config.flow.preset, in_shape=tuple(info.shape), seed=config.seed, **config.flow.overrides()
    )
    weights = state["flow"]
    if use_ema and state.get("ema") is not None:
        prefix = "ema_model."
        weights = {k[len(prefix) :]: v for k, v in state["ema"].items() if k.startswith(prefix)}
    flow.load_state_dict(weights)
    prior = GaussianPrior.from_state_dict(state["prior"])
    return TrainedModel(
        flow.to(device).eval(),
        prior.to(device),
        config,
        info,
        int(state["epoch"]),
        Path(state["_file"]),
    )
