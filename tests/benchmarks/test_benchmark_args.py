"""Every flag a benchmark's ``--help`` offers is exercised: parsed in every listed combination
(fast), run end to end at smoke-test size where its path differs from the plain ``--smoke-test``
of ``tests/test_benchmarks.py`` (slow tier), and refused with one line where the input is bad.

:data:`COMBOS` lists the combinations per script; a flag added to a script without a combination
here fails :func:`test_every_flag_has_a_combination`, so new flags get covered.
``{tmp}`` in a combination is a fresh temporary directory.
"""

import argparse
import importlib
import shlex
from pathlib import Path

import pytest

from tests.benchmarks.conftest import concurrent_runs

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if not p.name.startswith("_"))

# (kind, arguments): "run" = end to end in a subprocess (slow tier, smoke sizes); "parse" = parsed
# only (the path runs minutes, needs a GPU, or is the plain smoke test the other file runs).
COMBOS: dict[str, list[tuple[str, str]]] = {
    "table1_digits": [
        # Without --curves only the last epoch is evaluated (issue 23's KeyError 'nf_acc'): run
        # in process by test_table1_digits_without_curves_keeps_the_last_epoch.
        ("parse", "--smoke-test --epochs 2 --methods data-init"),
        (
            "run",
            (
                "--smoke-test --epochs 2 --curves --seeds 1 --methods gd --policies linear "
                "--gd-steps 1 --set prior.objective.lam=300 --record {tmp}/p.json"
            ),
        ),
        ("parse", "--quick --device cpu"),
    ],
    "digits_tables": [
        (
            "run",
            (
                "--smoke-test --tables 2 --lambdas 0,1 --first-seed 1 --seeds 1 --epochs 1 "
                "--set flow.hidden=4 --out {tmp}/r.json --record {tmp}/p.json"
            ),
        ),
        ("parse", "--quick --tables 3"),
    ],
    "pixel_baselines": [
        (
            "run",
            (
                "--smoke-test --datasets digits --models lda,gnb --pca 2,3 --sizes 16 "
                "--record {tmp}/p.json"
            ),
        ),
        ("parse", "--quick --data {tmp}/x.tar.gz --datasets cifar10 --sizes 16,32"),
        # --flow runs in process on a trained run: test_pixel_baselines_on_a_flows_latents
        ("parse", "--smoke-test --datasets digits --items-per-class 4 --flow {tmp}/run"),
    ],
    "cifar10_cpu": [
        (
            "run",
            (
                "--smoke-test --methods fpi,normflows-glow --first-seed 1 --no-mlflow "
                "--keep {tmp}/runs --set prior.resolve_every=0 --record {tmp}/p.json"
            ),
        ),
        (
            "run",
            (
                "--smoke-test --methods data-init --jobs 2 --threads 1 --seeds 2 --epochs 2 "
                "--tracking-uri sqlite:///{tmp}/m.db --set eval.every=2"
            ),
        ),
        ("parse", "--quick --data {tmp}/x.tar.gz --seeds 2 --epochs 2"),
    ],
    "cifar10_cpu_tables": [
        (
            "run",
            (
                "--smoke-test --tables 2,5 --lambdas 0 --seeds 1 --first-seed 1 --epochs 1 "
                "--cnn-per-class 2 --cnn-epochs 1 --t5-per-class 2 --t5-seeds 1 --jobs 1 "
                "--work {tmp}/w --set flow.hidden=4 --record {tmp}/p.json"
            ),
        ),
        ("parse", "--quick --data {tmp}/x.tar.gz --items-per-class 100 --tables 3"),
    ],
    "fpi_scaling": [
        (
            "parse",
            (
                "--smoke-test --threads 1 --budget-gb 0.1 --solve-repeats 1 --seed 1 --ks 4 --ds 8 "
                "--device cpu"
            ),
        ),
        ("parse", "--quick"),
    ],
    "golden_2d": [
        ("parse", "--smoke-test --data {tmp}/g.npz --threads 1 --device cpu"),
        ("parse", "--quick"),
    ],
    "loader_throughput": [
        ("parse", "--smoke-test --data {tmp}/t --cache {tmp}/c"),
        ("parse", "--quick"),
    ],
    "ray_overhead": [("parse", "--quick --device cpu")],
    "generation_throughput": [
        ("parse", "--smoke-test --threads 1 --device cpu"),
        ("parse", "--quick"),
    ],
    "augment_cost": [
        (
            "parse",
            (
                "--smoke-test --images 50 --flow tiny --model resnet10t --epochs 1 --batch 10 "
                "--threads 1 --pool-builder process --device cpu"
            ),
        ),
        ("parse", "--quick --pool-builder ray"),
    ],
    "train_throughput": [
        (
            "parse",
            (
                "--smoke-test --models tiny --batch 2 --steps 1 --warmup 0 --threads 1 --expm project "
                "--profile --compile --device cpu"
            ),
        ),
        # The compiled row end to end (it crashed in Inductor before the ELU stepped aside).
        ("run", "--smoke-test --compile-only --image-size 8 --hidden 4"),
        ("parse", "--quick"),
        (
            "parse",
            (
                "--smoke-test --models glow-small --image-size 16 --hidden 32 "
                "--invertible-backward --peer --only-extra"
            ),
        ),
        ("parse", "--smoke-test --only-extra --interleave 2 --record r.json"),
    ],
}
# Bad input refused before any work, with one line naming the flag (exit 2, no traceback).
ERRORS: list[tuple[str, str, str]] = [
    ("table1_digits", "--smoke-test --methods fpi,nope", "--methods"),
    ("table1_digits", "--smoke-test --policies nope", "--policies"),
    ("digits_tables", "--smoke-test --tables 4", "--tables"),
    ("digits_tables", "--smoke-test --lambdas 1,x", "--lambdas"),
    ("pixel_baselines", "--smoke-test --models svm", "--models"),
    ("pixel_baselines", "--datasets cifar10 --data /nonexistent/cifar.tar.gz", "--data"),
    ("cifar10_cpu", "--data /nonexistent/cifar.tar.gz", "--data"),
    ("cifar10_cpu", "--smoke-test --methods nope", "--methods"),
    ("cifar10_cpu_tables", "--smoke-test --tables 4", "--tables"),
    ("cifar10_cpu_tables", "--smoke-test --lambdas 1,x", "--lambdas"),
    ("cifar10_cpu_tables", "--smoke-test --t5-seeds 0", "--t5-seeds"),
    ("cifar10_cpu_tables", "--data /nonexistent/cifar.tar.gz", "--data"),
]


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return lambda name: importlib.import_module(name)


def _parser(module, monkeypatch) -> argparse.ArgumentParser:
    """The script's parser, captured when its ``main`` parses the command line."""

    def capture(self, args=None, namespace=None):
        raise _Parsed(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Parsed) as caught:
            module.main([])
    return caught.value.parser


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """The long flags ``--help`` shows (hidden worker flags left out)."""
    return {
        max(a.option_strings, key=len)
        for a in parser._actions
        if a.option_strings and a.help != argparse.SUPPRESS and "--help" not in a.option_strings
    }


def _argv(text: str, tmp: Path) -> list[str]:
    return shlex.split(text.format(tmp=tmp))


def test_every_script_has_combinations():
    assert sorted(COMBOS) == SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_a_combination(name, bench, monkeypatch):
    parser = _parser(bench(name), monkeypatch)
    used = {t.split("=")[0] for _, text in COMBOS[name] for t in shlex.split(text)}
    used |= {"--out", "--smoke-test"}  # tests/test_benchmarks.py runs these for every script
    missing = _flags(parser) - used
    assert not missing, f"{name}: flags without a combination in COMBOS: {sorted(missing)}"


@pytest.mark.parametrize(
    "name,text", [(n, t) for n, combos in COMBOS.items() for _, t in combos], ids=str
)
def test_combination_parses(name, text, bench, monkeypatch, tmp_path):
    parser = _parser(bench(name), monkeypatch)
    parser.parse_args(_argv(text, tmp_path))  # argparse exits 2 on a combination it refuses


RUNS = [(n, t) for n, combos in COMBOS.items() for kind, t in combos if kind == "run"]


@pytest.fixture(scope="module")
def combination_runs(request, tmp_path_factory):
    """``{(script, combination): Future of its run}`` for the selected combinations, each with
    a fresh ``{tmp}``, run two at a time (tests/benchmarks/conftest.py)."""

    def plan(params):
        name, text = params["name"], params["text"]
        tmp = tmp_path_factory.mktemp(name)
        return (name, text), BENCH / f"{name}.py", _argv(text, tmp)

    with concurrent_runs(request, {"test_combination_runs": plan}) as futures:
        yield futures


@pytest.mark.slow
@pytest.mark.parametrize("name,text", RUNS, ids=str)
def test_combination_runs(name, text, combination_runs):
    proc = combination_runs[name, text].result()
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_table1_digits_without_curves_keeps_the_last_epoch(bench, monkeypatch, tmp_path):
    """The regression of issue 23 in process: 2 epochs without --curves (eval.every = epochs, so
    the first epoch has no test metrics) gives one record with the last epoch's NF-Acc."""
    out = tmp_path / "r.json"
    module = bench("table1_digits")
    assert (
        module.main(["--smoke-test", "--epochs", "2", "--methods", "data-init", "--out", str(out)])
        == 0
    )
    import json

    (rec,) = json.loads(out.read_text())
    assert rec["method"] == "data-init" and rec["epochs"] == 2
    assert 0.0 <= rec["nf_acc"] <= 1.0


@pytest.mark.parametrize("name,text,flag", ERRORS, ids=str)
def test_bad_input_is_one_line(name, text, flag, bench, tmp_path, capsys):
    try:
        code = bench(name).main(_argv(text, tmp_path))
    except SystemExit as e:  # argparse's parser.error
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    assert flag in err.strip().splitlines()[-1], err


def test_device_cuda_without_a_gpu_is_refused(bench, monkeypatch):
    """Every script with ``--device`` refuses cuda up front when torch sees no GPU."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    checked = 0
    for name in SCRIPTS:
        module = bench(name)
        if "--device" not in _flags(_parser(module, monkeypatch)):
            continue
        with pytest.raises(SystemExit) as caught:
            module.main(["--smoke-test", "--device", "cuda"])
        assert "--device cuda" in str(caught.value.code), (name, caught.value.code)
        checked += 1
    assert checked >= 6


def test_write_published_keeps_commit_command_and_flat_records(bench, tmp_path):
    import json
    import re

    common = bench("_common")
    path = tmp_path / "t.json"
    common.write_published(path, [{"a": 1, "b": {"c": [1, 2]}}], argv=["benchmarks/x.py", "--q"])
    doc = json.loads(path.read_text())
    assert set(doc) == {"commit", "command", "date", "records"}
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", doc["commit"]), doc["commit"]
    assert doc["command"] == "python benchmarks/x.py --q"
    assert doc["records"] == [{"a": 1, "b.c": "[1, 2]"}]


@pytest.mark.slow
def test_pixel_baselines_on_a_flows_latents(checkpoint, bench, tmp_path):
    """``--flow RUN_DIR``: the models on the run's latents, and the run's own prior, whose test
    accuracy is the run's last NF-Acc (same latents, same dequantisation noise)."""
    import json

    out = tmp_path / "r.json"
    argv = ["--smoke-test", "--datasets", "digits", "--models", "gnb,qda", "--pca", "2"]
    assert bench("pixel_baselines").main([*argv, "--flow", str(checkpoint), "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    latents = {r["model"]: r for r in records if r["features"] == "latents"}
    assert set(latents) == {"gnb", "qda", "nf_prior"}
    assert {r["flow"] for r in latents.values()} == {f"{checkpoint.parent.name}/{checkpoint.name}"}
    last = json.loads((checkpoint / "metrics.jsonl").read_text().splitlines()[-1])
    assert latents["nf_prior"]["test_acc"] == last["nf_acc"]
    assert latents["nf_prior"]["test_n"] == latents["gnb"]["test_n"]  # the run's own test split
