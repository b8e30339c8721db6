"""The quiet console: trials named after what they vary, a few lines per run."""

import functools
import logging
import pickle

import pytest

from ray_jobs.progress import Progress, SweepProgress
from search_spaces import load_space


@pytest.mark.parametrize(
    ("space", "options", "labels"),
    [
        ("digits", {}, ["data-init", "gd", "fpi"]),
        ("table2", {"data.root": "/x"}, ["fpi lam=10", "fpi lam=50", "fpi lam=100", "fpi lam=200",
                                         "fpi lam=300", "fpi lam=500"]),
        ("table1", {"data.root": "/x"}, ["data-init", "gd sublinear_v1", "gd sublinear_v2",
                                         "gd linear", "gd superlinear_v1", "gd superlinear_v2",
                                         "fpi"]),
    ],
)  # fmt: skip
def test_trials_are_named_after_what_they_vary(space, options, labels):
    s, rest = load_space(space).with_options(options)
    assert [s.trial(sample, rest).label for sample in s.samples()] == labels


def test_a_run_prints_a_few_lines_whatever_its_length(caplog):
    progress = Progress(tty=False)
    with caplog.at_level(logging.INFO, logger="nfpi.progress"):
        progress.start("t1", "fpi lam=300", epochs=30)
        for epoch in range(30):
            progress.epoch("t1", {"epoch": float(epoch), "nf_acc": 0.5, "test_bpd": 7.0})
        progress.epoch("t1", {"epoch": 29.0, "nf_acc": 0.5})  # the trial's return value repeats it
        progress.finish("t1", {"nf_acc": 0.9, "test_bpd": 6.6})
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7, lines  # started, epochs 6, 12, 18, 24, 30, done
    assert lines[0] == "fpi lam=300: started (30 epochs)"
    assert [line.split()[3] for line in lines[1:-1]] == ["6/30", "12/30", "18/30", "24/30", "30/30"]
    assert lines[-1].startswith("fpi lam=300: done in") and "nf_acc 0.900" in lines[-1]


def test_a_failed_run_is_one_line_with_the_library_error(caplog):
    from nfpi.errors import ConfigError

    progress = Progress(tty=False)
    with caplog.at_level(logging.INFO, logger="nfpi.progress"):
        progress.start("t1", "gd", epochs=2)
        wrapped = RuntimeError("Training failed")
        wrapped.__cause__ = ConfigError("optim.lr", -1.0, "a finite float > 0")
        progress.fail("t1", wrapped, "/tmp/error.txt")
    line = caplog.records[-1].getMessage()
    assert line.startswith("gd: FAILED: config field 'optim.lr'") and "/tmp/error.txt" in line


def _label(config, trial_id):
    return f"label {config['x']}"


def _epochs(config):
    return 3


def test_the_sweep_callback_survives_tune_s_pickling():
    """Tune saves the run config (and its callbacks) for --resume."""
    callback = SweepProgress(functools.partial(_label), functools.partial(_epochs))
    callback.progress.start("a", "x", 3)
    again = pickle.loads(pickle.dumps(callback))
    assert again.label({"x": 1}, "t") == "label 1" and again.progress._runs == {}
