"""``python -m nfpi``: the command line of :mod:`nfpi.cli` (train, config, downstream)."""

import sys

from nfpi.cli import run

if __name__ == "__main__":
    sys.exit(run())
