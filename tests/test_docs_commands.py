"""Every command shown in README.md and docs/*.md parses (issue 21): each ``python -m nfpi ...``
and ``python <script>.py ...`` in a shell block or an inline code span is run through its entry
point's own argument parser, which stops right after parsing (nothing runs). A sweep command is
also run with ``--plan`` where ``ray_jobs/sweep.py`` offers it (the trial plan, validated against
the search space; a dataset path the docs only name may be absent here)."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import runpy
import shlex
from pathlib import Path

import pytest

from nfpi.entry import run_cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(?:bash|sh|shell|console)\n(.*?)```", re.DOTALL)
INLINE = re.compile(r"(?<!`)`((?:\.venv/bin/)?python3? [^`]+)`(?!`)")


class _Parsed(Exception):
    """Raised by the patched ``parse_args`` once a command line has parsed."""


def _segments(text: str) -> list[list[str]]:
    """The shell commands of ``text`` as token lists (comments, ``&&``/``;``/``|``/``&`` split)."""
    text = text.replace("\\\n", " ")
    text = re.sub(r"<[^<>\n]+>", "X", text)  # placeholders: <flow run>, <script>
    out = []
    for line in text.splitlines():
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote in prose-like lines: not a command
            continue
        part: list[str] = []
        for token in [*tokens, "&&"]:
            if token in ("&&", ";", "|", "||", "&"):
                if part:
                    out.append(part)
                part = []
            else:
                part.append(token.rstrip(";&"))
    return out


def _command(tokens: list[str]) -> tuple[str, list[str]] | None:
    """``(entry point, argv)`` of a command line that runs this project's code, else None."""
    for i, token in enumerate(tokens):
        if not re.fullmatch(r"(?:.*/)?python3?", token) or i + 1 >= len(tokens):
            continue
        rest = tokens[i + 1 :]
        if rest[:2] == ["-m", "nfpi"]:
            return "nfpi", rest[2:]
        if rest[0].endswith(".py"):
            return rest[0], rest[1:]
    return None


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, entry point, argv)`` of every project command in the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        blocks = [m.group(1) for m in FENCE.finditer(text)]
        spans = [m.group(1) for m in INLINE.finditer(FENCE.sub("", text))]
        for chunk, inline in [(b, False) for b in blocks] + [(s, True) for s in spans]:
            for tokens in _segments(chunk.replace("\n", " ") if inline else chunk):
                command = _command(tokens)
                if command is None or (inline and _names_only(*command)):
                    continue
                found.append((doc.name, *command))
    return found


def _names_only(entry: str, argv: list[str]) -> bool:
    """Prose that names an entry point or a subcommand (`python -m nfpi downstream`, `python -m
    nfpi ...`) rather than showing a command line."""
    return argv in ([], ["..."]) or (entry == "nfpi" and len(argv) == 1 and argv[0].isalpha())


def _main_of(entry: str):
    if entry == "nfpi":
        from nfpi.cli import main

        return main
    path = ROOT / entry
    assert path.is_file(), f"{entry}: no such script"
    return runpy.run_path(str(path), run_name="docs_check").get("main")


def _parses(main, argv: list[str]) -> argparse.Namespace:
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_only
    try:
        main(argv)
    except _Parsed as parsed:
        return parsed.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("the entry point returned without parsing its arguments")


COMMANDS = doc_commands()


def test_the_docs_show_commands_of_every_entry_point():
    entries = {entry for _, entry, _ in COMMANDS}
    assert {"nfpi", "ray_jobs/sweep.py", "ray_jobs/train.py", "ray_jobs/figures.py"} <= entries
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(
    ("where", "entry", "argv"),
    COMMANDS,
    ids=[f"{w}:{' '.join([e, *a])[:60]}" for w, e, a in COMMANDS],
)
def test_every_command_in_the_docs_parses(where, entry, argv):
    main = _main_of(entry)
    if main is None:  # a script without main(argv): that it exists is all we can check here
        return
    _parses(main, argv)
    if entry == "ray_jobs/sweep.py" and "--plan" in _help_of(main):
        err = io.StringIO()
        code = run_cli(main, [*argv, "--plan"], prog=entry, stderr=err)
        # A path the docs only name (/data/cifar100, a model file) may be absent here: that
        # one-line refusal is the plan's check working, not a broken command.
        missing = ("not found", "does not exist", "no such", "data.root", "pretrained_path")
        assert code == 0 or (code == 2 and any(m in err.getvalue().lower() for m in missing)), (
            err.getvalue()
        )


def _help_of(main) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    return out.getvalue()
