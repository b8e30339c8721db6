"""Each rule is written once (issue 20, part 5): the global batch's split across workers, the
list of prior methods, the device choice, and the Ray flags' defaults. Every test pairs the
behaviour with a scan of the source that fails if the rule is restated somewhere else."""

import argparse
import ast
import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch

from nfpi.checks import check_batch_split, preflight
from nfpi.config import ExperimentConfig, PriorConfig
from nfpi.errors import ConfigError
from nfpi.presets import experiment_config

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(
    p
    for folder in ("nfpi", "ray_jobs", "search_spaces", "benchmarks", "rehearsals")
    for p in (ROOT / folder).rglob("*.py")
)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- the batch's split across workers ---------------------------------------------------------


def test_check_batch_split():
    check_batch_split(128, 4)
    check_batch_split(128, 0)  # Ray Train's local mode: one process
    check_batch_split(7, 1)
    with pytest.raises(ConfigError, match=r"optim.batch_size.*128.*number of workers \(3\)"):
        check_batch_split(128, 3)


def test_every_entry_refuses_an_uneven_split_with_the_same_message(tmp_path, monkeypatch):
    from nfpi.training import loop
    from ray_jobs.settings import RaySettings
    from ray_jobs.train import run_experiment

    config = experiment_config("smoke", {"optim.batch_size": 32, "eval.plots": False})
    with pytest.raises(ConfigError) as expected:
        check_batch_split(32, 3)
    with pytest.raises(ConfigError) as from_preflight:
        preflight(config, num_workers=3)
    # A Ray run refuses it before Ray is touched (no cluster is connected in this test).
    with pytest.raises(ConfigError) as from_ray:
        run_experiment(config, RaySettings(results_dir=tmp_path / "r", num_workers=3), "run")
    # The loop, as rank 0 of 3 workers, refuses it before reading any data.
    monkeypatch.setattr(loop, "world", lambda: (0, 3))
    with pytest.raises(ConfigError) as from_loop:
        loop.Trainer(config, tmp_path / "run")
    for got in (from_preflight, from_ray, from_loop):
        assert str(got.value) == str(expected.value)


def test_the_batch_split_rule_is_written_once():
    split = re.compile(r"batch_size\s*%(?!\s*2\b)")  # `% 2`: mixup's even batch, another rule
    restated = [
        _rel(p) for p in SOURCES if p != ROOT / "nfpi" / "checks.py" and split.search(p.read_text())
    ]
    assert restated == [], f"use nfpi.checks.check_batch_split instead: {restated}"


# --- the prior methods ------------------------------------------------------------------------


def test_the_prior_methods_are_one_tuple_read_by_the_config_and_the_service():
    from nfpi.prior import PRIOR_METHODS, PriorService

    assert PRIOR_METHODS == ("data-init", "gd", "fpi")
    hints = typing.get_type_hints(PriorConfig)
    assert typing.get_args(hints["method"]) == PRIOR_METHODS
    with pytest.raises(ConfigError, match=re.escape(str(PRIOR_METHODS))):
        PriorService("em", 3, 2)
    with pytest.raises(ConfigError, match="prior.method"):
        ExperimentConfig.from_dict({"prior": {"method": "em"}})


def test_the_table1_comparison_and_the_benchmarks_use_the_one_tuple():
    from nfpi.prior import PRIOR_METHODS
    from search_spaces import prior_comparison

    space = prior_comparison("x", "Table 1", "digits")
    grid = space.params["variant"]["grid_search"]
    assert [v["prior.method"] for v in grid] == list(PRIOR_METHODS)


def _string_collections(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
            yield node.lineno, values
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Tuple):
            values = {e.value for e in node.slice.elts if isinstance(e, ast.Constant)}
            yield node.lineno, values


def test_the_list_of_prior_methods_is_written_once():
    methods = {"data-init", "gd", "fpi"}
    home = ROOT / "nfpi" / "prior" / "service.py"
    restated = [
        f"{_rel(p)}:{line}"
        for p in SOURCES
        if p != home
        for line, values in _string_collections(ast.parse(p.read_text()))
        if methods <= values
    ]
    assert restated == [], f"use nfpi.prior.PRIOR_METHODS instead: {restated}"


# --- the device choice ------------------------------------------------------------------------


def test_one_device_choice_for_the_loop_the_classifier_and_the_cli():
    from nfpi.device import resolve_device
    from nfpi.downstream import classifier
    from nfpi.training import distributed

    assert classifier.resolve_device is resolve_device
    assert distributed.resolve_device is resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_without_a_gpu_is_a_named_error():
    from nfpi.device import resolve_device

    with pytest.raises(ConfigError, match="'device' = 'cuda'.*no CUDA device"):
        resolve_device("cuda")


def test_the_device_choice_is_written_once():
    defined = [
        f"{_rel(p)}:{node.lineno}"
        for p in SOURCES
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") == "resolve_device"
    ]
    assert len(defined) == 1 and defined[0].startswith("nfpi/device.py:"), defined


# --- the Ray flags' defaults ------------------------------------------------------------------


def _common_parser() -> argparse.ArgumentParser:
    from ray_jobs.settings import add_common_args

    parser = argparse.ArgumentParser()
    add_common_args(parser)
    return parser


def test_the_ray_flags_default_to_the_settings_defaults(tmp_path):
    from ray_jobs.settings import RaySettings

    args = _common_parser().parse_args(["--results-dir", str(tmp_path), "--tracking-uri", ""])
    got = RaySettings.from_args(args)
    want = RaySettings(results_dir=tmp_path, tracking=got.tracking)
    assert got == want


def test_the_ray_flags_defaults_are_read_from_the_dataclass(monkeypatch):
    """A changed default in ``RaySettings`` reaches the command line (nothing restates it)."""
    from ray_jobs.settings import RaySettings

    by_name = {f.name: f for f in dataclasses.fields(RaySettings)}
    changed = {
        "num_workers": 5,
        "cpus_per_worker": 0.5,
        "max_failures": 3,
        "actor_timeout": 12.0,
        "placement_strategy": "SPREAD",
        "prior_actor_node": "any",
    }
    for name, value in changed.items():
        monkeypatch.setattr(by_name[name], "default", value)
    args = _common_parser().parse_args([])
    assert {name: getattr(args, name) for name in changed} == changed
