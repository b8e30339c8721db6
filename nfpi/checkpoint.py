"""The one place that writes and reads checkpoints and trained models.

A run directory holds its checkpoints as one folder per saved epoch, the last few kept, and a
``last_good`` pointer naming the newest one that passed its checks::

    run_dir/checkpoints/
      epoch-0003/state.pt, config.json
      epoch-0004/state.pt, config.json
      last_good                        "epoch-0004"

A checkpoint is a dict of tensors and plain Python values only, written atomically (temporary
file, then rename) and read with ``torch.load(weights_only=True)``: loading one never runs code.
Nothing diverged is ever written: :func:`save_checkpoint` refuses a state with a non-finite
floating tensor or flow weights beyond :data:`MAX_PARAMETER_ABS` (:class:`DivergenceError`
saying where the last good checkpoint is), so ``last_good`` always names a usable one.
:func:`load_trained` reads back the (EMA) flow and the prior of any checkpoint for generation,
evaluation and augmentation; it is what every downstream use of a trained flow imports.

:func:`lock_run_dir` keeps a second process from training in a run directory that a live one
uses (it would silently resume from the other's checkpoints).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from nfpi.config import ExperimentConfig
from nfpi.data import DatasetInfo
from nfpi.errors import CheckpointError, DivergenceError, RunDirectoryLockedError
from nfpi.flows import FlowModel, build_flow
from nfpi.prior import GaussianPrior

__all__ = [
    "CHECKPOINT_FILE",
    "MAX_BITS_PER_DIM",
    "MAX_PARAMETER_ABS",
    "RESUMABLE_KEYS",
    "TrainedModel",
    "checkpoint_epoch",
    "config_differences",
    "find_checkpoint",
    "implausible",
    "last_good_note",
    "load_checkpoint",
    "load_trained",
    "lock_run_dir",
    "save_checkpoint",
]

CHECKPOINT_FILE = "state.pt"
META_FILE = "meta.json"
CHECKPOINTS_DIR = "checkpoints"
LAST_GOOD = "last_good"
LOCK_FILE = ".nfpi-run.lock"

#: Plausibility bound on any ``*_bpd`` metric. A uniform model of 8-bit data scores 8 bits/dim and
#: an untrained flow tens; beyond 1000 the density has collapsed (a GD prior whose means ran off
#: gave 6e21): the run diverged, although every number is finite.
MAX_BITS_PER_DIM = 1e3
#: Plausibility bound on the magnitude of any flow (or EMA) weight. Adamax moves a weight by at
#: most ``lr`` per step (1e-2 x 500 epochs x 100 steps = 500 over a whole paper run); a weight
#: beyond 1e4 comes from a diverged step (optim.lr=1e6 gave 2e5 after one step).
MAX_PARAMETER_ABS = 1e4
#: The config keys a resumed run may change (``--resume-with``): the optimiser knobs a diverged
#: run needs (and a longer budget). Every other difference to the checkpoint's config is refused.
RESUMABLE_KEYS = ("optim.lr", "optim.grad_clip", "optim.warmup_steps", "optim.epochs")


def _epoch_dir(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _floating_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, tensor) of every floating tensor in a nested dict/list state."""
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _floating_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _floating_tensors(value, f"{prefix}.{i}" if prefix else str(i))


def implausible(state: Mapping[str, Any], metrics: Mapping[str, float] | None = None) -> list[str]:
    """What makes a training state diverged (empty when it is fine): non-finite floating
    tensors anywhere in it, flow/EMA weights beyond :data:`MAX_PARAMETER_ABS`, non-finite
    ``metrics`` and bits/dim beyond :data:`MAX_BITS_PER_DIM`. At most a few names per kind."""
    problems: list[str] = []
    for key, value in (metrics or {}).items():
        if not math.isfinite(value):
            problems.append(f"metric {key}={value}")
        elif key.endswith("_bpd") and value > MAX_BITS_PER_DIM:
            problems.append(f"metric {key}={value:.4g} > {MAX_BITS_PER_DIM:g} bits/dim")
    non_finite, too_big = [], []
    for name, tensor in _floating_tensors(state):
        if not bool(torch.isfinite(tensor).all()):
            non_finite.append(name)
        elif name.split(".")[0] in ("flow", "ema") and tensor.numel():
            biggest = float(tensor.detach().abs().max())
            if biggest > MAX_PARAMETER_ABS:
                too_big.append(f"{name} (|w| = {biggest:.3g})")
    if non_finite:
        problems.append(f"non-finite values in {_few(non_finite)}")
    if too_big:
        problems.append(f"weights beyond {MAX_PARAMETER_ABS:g} in {_few(too_big)}")
    return problems


def _few(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def last_good_note(run_dir: str | Path) -> tuple[Path | None, str]:
    """The run directory's last good checkpoint (``None`` if there is none) and a sentence
    saying truthfully where it is and how to go on from it, for divergence messages."""
    file = find_checkpoint(run_dir)
    if file is None:
        return None, (
            f"no checkpoint has been saved in {run_dir} yet (nothing to resume): start the run "
            "again with a lower learning rate or gradient clipping, e.g. --set optim.lr=<lower> "
            "--set optim.grad_clip=1.0"
        )
    epoch = checkpoint_epoch(file)
    return file, (
        f"the last good checkpoint, {file} (after {epoch} epochs), is intact: resume from it "
        "with a lower learning rate or gradient clipping, e.g. --resume-with optim.lr=<lower> "
        "--resume-with optim.grad_clip=1.0 (Trainer(resume_overrides=...))"
    )


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], *, keep: int = 3) -> Path:
    """Write ``state`` as the checkpoint of epoch ``state["epoch"]`` under ``run_dir`` and point
    ``last_good`` at it; keep the newest ``keep`` checkpoints. Returns the checkpoint's folder
    (what Ray Train uploads).

    Raises:
        DivergenceError: the state is not finite and plausible (see :func:`implausible`);
            nothing is written and the message says where the last good checkpoint is.
    """
    problems = implausible(state)
    if problems:
        last, note = last_good_note(run_dir)
        raise DivergenceError(
            f"refusing to save epoch {state.get('epoch')}: the run diverged "
            f"({'; '.join(problems)}); {note}",
            None if last is None else str(last),
        )
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


# What torch's weights-only unpickler says when it refuses an object (a global, a class, a call)
# rather than failing to parse the bytes (a corrupt or truncated file: "Unsupported operand").
_BLOCKED_OBJECT = re.compile(r"GLOBAL|global|allowlisted|safe_globals|Unsupported class|reduce")


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
        reason = (str(inner).strip().splitlines() or [""])[0]
        if isinstance(err, pickle.UnpicklingError) and _BLOCKED_OBJECT.search(reason):
            raise CheckpointError(
                f"refused to load {file}: it holds objects other than tensors and plain values, "
                "and unpickling them could run code (torch.load(weights_only=True) stopped at: "
                f"{reason[:300]}). nfpi checkpoints never contain such objects: use a checkpoint "
                "written by nfpi from a source you trust"
            ) from None
        reason = reason[:120]
        raise CheckpointError(
            f"cannot read checkpoint {file}: it is corrupt, truncated or not an nfpi checkpoint "
            f"({type(inner).__name__}: {reason}); resume from an earlier epoch-NNNN folder or "
            "start a fresh run directory"
        ) from None
    if not isinstance(state, dict) or "config" not in state or "flow" not in state:
        raise CheckpointError(f"{file} is not an nfpi checkpoint (no config/flow entries)")
    problems = implausible(state)
    if problems:  # e.g. written by a release that saved diverged weights
        raise CheckpointError(
            f"checkpoint {file} holds a diverged state ({'; '.join(problems)}): resume from an "
            "earlier epoch-NNNN folder of the same run (resume_from=...), or start afresh"
        )
    state["_file"] = str(file.resolve())
    return state


def config_differences(
    saved: Mapping[str, Any], mine: Mapping[str, Any], allowed: tuple[str, ...] = ()
) -> dict[str, tuple[Any, Any]]:
    """Flat config keys (other than ``allowed``) whose values differ: ``{key: (saved, mine)}``."""
    keys = (set(saved) | set(mine)) - set(allowed)
    return {k: (saved.get(k), mine.get(k)) for k in sorted(keys) if saved.get(k) != mine.get(k)}


@contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` (created if missing) for the ``with`` block.

    The lock is a ``flock`` on ``run_dir/.nfpi-run.lock`` (released by the OS when its process
    ends, however it ends); the holder's pid, host, start time and command are written into the
    file so that a second process can say who holds it.

    Raises:
        RunDirectoryLockedError: another process holds it (named in the message).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            owner = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            owner = {}
        who = (
            f"process {owner.get('pid')} on host {owner.get('host')} (since "
            f"{owner.get('since')}, command: {owner.get('command')})"
            if owner
            else "another process"
        )
        raise RunDirectoryLockedError(
            f"run directory {run_dir} is in use by {who}. Two runs in one directory would "
            "resume from each other's checkpoints: wait for that run to finish, stop it (e.g. "
            f"kill {owner.get('pid', '<pid>')} on {owner.get('host', 'its host')}; the lock goes "
            "with the process), or use another run directory (--run-dir / --run-name)"
        ) from None
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        path.write_text(json.dumps(owner) + "\n")  # filelock never truncates: ours to write
        yield run_dir
    finally:
        lock.release()


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
