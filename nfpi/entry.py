"""What every command line of the project shares: one-line errors, ``--debug``, a quiet log.

Every entry point (``python -m nfpi``, ``ray_jobs/train.py``, ``ray_jobs/sweep.py``,
``ray_jobs/figures.py``) builds its parser with :class:`Parser` and runs its ``main`` through
:func:`run_cli`:

- a user mistake, i.e. an :class:`~nfpi.errors.NfpiError` (a bad config value or ``--set``, a
  missing dataset, a corrupt checkpoint or archive, a malformed command line), is written as ONE
  line on stderr naming the field or path and the fix, and the exit code is 2;
- ``--debug`` (accepted by every parser) shows the full traceback instead;
- an error raised inside Ray (a Train worker, a Tune trial) is unwrapped to the library error
  that caused it (:func:`user_error`), without importing Ray;
- anything else is a bug and keeps its traceback.

:func:`setup_logging` gives the console one short line per message (``HH:MM:SS message``,
warnings marked) and quiets the INFO chatter of MLflow's store migrations.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any, NoReturn

from nfpi.errors import NfpiError, UsageError

__all__ = [
    "HelpFormatter",
    "Parser",
    "add_resume_args",
    "one_line",
    "run_cli",
    "setup_logging",
    "user_error",
]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM (while :func:`run_cli` runs): unwinds like Ctrl-C,
    so every ``finally`` runs (no temporary file stays behind, a Ray driver marks its MLflow
    run KILLED) and the command ends with one line and exit code 143."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


# Loggers of dependencies whose INFO lines say nothing a user acts on (MLflow's database
# migrations on first use of a store).
QUIET_LOGGERS = ("mlflow", "alembic", "urllib3", "filelock")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default
    (``(default: 1)``) unless the default says nothing (None, False, an empty list) or the
    help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        silent = default is None or default is False or default == [] or default == ()
        if silent or default is argparse.SUPPRESS or "default" in text or not action.option_strings:
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})".lstrip()


# Options whose value is KEY=VALUE: "--set optim.epochs 10" (no "=") is caught by name.
KEY_VALUE_OPTIONS = ("--set", "--resume-with")


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one :class:`UsageError` line (not the usage
    block and ``sys.exit``), which accepts ``--debug`` (read by :func:`run_cli`) and shows
    every option's default in ``--help`` (:class:`HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug", action="store_true", help="show the full traceback of an error"
        )

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        for option, value, after in zip(argv, argv[1:], [*argv[2:], None], strict=False):
            if option in KEY_VALUE_OPTIONS and "=" not in value and not value.startswith("-"):
                hint = f"{option} {value}={after}" if after and not after.startswith("-") else (
                    f"{option} {value}=VALUE"
                )  # fmt: skip
                raise UsageError(
                    f"{option} {value}: write KEY=VALUE with '=', e.g. {hint} "
                    f"(see {self.prog} --help)"
                )
        return super().parse_known_args(argv, namespace)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def add_resume_args(parser: argparse.ArgumentParser) -> None:
    """``--resume-from EPOCH|PATH`` and ``--fresh`` (``python -m nfpi train``, ``ray_jobs/train.py``)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume-from",
        metavar="EPOCH|PATH",
        help="resume from the checkpoint after EPOCH epochs of the run directory, or from a "
        "checkpoint path (default: the newest checkpoint that verifies); it becomes the run's "
        "newest, later epochs are trained again",
    )
    group.add_argument(
        "--fresh",
        action="store_true",
        help="start again from epoch 0 over an earlier run in the run directory (its files are "
        "moved to <run dir>/previous-<time>/, nothing is deleted)",
    )


def user_error(exc: BaseException) -> NfpiError | None:
    """The :class:`NfpiError` that ``exc`` is or wraps, or ``None`` (a bug, not a mistake).

    Looks through exception chains (``__cause__``, ``__context__``) and the attributes with which
    Ray wraps a remote failure (``cause`` of a task error, ``worker_failures`` of a Train
    worker-group error, ``controller_failure``), breadth first.
    """
    queue: list[Any] = [exc]
    seen: set[int] = set()
    while queue:
        err = queue.pop(0)
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(err, NfpiError):
            # Ray's task errors derive from the remote error's class as well; the plain remote
            # error (its ``cause``) carries the message without the remote traceback.
            return cause if isinstance(cause, NfpiError) else err
        queue += [cause, err.__cause__, err.__context__, getattr(err, "controller_failure", None)]
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            queue += list(failures.values())
        queue += [a for a in getattr(err, "args", ()) if isinstance(a, BaseException)]
    return None


def one_line(err: BaseException) -> str:
    """The error's message on one line (later lines folded in, whitespace collapsed)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def run_cli(
    main: Callable[[list[str]], int | None],
    argv: Sequence[str] | None = None,
    *,
    prog: str = "nfpi",
    stderr: IO[str] | None = None,
) -> int:
    """Run ``main(argv)`` and return the process's exit code: ``main``'s, 2 for a user mistake
    (one line on ``stderr``), 130 when interrupted, 143 on SIGTERM (one line; it unwinds
    like Ctrl-C, see :class:`Terminated`). With ``--debug`` in ``argv`` errors propagate
    with their traceback. ``argparse``'s own exits (``--help``) pass through."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    out = stderr if stderr is not None else sys.stderr
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals are not ours to handle
        previous = None
    try:
        return int(main(args) or 0)
    except BrokenPipeError:  # the output was piped into a command that stopped reading (head)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return 0
    except KeyboardInterrupt as exc:
        if debug:
            raise
        if isinstance(exc, Terminated):
            out.write(f"{prog}: terminated by SIGTERM; what was saved is kept\n")
            return EXIT_TERMINATED
        out.write(f"{prog}: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as exc:  # sorted into mistakes (one line) and bugs (re-raised)
        err = user_error(exc)
        if err is None or debug:
            raise
        out.write(f"{prog}: error: {one_line(err)} (--debug for the traceback)\n")
        return EXIT_USER_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS message``; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{self.formatTime(record, '%H:%M:%S')} {record.levelname}: {message}"
        return f"{self.formatTime(record, '%H:%M:%S')} {message}"


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is when a record is emitted (not
    the stream it was created with, which a redirection or a test's capture may have closed)."""

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def setup_logging(debug: bool = False) -> None:
    """Console logging of the entry points: INFO and up (DEBUG with ``--debug``) in one short
    line each, the dependencies in :data:`QUIET_LOGGERS` at WARNING."""
    handler = _StderrHandler()
    handler.setFormatter(_ConsoleFormatter("%(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
