"""`python -m protoquant ...`: the command line (the same as `protoquant ...`)."""

import sys

from protoquant.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
