"""Progress bars and log output: terminal vs plain lines, quiet, log lines through bars, ranks."""

from __future__ import annotations

import io
import logging
import subprocess
import sys

import pytest

from protoquant import distributed, progress

LOG = logging.getLogger("protoquant.test_progress")


class Terminal(io.StringIO):
    """A captured stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch):
    """Each test starts as a library user would (no configure) and leaves logging as it found it."""
    logger = logging.getLogger(progress.LOGGER_NAME)
    handlers, level = list(logger.handlers), logger.level
    monkeypatch.setattr(progress, "_settings", progress._Settings())
    monkeypatch.setattr(progress, "_open", [])
    monkeypatch.delenv("RANK", raising=False)
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


def lines_of(text: str) -> list[str]:
    return text.splitlines()


def test_terminal_bar_stays_when_done_and_shows_eta():
    stream = Terminal()
    progress.configure(progress.NORMAL, stream=stream)
    assert list(progress.bar(range(5), desc="work", unit="step")) == list(range(5))
    out = stream.getvalue()
    final = out.split("\r")[-1]  # what is left on screen
    assert "\r" in out and out.endswith("\n")
    assert final.startswith("work: 100%") and "5/5" in final and "<" in final  # elapsed<remaining


def test_plain_output_is_whole_lines_without_control_characters():
    stream = io.StringIO()
    progress.configure(progress.NORMAL, stream=stream)
    assert list(progress.bar(range(50), desc="work", unit="step")) == list(range(50))
    out = stream.getvalue()
    assert "\r" not in out and "\x1b" not in out and out.endswith("\n")
    lines = lines_of(out)
    assert lines[0] == "work: start (50 step)"
    assert lines[-1].startswith("work: 100%") and "50/50" in lines[-1]


def test_plain_lines_are_rate_limited(monkeypatch):
    stream, now = io.StringIO(), [0.0]
    monkeypatch.setattr(progress, "_clock", lambda: now[0])
    progress.configure(progress.NORMAL, stream=stream)
    for _ in progress.bar(range(100), desc="fast", unit="step"):
        pass  # no time passes: only the start and end lines
    assert len(lines_of(stream.getvalue())) == 2
    stream.seek(0), stream.truncate()
    for _ in progress.bar(range(100), desc="slow", unit="step"):
        now[0] += progress.PLAIN_MIN_SECONDS  # every step is long enough: one line per percent step
    steps = int(100 / progress.PLAIN_PERCENT_STEP)
    assert len(lines_of(stream.getvalue())) == 1 + (steps - 1) + 1  # start, in between, end


def test_plain_heartbeat_without_a_total(monkeypatch):
    stream, now = io.StringIO(), [0.0]
    monkeypatch.setattr(progress, "_clock", lambda: now[0])
    progress.configure(progress.NORMAL, stream=stream)
    for _ in progress.bar((i for i in range(3)), desc="open", unit="step"):
        now[0] += progress.PLAIN_HEARTBEAT_SECONDS
    lines = lines_of(stream.getvalue())
    assert lines[0] == "open: start" and len(lines) == 1 + 3 + 1  # a heartbeat per step, then the end
    assert "\r" not in stream.getvalue()


def test_postfix_shows_in_the_final_line():
    stream = io.StringIO()
    progress.configure(progress.NORMAL, stream=stream)
    epochs = progress.bar(range(2), desc="stage", unit="epoch")
    for epoch in epochs:
        epochs.set_postfix(val=0.25 * (epoch + 1))
    assert lines_of(stream.getvalue())[-1].endswith("val=0.5]")


@pytest.mark.parametrize("stream", [Terminal(), io.StringIO()], ids=["terminal", "plain"])
def test_quiet_prints_only_errors(stream):
    progress.configure(progress.QUIET, stream=stream)
    for _ in progress.bar(range(3), desc="work"):
        LOG.info("an info line")
        LOG.warning("a warning")
    assert stream.getvalue() == ""
    LOG.error("it broke")
    (line,) = lines_of(stream.getvalue())
    assert line.endswith("it broke")


def test_verbose_shows_info_and_normal_hides_it():
    stream = io.StringIO()
    progress.configure(progress.NORMAL, stream=stream)
    LOG.info("hidden")
    LOG.warning("shown")
    progress.configure(progress.VERBOSE, stream=stream)
    LOG.info("every epoch")
    out = stream.getvalue()
    assert "hidden" not in out and "shown" in out and "every epoch" in out


@pytest.mark.parametrize("stream", [Terminal(), io.StringIO()], ids=["terminal", "plain"])
def test_log_lines_during_a_bar_come_out_whole(stream):
    progress.configure(progress.VERBOSE, stream=stream)
    for epoch in progress.bar(range(4), desc="training", unit="epoch"):
        LOG.info("epoch %d finished", epoch)
    pieces = [line.split("\r")[-1] for line in lines_of(stream.getvalue())]  # as each line ends on screen
    for epoch in range(4):
        (piece,) = [p for p in pieces if f"epoch {epoch} finished" in p]
        assert piece.endswith(f"INFO {LOG.name}: epoch {epoch} finished")  # the log format, nothing after
        assert "training" not in piece  # no part of the bar on the log line
    assert pieces[-1].startswith("training: 100%")


def test_configure_is_idempotent_and_leaves_the_root_logger_alone():
    stream, root = io.StringIO(), logging.getLogger()
    root_handlers = list(root.handlers)
    progress.configure(progress.NORMAL, stream=stream)
    progress.configure(progress.NORMAL, stream=stream)
    owned = [h for h in logging.getLogger(progress.LOGGER_NAME).handlers if getattr(h, "protoquant_bars", 0)]
    assert len(owned) == 1 and root.handlers == root_handlers
    LOG.warning("once")
    assert stream.getvalue().count("once") == 1


def test_verbosity_is_clamped():
    progress.configure(5, stream=io.StringIO())
    assert logging.getLogger(progress.LOGGER_NAME).level == logging.INFO
    progress.configure(-5, stream=io.StringIO())
    assert logging.getLogger(progress.LOGGER_NAME).level == logging.ERROR


def test_other_ranks_show_no_bar(monkeypatch):
    stream = Terminal()
    progress.configure(progress.NORMAL, stream=stream)
    monkeypatch.setenv("RANK", "1")  # torchrun, before the process group exists
    list(progress.bar(range(3), desc="work"))
    assert stream.getvalue() == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "context", lambda: distributed.Context(rank=1, world_size=2))
    list(progress.bar(range(3), desc="work"))
    assert stream.getvalue() == ""  # the process group's rank wins over the environment
    monkeypatch.setattr(distributed, "context", lambda: distributed.Context(rank=0, world_size=2))
    list(progress.bar(range(3), desc="work"))
    assert "work: 100%" in stream.getvalue()


def test_inner_bars_are_cleared_and_quiet_in_plain_output():
    terminal = Terminal()
    progress.configure(progress.NORMAL, stream=terminal)
    outer = progress.bar(range(2), desc="outer")
    inner = progress.bar(range(2), desc="inner")
    assert outer.leave and not inner.leave
    inner.close(), outer.close()
    plain = io.StringIO()
    progress.configure(progress.NORMAL, stream=plain)
    for _ in progress.bar(range(2), desc="outer"):
        list(progress.bar(range(5), desc="inner"))
    assert "inner" not in plain.getvalue() and len(lines_of(plain.getvalue())) == 2


def test_manual_bar_counts_updates():
    stream = io.StringIO()
    progress.configure(progress.NORMAL, stream=stream)
    with progress.bar(total=10, desc="caching", unit="img") as images:
        for _ in range(5):
            images.update(2)
    assert "10/10" in lines_of(stream.getvalue())[-1] and "img/s" in lines_of(stream.getvalue())[-1]


def test_library_use_without_configure_writes_to_stderr_only(capsys):
    for _ in progress.bar(range(3), desc="library loop"):
        pass
    captured = capsys.readouterr()
    assert captured.out == "" and "library loop: 100%" in captured.err


def test_import_loads_neither_torch_nor_protoquant_modules():
    code = (
        "import sys, protoquant; before = set(sys.modules); import protoquant.progress; "
        "print(sorted(m for m in set(sys.modules) - before if m.startswith(('torch', 'protoquant'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['protoquant.progress']"
