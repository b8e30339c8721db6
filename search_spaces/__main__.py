"""The catalogue of spaces and named experiments, generated from the code.

    python -m search_spaces                  # print it (markdown)
    python -m search_spaces --write docs/spaces.md

``docs/spaces.md`` is this output; ``tests/search_spaces/test_catalogue.py`` fails when the two differ, so the
list a user reads is the list the code has.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from search_spaces import catalogue_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search_spaces", description=__doc__)
    parser.add_argument("--write", metavar="PATH", help="write the catalogue to PATH")
    args = parser.parse_args(argv)
    text = catalogue_markdown()
    if args.write:
        Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
