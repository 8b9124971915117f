"""What every case shares: the command runner, the outcome classes and the checks of a result.

A case gets a fresh folder (`Workspace.dir`), runs `python -m protoquant ...` there as a
subprocess and turns what happened into one `Outcome`. `judge` applies the rules in order:
a complete checkpoint that no longer loads is `data lost`; "Traceback" in stderr, or a
`protoquant: internal error:` line (a crash reported without its traceback), is `traceback`;
a failed exit is a `named error` when stderr ends with a `protoquant: error:` message naming
what the case expects, else an `unclear error`; a clean exit is the case's success word
(`repaired` / `handled`) when the case's result check passes, else `silent wrong`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAMED, UNCLEAR, TRACEBACK, SILENT, LOST = (
    "named error",
    "unclear error",
    "traceback",
    "silent wrong",
    "data lost",
)
REPAIRED, HANDLED, HANG = "repaired", "handled", "hang"
OUTCOMES = (REPAIRED, HANDLED, NAMED, UNCLEAR, TRACEBACK, SILENT, LOST, HANG)
ERROR_PREFIX = "protoquant: error:"
CRASH_PREFIX = "protoquant: internal error:"  # an unexpected exception, reported in one line
COMMAND_TIMEOUT = 240  # seconds one command may take before it counts as a hang
IGNORED_METRICS = ("timing",)  # metrics.json sections that differ between identical runs
TOLERANCE = 1e-4  # relative tolerance of metric floats against the reference run


def entry_module() -> str:
    """`protoquant` when `python -m protoquant` works, else the CLI package it would run."""
    return "protoquant" if importlib.util.find_spec("protoquant.__main__") else "protoquant.cli"


@dataclass(frozen=True)
class Proc:
    """One finished command: its exit status and output (rc None: killed by the harness)."""

    args: list[str]
    rc: int | None
    stdout: str
    stderr: str
    seconds: float


@dataclass(frozen=True)
class Outcome:
    outcome: str
    message: str
    detail: str = ""


@dataclass(frozen=True)
class Case:
    """One row of the matrix: `run` builds the situation in a workspace and judges it."""

    name: str
    kind: str
    run: Callable[[Workspace], Outcome]
    accept: tuple[str, ...] = (NAMED,)


def child_env(folder: Path) -> dict[str, str]:
    """The environment of every command: offline, one thread, a cache below the case's folder."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PROTOQUANT_CACHE": str(folder / "cache"),
        "PYTHONUNBUFFERED": "1",
    }


@dataclass
class Workspace:
    """A case's own folder, the shared references, and the command runner."""

    dir: Path
    refs: Any
    module: str = field(default_factory=entry_module)

    def argv(self, args: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", self.module, *args]

    def cli(self, args: Sequence[str], *, timeout: float = COMMAND_TIMEOUT) -> Proc:
        """Run `python -m protoquant ARGS` in the case folder and wait for it."""
        start = time.perf_counter()
        popen = self.start(args)
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            out, err = popen.communicate()
            return Proc(list(args), None, out, err + "\n[harness] timed out", time.perf_counter() - start)
        return Proc(list(args), popen.returncode, out, err, time.perf_counter() - start)

    def start(self, args: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start the command in its own process group (so a kill reaches its workers too)."""
        return subprocess.Popen(
            self.argv(args),
            cwd=self.dir,
            env=child_env(self.dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
            **kwargs,
        )

    def copy_run(self, reference: Path) -> Path:
        """Copy a reference folder's contents (its `run/` and its cache, wherever that lies) here.

        Returns the copied `run/` folder.
        """
        for entry in reference.iterdir():
            if entry.is_dir():
                shutil.copytree(entry, self.dir / entry.name, symlinks=True, dirs_exist_ok=True)
            else:
                shutil.copy2(entry, self.dir / entry.name)
        return self.dir / "run"

    def copy(self, source: Path, name: str | None = None) -> Path:
        """Copy a reference folder into the workspace (under its own name unless `name`)."""
        target = self.dir / (name or source.name)
        shutil.copytree(source, target, symlinks=True)
        return target


def error_block(stderr: str) -> str | None:
    """The trailing `protoquant: error:` message (with its indented lines), or None."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].startswith(ERROR_PREFIX):
            rest = lines[index + 1 :]
            return "\n".join(lines[index:]) if all(line[:1].isspace() for line in rest) else None
    return None


def traceback_line(stderr: str) -> str:
    """The internal-error line, or the exception line closing the last traceback in `stderr`."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    crash = [line for line in lines if line.startswith(CRASH_PREFIX)]
    if crash:
        return crash[-1]
    after = lines[max(i for i, line in enumerate(lines) if "Traceback" in line) :]
    exception = [line for line in after if line[:1] not in (" ", "\t") and "Traceback" not in line]
    return exception[-1] if exception else after[-1]


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def judge(
    proc: Proc,
    *,
    names: Sequence[str] = (),
    check: Callable[[], str | None] | None = None,
    success: str = HANDLED,
    lost: Callable[[], str | None] | None = None,
) -> Outcome:
    """Classify a finished command (see the module docstring).

    names: any one of these (case-insensitive) must appear in the error message.
    check: on exit 0, returns why the result is wrong, or None when it is right.
    lost: returns why a previously complete checkpoint or run is gone, or None.
    """
    reason = lost() if lost else None
    if reason:
        return Outcome(LOST, reason, last_line(proc.stderr))
    if proc.rc is None:
        return Outcome(HANG, f"no exit after {proc.seconds:.0f} s", last_line(proc.stderr))
    if "Traceback" in proc.stderr or CRASH_PREFIX in proc.stderr:
        return Outcome(TRACEBACK, traceback_line(proc.stderr), f"exit {proc.rc}")
    if proc.rc != 0:
        block = error_block(proc.stderr)
        if block is None:
            return Outcome(
                UNCLEAR, last_line(proc.stderr) or f"exit {proc.rc}, no message", f"exit {proc.rc}"
            )
        named = not names or any(name.lower() in block.lower() for name in names)
        detail = f"exit {proc.rc}" + ("" if named else f"; expected one of {list(names)}")
        return Outcome(NAMED if named else UNCLEAR, block.splitlines()[0], detail)
    wrong = check() if check else None
    if wrong:
        return Outcome(SILENT, wrong, last_line(proc.stderr))
    return Outcome(success, "exit 0, result checked", "")


def strict_json(text: str) -> Any:
    """json.loads refusing NaN and infinities (ValueError)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"non-finite number {constant} in JSON output")

    return json.loads(text, parse_constant=refuse)


def json_problem(text: str, keys: Sequence[str] = ()) -> str | None:
    """Why `text` is not one strict JSON document with `keys`, or None."""
    try:
        document = strict_json(text)
    except ValueError as err:
        return f"--json output is not strict JSON: {str(err)[:80]}"
    missing = [key for key in keys if not isinstance(document, dict) or key not in document]
    return f"--json output lacks {missing}" if missing else None


def cache_folders(root: Path) -> dict[str, Path]:
    """Every feature-cache folder below `root` (one holding a manifest.json), by relative path."""
    return {
        str(manifest.parent.relative_to(root)): manifest.parent
        for manifest in sorted(root.rglob("manifest.json"))
        if "model" not in manifest.parent.relative_to(root).parts
    }


def leftovers(folder: Path) -> list[str]:
    """Temporary files (`.*.tmp-*`) anywhere below `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*.tmp-*"))


def _close(a: Any, b: Any, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where}: keys {sorted(set(a) ^ set(b))} differ"
        return next((p for k in a if (p := _close(a[k], b[k], f"{where}.{k}"))), None)
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where}: length {len(a)} != {len(b)}"
        return next((p for i, (x, y) in enumerate(zip(a, b)) if (p := _close(x, y, f"{where}[{i}]"))), None)
    if isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, int | float) and isinstance(b, int | float)) or math.isnan(a) or math.isnan(b):
            return f"{where}: {a} vs reference {b}"
        return (
            None if math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=1e-6) else f"{where}: {a} vs reference {b}"
        )
    return None if a == b else f"{where}: {a!r} vs reference {b!r}"


def metrics_problem(path: Path, reference: dict) -> str | None:
    """Why the metrics file at `path` is missing, unreadable or not the reference's, or None."""
    try:
        metrics = strict_json(path.read_text())
    except (OSError, ValueError) as err:
        return f"{path.name}: {str(err)[:80]}"
    strip = {k: v for k, v in metrics.items() if k not in IGNORED_METRICS}
    return _close(strip, {k: v for k, v in reference.items() if k not in IGNORED_METRICS}, "metrics")


def finite_metrics_problem(path: Path) -> str | None:
    """Why the metrics file at `path` is unreadable, not strict JSON or lacks a test accuracy."""
    try:
        metrics = strict_json(path.read_text())
    except (OSError, ValueError) as err:
        return f"{path.name}: {str(err)[:80]}"
    accuracy = metrics.get("protoquant", {}).get("test_accuracy")
    return None if isinstance(accuracy, int | float) else f"{path.name}: test accuracy {accuracy!r}"


def unloadable(model: Path) -> str | None:
    """Why the checkpoint folder `model` does not load, or None."""
    from protoquant.model import ProtoQuant

    try:
        ProtoQuant.load(model)
    except Exception as err:  # noqa: BLE001 - any failure means the checkpoint is lost
        return f"{model.name} no longer loads: {type(err).__name__}: {str(err)[:80]}"
    return None


def first_problem(*checks: Callable[[], str | None]) -> str | None:
    """The first non-None answer of `checks` (each runs only if the earlier ones passed)."""
    return next((problem for check in checks if (problem := check())), None)
