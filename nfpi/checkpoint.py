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

A resume never starts from scratch over existing history: :func:`resume_checkpoint` returns the
newest checkpoint that loads and verifies (``last_good`` first, then the others newest written
first), and when the run directory holds history (checkpoints, a ``last_good`` pointer,
``metrics.jsonl`` lines) but no usable checkpoint it raises :class:`CheckpointError` naming what
is missing and the two ways on: ``--resume-from`` a good copy, or ``--fresh`` (which moves the old
files aside, :func:`set_aside_history`, and starts at epoch 0). Rotation keeps the newest
*written* checkpoints (``meta.json``'s ``written``), so the one just written after a resume from
an earlier epoch is never the one removed.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from filelock import FileLock, Timeout

from nfpi.config import ExperimentConfig
from nfpi.data import DatasetInfo
from nfpi.errors import CheckpointError, DivergenceError, RunDirectoryLockedError
from nfpi.flows import FlowModel, build_flow
from nfpi.prior import GaussianPrior

__all__ = [
    "CHECKPOINT_FILE",
    "FLOW_KEYS",
    "MAX_BITS_PER_DIM",
    "MAX_PARAMETER_ABS",
    "RESUMABLE_KEYS",
    "CheckpointStore",
    "TrainedModel",
    "checkpoint_epoch",
    "config_differences",
    "find_checkpoint",
    "implausible",
    "last_good_note",
    "load_checkpoint",
    "load_trained",
    "load_weights",
    "lock_run_dir",
    "resolve_resume_from",
    "resume_checkpoint",
    "save_checkpoint",
    "select_checkpoint",
    "set_aside_history",
]

log = logging.getLogger(__name__)

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
#: The entries that make a state a flow's checkpoint (a classifier's has ``model`` instead).
FLOW_KEYS = ("config", "flow")


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
    ``last_good`` at it; keep the newest written ``keep`` checkpoints (this one always). Returns
    the checkpoint's folder (what Ray Train uploads).

    Raises:
        DivergenceError: the state is not finite and plausible (see :func:`implausible`);
            nothing is written and the message says where the last good checkpoint is.
        CheckpointError: the checkpoint cannot be written (a full disk, a read-only folder):
            one line saying why and what is left; no temporary file stays behind.
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
    epoch = int(state["epoch"])
    folder = root / _epoch_dir(epoch)
    existed = (folder / CHECKPOINT_FILE).is_file()
    tmp = folder / (CHECKPOINT_FILE + ".tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Strictly after every checkpoint already here, whatever the clock says.
        written = max([time.time_ns(), *(_written(p) + 1 for p in _folders(root))])
        try:
            torch.save(state, tmp)
            os.replace(tmp, folder / CHECKPOINT_FILE)
        finally:
            tmp.unlink(missing_ok=True)
        _write_text(folder / "config.json", json.dumps(state["config"], indent=2, default=str))
        _write_text(folder / META_FILE, json.dumps({"epoch": epoch, "written": written}) + "\n")
        _write_text(root / LAST_GOOD, folder.name + "\n")
    except (OSError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "write" not in str(err).lower():
            raise  # not a failed write (torch reports those as RuntimeError): a bug
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise _write_error(run_dir, epoch, folder, err) from err
    others = sorted((p for p in root.glob("epoch-*") if p.is_dir() and p != folder), key=_written)
    for old in others[: max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _write_error(
    run_dir: str | Path, epoch: int, folder: Path, err: BaseException
) -> CheckpointError:
    """The one-line error of a checkpoint that could not be written."""
    if isinstance(err, OSError):
        reason = err.strerror or str(err)
    else:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    where = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    try:
        space = f"; {shutil.disk_usage(where).free / 2**20:.0f} MiB free there"
    except OSError:
        space = ""
    last = find_checkpoint(run_dir)
    kept = (
        f"the last good checkpoint {last} (after {checkpoint_epoch(last)} epochs) is intact"
        if last is not None
        else "no checkpoint of this run had been saved yet"
    )
    fix = (
        "free some space"
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        else "make the folder writable"
        if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        else "fix the cause"
    )
    return CheckpointError(
        f"cannot write the checkpoint of epoch {epoch} in {folder}: {reason}{space}. Nothing of "
        f"it was kept and {kept}: {fix}, then run the same command again to resume"
    )


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _written(folder: Path) -> int:
    """When the checkpoint in ``folder`` was written (ns): ``meta.json``'s ``written``, else
    (checkpoints of earlier releases) its state file's modification time. The order of rotation
    and of resume candidates: the newest *written*, not the highest epoch number."""
    try:
        return int(json.loads((folder / META_FILE).read_text())["written"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for path in (folder / CHECKPOINT_FILE, folder):
        try:
            return path.stat().st_mtime_ns
        except OSError:
            continue
    return 0


def _folders(root: Path) -> list[Path]:
    """The checkpoint folders under ``root`` (``epoch-NNNN``, ``from-ray``, ...), newest written
    first."""
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(folders, key=_written, reverse=True)


def _short(err: BaseException, n: int = 140) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _history(run_dir: Path) -> list[str]:
    """What in ``run_dir`` shows that a run trained there (empty for a fresh directory)."""
    found = []
    root = run_dir / CHECKPOINTS_DIR
    if root.is_dir():
        # A folder holding only a .tmp is a first save cut short: nothing of it was kept.
        names = sorted(
            p.name
            for p in root.iterdir()
            if p.name == LAST_GOOD
            or p.is_symlink()
            or (p.is_dir() and any((p / f).exists() for f in (CHECKPOINT_FILE, META_FILE)))
        )
        if names:
            found.append(f"{root} holds {_few(names, 5)}")
    try:
        lines = [x for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    except OSError:
        lines = []
    if lines:
        found.append(f"metrics.jsonl holds {len(lines)} epoch(s)")
    return found


def resume_checkpoint(
    run_dir: str | Path,
    map_location: str | torch.device = "cpu",
    required: tuple[str, ...] = FLOW_KEYS,
) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint of ``run_dir`` that loads and verifies (:func:`load_checkpoint`)
    and its state: the one ``last_good`` names, else the others newest written first (each one
    skipped is named in a warning); ``(None, None)`` for a directory without history.

    Raises:
        CheckpointError: ``run_dir`` holds an earlier run's history (checkpoint folders, a
            ``last_good`` pointer, ``metrics.jsonl`` lines) but no checkpoint that loads. The
            message names what is missing and the two ways on (``--resume-from``, ``--fresh``);
            nothing is changed.
    """
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS_DIR
    candidates: list[Path] = []
    problems: list[str] = []
    pointer = root / LAST_GOOD
    if pointer.is_file():
        try:
            name = pointer.read_text().strip()
        except OSError as err:
            name = ""
            problems.append(f"{LAST_GOOD} is unreadable ({err.strerror})")
        if name and (root / name / CHECKPOINT_FILE).is_file():
            candidates.append(root / name)
        elif name:
            problems.append(f"{LAST_GOOD} names {name}, whose {CHECKPOINT_FILE} is missing")
    elif pointer.is_symlink() or pointer.exists():
        problems.append(f"{LAST_GOOD} is a dangling link or not a file")
    elif root.is_dir():
        problems.append(f"{LAST_GOOD} is missing")
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            if entry.is_symlink() and not entry.exists():
                problems.append(f"{entry.name} is a dangling link")
        for folder in _folders(root):
            if folder in candidates:
                continue
            if (folder / CHECKPOINT_FILE).is_file():
                candidates.append(folder)
            else:
                problems.append(f"{folder.name} has no {CHECKPOINT_FILE}")
    for folder in candidates:
        try:
            state = load_checkpoint(folder, map_location=map_location, required=required)
        except CheckpointError as err:
            if "could run code" in str(err):
                raise  # tampering, not damage: never passed over for an older checkpoint
            problems.append(f"{folder.name} does not load ({_short(err)})")
            continue
        if problems:
            log.warning(
                "resuming from %s, the newest checkpoint of %s that verifies (%s)",
                folder / CHECKPOINT_FILE, run_dir, "; ".join(problems),
            )  # fmt: skip
        return folder / CHECKPOINT_FILE, state
    history = _history(run_dir)
    if history:
        raise CheckpointError(
            f"run directory {run_dir} holds an earlier run ({'; '.join(history)}) but no "
            f"checkpoint that loads ({'; '.join(problems) or 'none was saved'}), so nothing was "
            "started or overwritten: resume from a good copy with --resume-from EPOCH|PATH, or "
            "start again from epoch 0 on purpose with --fresh (the earlier files are moved to "
            f"{run_dir}/previous-<time>/)"
        )
    return None, None


def resolve_resume_from(run_dir: str | Path, value: str | int | Path) -> Path:
    """The checkpoint file ``--resume-from`` names: an epoch number (the checkpoint after that
    many epochs in ``run_dir/checkpoints/epoch-NNNN``) or a path (see :func:`find_checkpoint`).

    Raises:
        CheckpointError: there is no such checkpoint (the message lists the epochs there are).
    """
    text = str(value).strip()
    root = Path(run_dir) / CHECKPOINTS_DIR
    if text.isdigit():
        file = root / _epoch_dir(int(text)) / CHECKPOINT_FILE
        if file.is_file():
            return file
        have = sorted(
            int(p.name[len("epoch-") :])
            for p in root.glob("epoch-*")
            if (p / CHECKPOINT_FILE).is_file() and p.name[len("epoch-") :].isdigit()
        )
        raise CheckpointError(
            f"--resume-from {text}: {root} has no checkpoint after {int(text)} epochs (it has: "
            f"{', '.join(map(str, have)) or 'none'}); pass one of those epochs or the path of a "
            f"checkpoint (a run directory, an epoch-NNNN folder or a {CHECKPOINT_FILE})"
        )
    file = find_checkpoint(text)
    if file is None:
        raise CheckpointError(
            f"--resume-from {text}: no checkpoint there; pass an epoch number of {root} or the "
            f"path of a checkpoint (a run directory, an epoch-NNNN folder or a {CHECKPOINT_FILE})"
        )
    return file


def select_checkpoint(
    run_dir: str | Path, path: str | Path, required: tuple[str, ...] = FLOW_KEYS
) -> Path:
    """Make the checkpoint at ``path`` the newest of ``run_dir`` (``--resume-from``): verified
    (:func:`load_checkpoint`), copied in when it lies elsewhere (``imported-epoch-NNNN``, never
    over one of the run's own folders), marked as written now and named by ``last_good``, so
    that this resume and any later plain resume continue from it. Returns its file there."""
    state = load_checkpoint(path, required=required)
    file = Path(state["_file"])
    root = Path(run_dir).resolve() / CHECKPOINTS_DIR
    folder = file.parent
    if folder.parent != root:
        target = root / f"imported-{_epoch_dir(int(state['epoch']))}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in (CHECKPOINT_FILE, "config.json"):
            source = file if name == CHECKPOINT_FILE else folder / name
            if source.is_file():
                shutil.copy2(source, target / name)
        folder = target
    written = max([time.time_ns(), *(_written(p) + 1 for p in _folders(root))])
    meta = {"epoch": int(state["epoch"]), "written": written}
    _write_text(folder / META_FILE, json.dumps(meta) + "\n")
    _write_text(root / LAST_GOOD, folder.name + "\n")
    log.info("resuming %s from %s (after %d epochs)", run_dir, folder, meta["epoch"])
    return folder / CHECKPOINT_FILE


#: What :func:`set_aside_history` moves out of the way of a fresh start.
RUN_FILES = (CHECKPOINTS_DIR, "metrics.jsonl", "plots", "config.json")


def set_aside_history(run_dir: str | Path) -> Path | None:
    """``--fresh``: move an earlier run's files (:data:`RUN_FILES`) of ``run_dir`` into
    ``run_dir/previous-<UTC time>/`` (nothing is deleted) so that a run starts at epoch 0.
    Returns that folder, ``None`` when there was nothing to move."""
    run_dir = Path(run_dir)
    present = [n for n in RUN_FILES if (run_dir / n).exists() or (run_dir / n).is_symlink()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = run_dir / f"previous-{stamp}", 1
    while target.exists():
        n += 1
        target = run_dir / f"previous-{stamp}-{n}"
    target.mkdir(parents=True)
    for name in present:
        os.replace(run_dir / name, target / name)
    log.warning("--fresh: the earlier run's %s moved to %s", ", ".join(present), target)
    return target


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


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    required: tuple[str, ...] = FLOW_KEYS,
) -> dict[str, Any]:
    """The state dict of the checkpoint at ``path`` (see :func:`find_checkpoint`), loaded with
    ``weights_only=True``; it must hold the entries ``required`` (a flow's by default). Raises
    :class:`CheckpointError` naming the file and the fix."""
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
    if not isinstance(state, dict) or not all(key in state for key in required):
        raise CheckpointError(
            f"{file} is not an nfpi checkpoint of this kind (no {'/'.join(required)} entries)"
        )
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


def _refuse_locked(run_dir: Path, path: Path) -> NoReturn:
    """:class:`RunDirectoryLockedError` naming the live holder of ``run_dir``'s lock."""
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


@contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` (created if missing) for the ``with`` block.

    The lock is a ``flock`` on ``run_dir/.nfpi-run.lock`` (released by the OS when its process
    ends, however it ends); the holder's pid, host, start time and command are written into the
    file (the program's name, never its arguments) so that a second process can say who holds
    it.

    Raises:
        RunDirectoryLockedError: another process holds it (named in the message).
        CheckpointError: ``run_dir`` cannot be written (read-only, permissions).
    """
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    lock = FileLock(str(path))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:  # a TimeoutError, i.e. an OSError: first
        _refuse_locked(run_dir, path)
    except PermissionError as err:
        raise CheckpointError(
            f"run directory {run_dir} is not writable ({err.strerror}: {err.filename}): a run "
            "writes its checkpoints there; pass a folder you can write (--run-dir / "
            "--results-dir), or fix its permissions"
        ) from None
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.ENOSPC):
            raise
        raise CheckpointError(
            f"run directory {run_dir} cannot be written ({err.strerror}): pass another "
            "folder (--run-dir / --results-dir) or free its disk"
        ) from None
    try:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            # The program only, never its arguments: the file is readable by every user of
            # the (shared) run directory, and a command line may carry paths, URIs, tokens.
            "command": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
        }
        path.write_text(json.dumps(owner) + "\n")  # filelock never truncates: ours to write
        yield run_dir
    finally:
        lock.release()


class CheckpointStore:
    """A run directory's checkpoints and run files, as every training loop uses them
    (:func:`nfpi.epochs.fit_epochs`): the flow's and the downstream classifier's alike.

    ``run_dir`` holds ``checkpoints/`` (:func:`save_checkpoint`: verified before written, the
    last ``keep`` kept), ``config.json`` and ``metrics.jsonl`` (one line per finished epoch,
    always the checkpoint's history). Only the main process (rank 0) writes; ``sync`` (a
    barrier of all ranks) is called where every rank must wait for its writes.

    Args:
        run_dir: the run directory (created when first written).
        main: whether this process writes (rank 0).
        required: the entries that make a state this kind of checkpoint (:data:`FLOW_KEYS`).
        sync: called by every rank after a fresh start's files are moved aside.
        keep: checkpoints kept.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        main: bool = True,
        required: tuple[str, ...] = FLOW_KEYS,
        sync: Callable[[], None] | None = None,
        keep: int = 3,
    ) -> None:
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.main = main
        self.required = required
        self.sync = sync
        self.keep = keep

    def locked(self, enabled: bool = True) -> AbstractContextManager[Any]:
        """The run directory's lock (:func:`lock_run_dir`) on the main process when
        ``enabled``; nothing otherwise (the caller holds it, or another rank)."""
        return lock_run_dir(self.run_dir) if enabled and self.main else nullcontext()

    def resume(
        self,
        resume_from: str | Path | None = None,
        *,
        fresh: bool = False,
        holds_lock: bool = True,
        map_location: str | torch.device = "cpu",
    ) -> tuple[Path | None, dict[str, Any] | None]:
        """The checkpoint a run starts from and its state (``(None, None)``: start at epoch 0).

        ``fresh``: move an earlier run's files aside (:func:`set_aside_history`) and start at
        epoch 0. ``resume_from``: that checkpoint, made the run directory's newest when this
        process ``holds_lock`` (:func:`select_checkpoint`). Otherwise the newest checkpoint that
        verifies (:func:`resume_checkpoint`; history without one raises
        :class:`CheckpointError`).
        """
        if fresh:
            if self.main:
                set_aside_history(self.run_dir)
            if self.sync is not None:
                self.sync()
            return None, None
        if resume_from is None:
            return resume_checkpoint(self.run_dir, map_location, self.required)
        path = Path(resume_from)
        if holds_lock and self.main:  # also what a later plain resume takes
            path = select_checkpoint(self.run_dir, path, self.required)
        return path, load_checkpoint(path, map_location=map_location, required=self.required)

    def save(self, state: dict[str, Any]) -> Path | None:
        """Write ``state`` as the checkpoint of its ``epoch`` (main process; ``None`` on the
        others). Raises :class:`DivergenceError` or :class:`CheckpointError` as
        :func:`save_checkpoint` does."""
        return save_checkpoint(self.run_dir, state, keep=self.keep) if self.main else None

    def write_config(self, config: Mapping[str, Any]) -> None:
        """``config.json``: the config that runs (main process)."""
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_text(self.run_dir / "config.json", json.dumps(config, indent=2, default=str))

    def write_metrics(self, history: list[dict[str, float]]) -> None:
        """``metrics.jsonl`` rewritten from ``history`` (main process): after a resume it holds
        exactly the epochs the checkpoint holds."""
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_text(
                self.run_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history)
            )


def load_weights(
    module: torch.nn.Module, weights: Mapping[str, Any], state: Mapping[str, Any]
) -> None:
    """``module.load_state_dict(weights)`` of a checkpoint's ``state``; weights of another
    model shape raise :class:`CheckpointError` naming the checkpoint, the first mismatch and
    the data shape it was trained on (instead of torch's many-line RuntimeError)."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        lines = [x.strip() for x in str(err).splitlines() if x.strip()]
        detail = next((x for x in lines if "size mismatch" in x), lines[-1] if lines else "")
        shape = (state.get("data_info") or {}).get("shape")
        preset = (state.get("config") or {}).get("flow", {}).get("preset")
        raise CheckpointError(
            f"checkpoint {state.get('_file')} holds a model of another shape than this one "
            f"({detail[:200]}); it was trained with flow.preset={preset} on data of shape "
            f"{tuple(shape) if shape else '?'}: use it with that flow and data, or start a "
            "fresh run directory"
        ) from None


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
    load_weights(flow, weights, state)
    prior = GaussianPrior.from_state_dict(state["prior"])
    return TrainedModel(
        flow.to(device).eval(),
        prior.to(device),
        config,
        info,
        int(state["epoch"]),
        Path(state["_file"]),
    )
