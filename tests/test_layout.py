"""Guards of the codebase's shape: the library imports neither Ray nor MLflow, downstream uses
the checkpoint module rather than the training loop, ray_jobs does not import the CLI, every
package states what it owns, and every entry point has a smoke mode that the suite runs."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import nfpi

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(nfpi.__path__, "nfpi."))


@pytest.mark.slow  # imports every module in a subprocess
def test_every_library_module_imports_with_ray_and_mlflow_blocked():
    code = (
        "import importlib, sys\n"
        "sys.modules['ray'] = None\n"  # any `import ray` (or `from ray...`) now raises
        "sys.modules['mlflow'] = None\n"
        f"for name in {MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "loaded = {m.split('.')[0] for m, mod in sys.modules.items() if mod is not None}\n"
        "assert not loaded & {'ray', 'mlflow'}, loaded & {'ray', 'mlflow'}\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(MODULES) > 30  # the walk found the package (a broken walk would pass vacuously)


@pytest.mark.slow  # imports the service in a subprocess
def test_a_train_worker_does_not_import_torchvision_timm_or_sklearn():
    """Every Ray Train worker, trial and controller process imports ``ray_jobs.train``; the image
    libraries are imported where images are read, augmented or classified (torchvision alone
    took ~1.5 s of each worker's start-up, torch._dynamo through torchvision.ops)."""
    code = (
        "import sys, ray_jobs.train\n"
        "heavy = {'torchvision', 'timm', 'sklearn', 'torch._dynamo'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
        cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("nfpi/downstream", ("nfpi.training", "nfpi.cli")),
        ("nfpi/prior", ("nfpi.training", "nfpi.downstream", "nfpi.checkpoint", "nfpi.cli")),
        ("nfpi/flows", ("nfpi.training", "nfpi.downstream", "nfpi.prior", "nfpi.cli")),
        ("nfpi/data", ("nfpi.training", "nfpi.downstream", "nfpi.prior", "nfpi.cli")),
        ("nfpi/training", ("nfpi.downstream", "nfpi.cli")),
        ("ray_jobs", ("nfpi.cli", "rehearsals")),
        ("rehearsals", ("nfpi.cli",)),
    ],
)
def test_layers_import_only_downwards(folder, forbidden):
    for path in sorted((ROOT / folder).rglob("*.py")):
        bad = {m for m in _imports(path) if m.startswith(forbidden)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("package", ["nfpi", *[m for m in MODULES if m.count(".") == 1]])
def test_every_package_and_module_says_what_it_owns(package):
    doc = importlib.import_module(package).__doc__
    assert doc and len(doc.split()) >= 8, f"{package} needs a docstring saying what it owns"


def test_no_module_switches_matplotlib_backend_at_import():
    for path in sorted((ROOT / "nfpi").rglob("*.py")):
        text = path.read_text()
        assert "matplotlib.use(" not in text and "import matplotlib.pyplot" not in text, path
