"""Progress bars and log output for everything a person waits for.

`configure(verbosity)` is the one switch the command line turns: -1 quiet (errors only),
0 normal, 1 verbose.
"""

from __future__ import annotations

import logging

QUIET, NORMAL, VERBOSE = -1, 0, 1
_LEVELS = {QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.INFO}


def configure(verbosity: int) -> None:
    """Set how much protoquant prints: QUIET (-1), NORMAL (0) or VERBOSE (1)."""
    logging.basicConfig(
        level=_LEVELS[max(QUIET, min(VERBOSE, verbosity))], format="%(asctime)s %(name)s: %(message)s"
    )
