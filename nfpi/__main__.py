"""``python -m nfpi``: the command line of :mod:`nfpi.cli` (train, config, downstream)."""

import sys

from nfpi.cli import main

if __name__ == "__main__":
    sys.exit(main())
