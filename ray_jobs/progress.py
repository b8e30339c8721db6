"""A quiet console for the Ray entry points: a few lines per run instead of Ray's report dumps.

Ray's own console output (every worker's log lines, Tune's status tables and per-result boxes,
Train's "Reporting training result" dumps) is turned off by the entry points
(``ray.init(log_to_driver=False)``: the worker logs stay in the Ray session's log folder) and
replaced by :class:`Progress`: per run a line when it starts, its progress per epoch, and one
line when it ends or fails (the error on one line). On a terminal each running trial is one
``tqdm`` bar updated every epoch; otherwise (a log file, a pipe) a line is written every
``ceil(epochs / 5)`` epochs, so a sweep's log stays short whatever its length.

:class:`SweepProgress` feeds it from Tune (a Tune callback, in the sweep's driver);
:class:`TrainProgress` from a single Ray Train run (a Train callback, in Train's controller,
forwarding each report through a Ray queue to a thread of the driver).
:func:`search_spaces.trial_label` names a trial after what it varies (``fpi lam=300``,
``gd linear``): the console and the MLflow child runs use it.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import Any

import ray
from ray import tune
from ray.train import UserCallback
from ray.util.queue import Queue
from tqdm import tqdm

from nfpi.entry import one_line, user_error
from ray_jobs.settings import untrusted_pickles

__all__ = ["Progress", "SweepProgress", "TrainProgress"]

log = logging.getLogger("nfpi.progress")

LINES_PER_RUN = 5  # progress lines per run when not on a terminal (plus start and end)
SHOWN = (("nf_acc", "nf_acc", 3), ("test_bpd", "test_bpd", 3), ("train_bpd", "train_bpd", 3))
FINAL = (*SHOWN, ("cnn_acc", "cnn_acc", 3), ("aug_acc", "aug_acc", 3))


def _metrics_text(metrics: dict[str, Any], keys: tuple = SHOWN) -> str:
    return "  ".join(
        f"{title} {float(metrics[k]):.{digits}f}"
        for k, title, digits in keys
        if isinstance(metrics.get(k), (int, float)) and math.isfinite(float(metrics[k]))
    )


class Progress:
    """The console lines of one or more concurrent runs (see the module).

    Args:
        tty: draw ``tqdm`` bars (default: whether stderr is a terminal).
    """

    def __init__(self, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self._runs: dict[str, dict[str, Any]] = {}
        self._positions: set[int] = set()

    def _say(self, text: str) -> None:
        if self.tty:
            tqdm.write(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr)
        else:
            log.info(text)

    def start(self, key: str, label: str, epochs: int) -> None:
        run = {"label": label, "epochs": epochs, "t0": time.monotonic(), "bar": None}
        every = max(1, math.ceil(epochs / LINES_PER_RUN))
        run["every"] = every
        self._runs[key] = run
        self._say(f"{label}: started ({epochs} epochs)")
        if self.tty:
            pos = min(set(range(len(self._positions) + 1)) - self._positions)
            self._positions.add(pos)
            run["pos"] = pos
            run["bar"] = tqdm(
                total=epochs, desc=label, position=pos, leave=False, unit="epoch", file=sys.stderr
            )

    def epoch(self, key: str, metrics: dict[str, Any]) -> None:
        run = self._runs.get(key)
        if run is None or "epoch" not in metrics:
            return
        done = int(metrics["epoch"]) + 1
        if done <= run.get("done", 0):
            return  # a repeat (a trial's return value repeats its last report)
        run["done"] = done
        text = _metrics_text(metrics)
        if run["bar"] is not None:
            run["bar"].n = done
            run["bar"].set_postfix_str(text, refresh=True)
        elif done % run["every"] == 0 or done == run["epochs"]:
            secs = time.monotonic() - run["t0"]
            self._say(f"{run['label']}: epoch {done}/{run['epochs']}  {text}  ({secs:.0f} s)")

    def _close(self, key: str) -> dict[str, Any] | None:
        run = self._runs.pop(key, None)
        if run is not None and run["bar"] is not None:
            run["bar"].close()
            self._positions.discard(run["pos"])
        return run

    def finish(self, key: str, metrics: dict[str, Any]) -> None:
        run = self._close(key)
        if run is None:
            return
        secs = time.monotonic() - run["t0"]
        self._say(f"{run['label']}: done in {secs:.0f} s  {_metrics_text(metrics, FINAL)}")

    def fail(self, key: str, error: BaseException | str | None, where: str = "") -> None:
        run = self._close(key)
        label = run["label"] if run is not None else key
        if isinstance(error, BaseException):
            found = user_error(error)
            text = one_line(found) if found is not None else f"{type(error).__name__}"
            text = (text[:300] + "...") if len(text) > 300 else text
        else:
            text = error or "failed"
        self._say(f"{label}: FAILED: {text}" + (f" (details: {where})" if where else ""))


class SweepProgress(tune.Callback):
    """Feeds :class:`Progress` from Tune's trial events (runs in the sweep's driver).

    Args:
        label: ``label(trial_config, trial_id) -> str``.
        epochs: ``epochs(trial_config) -> int``.
    """

    def __init__(self, label: Any, epochs: Any, progress: Progress | None = None) -> None:
        self.label, self.epochs = label, epochs
        self.progress = progress or Progress()
        self.results: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its run config (with this callback) for --resume: not the live bars.
        return {"label": self.label, "epochs": self.epochs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["label"], state["epochs"])

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        label = self.label(trial.config, trial.trial_id)
        self.progress.start(trial.trial_id, label, self.epochs(trial.config))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info):
        self.results[trial.trial_id] = result
        self.progress.epoch(trial.trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.progress.finish(trial.trial_id, trial.last_result or {})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        where = getattr(trial, "error_file", None) or getattr(trial, "path", "") or ""
        error = _trial_exception(trial)
        self.progress.fail(trial.trial_id, error, str(where))


def _trial_exception(trial: Any) -> BaseException | str | None:
    """The trial's error: the exception Tune stored (pickled) if it can be read back, else the
    first line of its error text."""
    try:
        path = trial.pickled_error_file
        if path and untrusted_pickles(path) is not None:
            log.debug("not unpickling %s: %s", path, untrusted_pickles(path))
            path = None  # unpickling runs code: only files nobody else could have written
        if path:
            import cloudpickle

            with open(path, "rb") as f:
                return cloudpickle.load(f)
    except Exception as err:  # noqa: BLE001 - the text below is the fallback
        log.debug("could not read the trial's pickled error: %s", err)
    try:
        text = trial.error_message or ""
    except Exception:  # noqa: BLE001
        text = ""
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else None


class TrainProgress(UserCallback):
    """Forwards rank 0's reports of a Ray Train run (this callback runs in Train's controller)
    through a Ray queue to :meth:`listen`'s thread in the driver, which shows them with
    :class:`Progress`; :meth:`close` ends it with the run's last line."""

    def __init__(self, label: str, epochs: int) -> None:
        self.label, self.epochs = label, epochs
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._listener: tuple[threading.Thread, Progress] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Shipped to Train's controller: the queue's handle, not the driver's thread.
        return {"label": self.label, "epochs": self.epochs, "queue": self.queue}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _listener=None)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any):
        if metrics:
            self.queue.put(dict(metrics[0]))

    def listen(self, progress: Progress | None = None) -> None:
        """Start showing the reports (a daemon thread of the driver)."""
        progress = progress or Progress()
        progress.start("run", self.label, self.epochs)
        queue = self.queue

        def loop() -> None:
            while (item := queue.get(block=True)) is not None:
                progress.epoch("run", item)

        thread = threading.Thread(target=loop, name="nfpi-progress", daemon=True)
        thread.start()
        self._listener = (thread, progress)

    def close(self, metrics: dict[str, Any] | None = None, failed: bool = False) -> None:
        """After the run: wait for the reports still queued, write the last line (a failure's
        reason is the caller's to say), free the queue's actor."""
        if self._listener is None:
            return
        thread, progress = self._listener
        self.queue.put(None)
        thread.join(timeout=60)
        if failed:
            progress.fail("run", "see the error below")
        else:
            progress.finish("run", metrics or {})
        ray.kill(self.queue.actor)
        self._listener = None
