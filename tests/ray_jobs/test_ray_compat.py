"""Ray's private API, reached only through ``ray_jobs/_ray_compat.py``: every name it uses still
exists in the installed Ray (a failure names the Ray version and what moved), and no other
module imports Ray's private modules."""

import ast
import importlib
import sys
import types
from pathlib import Path

import pytest
import ray

from ray_jobs import _ray_compat

ROOT = Path(__file__).resolve().parents[2]
COMPAT = ROOT / "ray_jobs" / "_ray_compat.py"
PRIVATE_PREFIXES = ("ray._private", "ray.autoscaler._private", "ray.train.v2._internal")


def test_every_private_name_the_service_uses_exists_in_the_installed_ray():
    gone = _ray_compat.missing()
    assert gone == [], (
        f"Ray {ray.__version__} no longer has {gone}: ray_jobs/_ray_compat.py was written "
        "against Ray 2.60; find where they moved (or a public replacement) and update it there"
    )


def test_the_check_names_what_moved(monkeypatch):
    """The check can fail: a Ray without the controller callback module, and one whose
    ``FailureDecision`` lost ``RETRY``, are both reported by name."""
    name = "ray.train.v2._internal.execution.callback"
    monkeypatch.setitem(sys.modules, name, None)  # `import` of it now raises ImportError
    assert {f"{name}.ControllerCallback", f"{name}.WorkerGroupCallback"} <= set(
        _ray_compat.missing()
    )
    monkeypatch.undo()
    name = "ray.train.v2._internal.execution.failure_handling"
    real = importlib.import_module(name)
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(FailureDecision=object))
    assert _ray_compat.missing() == [f"{name}.FailureDecision.RETRY"]
    monkeypatch.undo()
    assert _ray_compat.missing() == []
    assert real.FailureDecision.RETRY  # the real one is untouched


def test_the_adapter_serves_what_the_service_needs():
    assert _ray_compat.local_cpus() >= 1
    assert issubclass(_ray_compat.user_exception_type(), BaseException)
    assert len(_ray_compat.fake_head_node_id()) == 56  # a Ray node id: 28 bytes in hex
    with pytest.raises(Exception, match="cluster_name|required"):
        _ray_compat.validate_config({"provider": {"type": "aws"}})


def _private_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)  # mock.patch("ray._private...") targets
        elif isinstance(node, ast.Attribute) and node.attr in ("_private", "_internal"):
            names.add(f"ray.{node.attr}")  # ray._private.x attribute access
    return {n for n in names if n.startswith(PRIVATE_PREFIXES)}


def test_no_module_but_the_adapter_touches_rays_private_api():
    folders = ("nfpi", "ray_jobs", "search_spaces", "benchmarks", "rehearsals", "tests")
    offenders = {
        str(path.relative_to(ROOT)): sorted(found)
        for folder in folders
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path not in (COMPAT, Path(__file__).resolve()) and (found := _private_imports(path))
    }
    assert offenders == {}, "reach Ray's private API through ray_jobs/_ray_compat.py"
