"""docs/robustness.md names tests; each must exist, and those it calls slow must be marked."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tests(path):
    tree = ast.parse(path.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            marks = {
                d.attr if isinstance(d, ast.Attribute) else getattr(d, "func", d).attr
                for d in node.decorator_list
                if isinstance(d, (ast.Attribute, ast.Call))
                and isinstance(getattr(d, "func", d), ast.Attribute)
            }
            found[node.name] = marks
    return found


def test_every_test_the_robustness_table_names_exists_with_its_marks():
    text = (ROOT / "docs" / "robustness.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "tests/" in line]
    assert len(rows) >= 20
    for row in rows:
        for file, name, note in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`(?: \(([\w, ]+)\))?", row):
            tests = _tests(ROOT / file)
            assert name in tests, f"{file}::{name} named in docs/robustness.md does not exist"
            for mark in filter(None, (note or "").replace(" ", "").split(",")):
                assert mark in tests[name], f"{file}::{name} is not marked {mark}"
