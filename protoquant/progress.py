"""Progress bars and log output for everything a person waits for.

`bar(...)` wraps every loop that takes long enough to wait on. What it shows depends on where
the output goes:

- a terminal (or a notebook): a tqdm bar with rate and ETA that stays on screen when done; a
  bar opened inside another one (an inner loop) is cleared when it ends;
- anything else (a file, CI, SLURM): whole lines, no carriage return, no escape codes: one when a
  loop starts, one when it ends, and in between one per PLAIN_PERCENT_STEP % done or per
  PLAIN_HEARTBEAT_SECONDS, never more often than PLAIN_MIN_SECONDS;
- quiet, or a process other than rank 0 under torchrun: nothing.

`configure(verbosity)` is the one switch the command line turns: QUIET (-1) errors only,
NORMAL (0) bars and warnings, VERBOSE (1) also info lines (every epoch). It sends the
"protoquant" logger through a handler that writes between bar redraws, so a log line never
cuts a bar. Without `configure` (library use) bars go to stderr and logging is left as the
application set it up.

This module imports neither torch nor the rest of protoquant when loaded: the drawing code uses it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from tqdm.std import tqdm

QUIET, NORMAL, VERBOSE = -1, 0, 1
_LEVELS = {QUIET: logging.ERROR, NORMAL: logging.WARNING, VERBOSE: logging.INFO}
LOGGER_NAME = "protoquant"  # the package logger; module loggers are its children
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PLAIN_PERCENT_STEP = 10.0  # plain output: a line each time this many more percent are done ...
PLAIN_HEARTBEAT_SECONDS = 60.0  # ... or after this long without a line (also when the total is unknown)
PLAIN_MIN_SECONDS = 2.0  # ... percent lines at most this often: a loop of seconds prints start and end only

_clock = time.monotonic  # seconds; a module attribute so tests can step time by hand


@dataclass
class _Settings:
    verbosity: int = NORMAL
    stream: IO[str] | None = None  # None: sys.stderr as it is at the moment of writing


_settings = _Settings()
_open: list[Any] = []  # bars drawn now, outermost first (a bar opened while one is open is nested)


def _stream() -> IO[str]:
    return _settings.stream if _settings.stream is not None else sys.stderr


def is_terminal(stream: IO[str]) -> bool:
    """True when `stream` redraws a line in place: a terminal, or a Jupyter notebook's output."""
    try:
        if stream.isatty():
            return True
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    return type(stream).__module__.startswith("ipykernel")


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process."""
    if "torch.distributed" in sys.modules:  # a process group can only exist once torch is loaded
        from protoquant import distributed

        ctx = distributed.context()
        if ctx.distributed:
            return ctx.is_main
    return os.environ.get("RANK", "0") == "0"


class _TerminalBar(tqdm):
    """A tqdm bar that records itself as open while drawn."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _open.append(self)

    def close(self) -> None:
        if self in _open:
            _open.remove(self)
        super().close()


class LineBar:
    """Progress as whole lines (for a stream that is not a terminal), or silent when `stream` is None.

    Offers the part of tqdm's interface the loops use: iteration, `update`, `set_postfix`, `close`.
    """

    def __init__(
        self, iterable: Iterable | None, total: int | None, desc: str, unit: str, stream: IO[str] | None
    ):
        self.iterable, self.total, self.desc, self.unit, self.stream = iterable, total, desc, unit, stream
        self.n, self.postfix, self.closed = 0, "", False
        self.nested = bool(_open)  # an inner loop: heartbeat lines only, no start, end or percent lines
        self.start_time = self._last_time = _clock()
        self._last_n = 0
        if stream is None:
            return
        _open.append(self)
        if not self.nested:
            size = f" ({total} {unit})" if total is not None else ""
            self._write(f"{desc}: start{size}")

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Count `n` more done; write a line when one is due."""
        self.n += n
        if self.stream is None or (self.total and self.n >= self.total):
            return  # the end line is written by close()
        now = _clock()
        since = now - self._last_time
        step = self.total * PLAIN_PERCENT_STEP / 100 if self.total else None
        by_percent = step and not self.nested and self.n - self._last_n >= step and since >= PLAIN_MIN_SECONDS
        if by_percent or since >= PLAIN_HEARTBEAT_SECONDS:
            self._status(now)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Show `key=value` after the counts (numbers shortened as tqdm does)."""
        shown = {k: tqdm.format_num(v) if isinstance(v, (int, float)) else str(v) for k, v in values.items()}
        self.postfix = ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))

    def close(self) -> None:
        """Finish: the end line (with elapsed time and rate) unless silent or nested."""
        if self.closed:
            return
        self.closed = True
        if self in _open:
            _open.remove(self)
        if self.stream is not None and not self.nested:
            self._status(_clock())

    def _status(self, now: float) -> None:
        self._last_time, self._last_n = now, self.n
        elapsed = now - self.start_time
        line = tqdm.format_meter(
            self.n, self.total, elapsed, ncols=0, prefix=self.desc, unit=self.unit, postfix=self.postfix
        )
        self._write(line)

    def _write(self, line: str) -> None:
        tqdm.write(line, file=self.stream)
        getattr(self.stream, "flush", lambda: None)()


def bar(
    iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "it"
) -> tqdm | LineBar:
    """Progress over `iterable` (or over `total` steps counted with `.update(n)`).

    Use as `for x in bar(xs, desc=...)`, or keep the bar to call `set_postfix(val=...)` and
    `update(n)`; a bar used without iterating must be closed (`with bar(...) as b:` does it).
    `total` defaults to `len(iterable)` where there is one.
    """
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    stream = _stream()
    if _settings.verbosity <= QUIET or not _is_main_process():
        return LineBar(iterable, total, desc, unit, None)
    if not is_terminal(stream):
        return LineBar(iterable, total, desc, unit, stream)
    leave = not _open  # the outermost bar stays; an inner one is cleared when it ends
    return _TerminalBar(
        iterable, total=total, desc=desc, unit=unit, file=stream, leave=leave, dynamic_ncols=True
    )


class _BarHandler(logging.Handler):
    """Writes each log record as one line between bar redraws, to the stream the bars use."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = _stream()
            tqdm.write(self.format(record), file=stream)
            getattr(stream, "flush", lambda: None)()
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def configure(verbosity: int, *, stream: IO[str] | None = None) -> None:
    """Set how much protoquant prints: QUIET (-1), NORMAL (0) or VERBOSE (1).

    Installs one handler on the "protoquant" logger (calling again only updates the settings)
    and leaves the root logger alone. Records still propagate to any handler the application
    put on the root logger.

    Args:
        verbosity: clamped to [QUIET, VERBOSE].
        stream: where bars and log lines go; None for sys.stderr (looked up at each write).
    """
    verbosity = max(QUIET, min(VERBOSE, verbosity))
    _settings.verbosity, _settings.stream = verbosity, stream
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(_LEVELS[verbosity])
    if not any(getattr(h, "protoquant_bars", False) for h in logger.handlers):
        handler = _BarHandler()
        handler.protoquant_bars = True  # marks the handler configure() owns (found again by the next call)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
