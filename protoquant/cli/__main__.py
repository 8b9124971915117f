"""`python -m protoquant.cli ...` (also what torchrun runs with `-m protoquant.cli`)."""

import sys

from protoquant.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
