import sys

from nfpi.cli import main

sys.exit(main())
