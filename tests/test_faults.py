"""Kills at any moment of a training run leave the run folder absent or complete, never mixed.

A tiny `protoquant train` runs once to completion (the reference); then runs started over a
folder that holds a complete earlier run are SIGKILLed at seeded random moments (caching, each
stage, the final write), at the moment the staging folder appears, once it is fully written
(paused there just before the swap, so the moment cannot be missed), and between the two renames
of a folder replacement. After each kill the folder is checked
(absent or complete: outputs.json hashes match, the model loads and has the recorded hash, the
user's file survives), then a rerun must complete with the reference metrics. A reader polling
the folder during unkilled runs must never see a mixed or half-written state.

The killed runs are forked from this process (`protoquant.cli.main` in the child), so that they
start without paying the imports again; the reference is a fresh `python -m protoquant.cli`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm  # noqa: F401  (imported here, like the two below: the forked runs start without imports)

import protoquant.atomic as atomic
import protoquant.demo  # noqa: F401  (the summary table; it imports matplotlib)
import protoquant.pipeline  # noqa: F401
import protoquant.run_folder as run_folder
from protoquant.atomic import file_hashes, host_token, recover
from protoquant.cli import main
from protoquant.gallery_files import model_hash
from protoquant.model import ProtoQuant
from protoquant.run_folder import OUTPUTS_FILE, RUN_ENTRIES

FLAGS = [
    "--backbone.name", "timm/test_convnext", "--backbone.weights", "none", "--backbone.image_size", "64",
    "--data.synthetic_classes", "2", "--data.synthetic_train_per_class", "4", "--data.synthetic_test_per_class", "2",
    "--cache.train_views", "2", "--cache.shard_size", "2", "--cache.batch_size", "2", "--cache.num_workers", "0",
    "--codebook.num_prototypes", "4", "--codebook.epochs", "2", "--codebook.kmeans_patches", "50",
    "--probe.epochs", "2", "--head.epochs", "2", "--head.temperature_grid", "", "--head.lr_grid", "",
    "--device", "cpu", "-q",
]  # fmt: skip
KILLS = 5  # seeded random kill moments, one per fifth of a run's wall time
USER_FILE = "notes.txt"  # a file of the user's in the run folder: every run must keep it
RUN_TIMEOUT = 120.0  # seconds any one run may take here
POLL = 0.0005  # seconds between looks at the folder


def run_entries(out: Path) -> dict[str, str]:
    """sha256 of the files a run writes (outputs.json aside), by path relative to `out`."""
    hashes = file_hashes(out)
    return {k: v for k, v in hashes.items() if k.split("/")[0] in RUN_ENTRIES and k != OUTPUTS_FILE}


def checked(out: Path) -> dict | None:
    """None when `out` is absent; else its metrics (timing dropped), after checking that the folder
    is complete and consistent: outputs.json lists exactly the run's files with their hashes, and
    metrics.json, outputs.json and the loaded model agree on the model hash."""
    if not out.exists():
        return None
    listing = json.loads((out / OUTPUTS_FILE).read_text())
    assert run_entries(out) == listing["files"], f"{out}: files differ from {OUTPUTS_FILE}"
    metrics = json.loads((out / "metrics.json").read_text())
    loaded = model_hash(ProtoQuant.load(out / "model"))
    assert metrics["model_hash"] == listing["model_hash"] == loaded, f"{out}: model hashes differ"
    assert (out / USER_FILE).read_text() == USER_FILE
    return {k: v for k, v in metrics.items() if k != "timing"}


def fork_run(out: Path, cache: Path, patch=None) -> int:
    """Start `protoquant train` into `out` in a forked child (after `patch()` there); its PID."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ["PROTOQUANT_CACHE"] = str(cache)
            if patch is not None:
                patch()
            code = main(["train", "--out", str(out), *FLAGS])
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = RUN_TIMEOUT) -> int:
    """The exit status of child `pid` (killed with SIGKILL after `timeout` seconds: an error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"run {pid} did not finish within {timeout} s")


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


class Reader(threading.Thread):
    """Polls `out` until stopped; every look must find it absent or complete (pinned by a folder fd,
    so a look that straddles a swap is recognised and repeated rather than mistaken)."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out, self.stop, self.errors, self.complete = out, threading.Event(), [], 0

    def look(self) -> None:
        try:
            fd = os.open(self.out, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            return
        try:
            problem = self.problem(fd)
            if problem and not self.moved(fd):
                self.errors.append(problem)
            self.complete += not problem
        finally:
            os.close(fd)

    def moved(self, fd: int) -> bool:
        """Whether the folder open as `fd` is no longer the one at `out` (swapped or removed)."""
        try:
            return os.fstat(fd).st_nlink == 0 or os.fstat(fd).st_ino != os.stat(self.out).st_ino
        except FileNotFoundError:
            return True

    def problem(self, fd: int) -> str:
        """What is wrong with the run folder open as `fd` ('' when it is complete)."""
        try:
            listing = json.loads(read(fd, OUTPUTS_FILE))
            for name, digest in listing["files"].items():
                if atomic.hashlib.sha256(read(fd, name)).hexdigest() != digest:
                    return f"{name} does not match {OUTPUTS_FILE}"
            if json.loads(read(fd, "metrics.json"))["model_hash"] != listing["model_hash"]:
                return "metrics.json belongs to another model"
        except (OSError, ValueError) as err:
            return f"{type(err).__name__}: {err}"
        return ""

    def run(self) -> None:
        while not self.stop.is_set():
            self.look()
            time.sleep(POLL)
        self.look()  # once more after the run: the finished folder


def read(fd: int, name: str) -> bytes:
    with open(os.open(name, os.O_RDONLY, dir_fd=fd), "rb") as handle:
        return handle.read()


def watched(out: Path, start) -> Reader:
    """Run `start()` (returns a child PID) and wait for it while a Reader polls `out`."""
    reader = Reader(out)
    pid = start()
    reader.start()
    try:
        assert wait(pid) == 0
    finally:
        reader.stop.set()
        reader.join()
    assert not reader.errors, reader.errors[:3]
    return reader


@dataclass(frozen=True)
class Reference:
    metrics: dict  # of the complete run, timing dropped
    folder: Path  # a complete earlier run, with the user's file
    seconds: float  # wall time of a forked run that builds its cache
    cache: Path  # that run's (complete) feature cache


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """A fresh `python -m protoquant.cli train`, then a forked run over its folder, both watched."""
    base = tmp_path_factory.mktemp("faults")
    env = {**os.environ, "PROTOQUANT_CACHE": str(base / "cache"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "protoquant.cli", "train", "--out", str(base / "ref"), *FLAGS]
    reader = Reader(base / "ref")
    reader.start()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    finally:
        reader.stop.set()
        reader.join()
    assert done.returncode == 0, done.stderr
    assert not reader.errors and reader.complete, reader.errors[:3]
    assert any((base / "cache").iterdir())  # cache.root '': the features went to $PROTOQUANT_CACHE
    (base / "ref" / USER_FILE).write_text(USER_FILE)
    metrics = checked(base / "ref")
    start = time.perf_counter()  # an earlier run over the reference: its wall time sets the kills'
    reader = watched(base / "ref", lambda: fork_run(base / "ref", base / "cache2"))
    assert checked(base / "ref") == metrics and reader.complete
    return Reference(metrics, base / "ref", time.perf_counter() - start, base / "cache2")


def over_earlier_run(reference: Reference, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the complete earlier run (with the user's file and what a killed `save` into its
    model folder left there) and its files' hashes."""
    out = tmp_path / "out"
    shutil.copytree(reference.folder, out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    (out / f".model.tmp-{int(dead.stdout)}").mkdir()
    return out, run_entries(out)


def after_kill(reference: Reference, out: Path, before: dict[str, str], cache: Path) -> None:
    """The folder is the earlier run or a complete new one; a rerun then gives the reference metrics."""
    metrics = checked(out)
    if metrics is None:  # only between the two renames of the fallback: the next run puts it back
        assert recover(out)
        metrics = checked(out)
    assert run_entries(out) == before or metrics == reference.metrics
    watched(out, lambda: fork_run(out, cache))
    assert checked(out) == reference.metrics
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # nor inside it


@pytest.mark.parametrize("seed", range(KILLS))
def test_a_run_killed_at_a_random_moment_leaves_a_complete_folder(reference, tmp_path, seed) -> None:
    out, before = over_earlier_run(reference, tmp_path)
    moment = reference.seconds * (seed + random.Random(seed).random()) / KILLS
    pid = fork_run(out, tmp_path / "cache")  # a cache of its own: kills land while it is built too
    time.sleep(moment)
    kill(pid)
    after_kill(reference, out, before, tmp_path / "cache")


def test_a_run_killed_as_its_staging_folder_appears_keeps_the_earlier_run(reference, tmp_path) -> None:
    out, before = over_earlier_run(reference, tmp_path)
    pid = fork_run(out, reference.cache)
    staging = out.with_name(f".{out.name}.tmp-{pid}-{host_token()}")
    deadline = time.monotonic() + RUN_TIMEOUT
    while not staging.is_dir():
        assert time.monotonic() < deadline and not os.waitpid(pid, os.WNOHANG)[0], "no staging seen"
        time.sleep(POLL / 5)
    kill(pid)
    assert staging.is_dir() and run_entries(out) == before  # killed before the swap
    after_kill(reference, out, before, reference.cache)


def kill_when_paused(pid: int, folder: Path) -> None:
    """Kill child `pid` once it has created `folder/.paused` (a patch's pause), and remove the mark."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (folder / ".paused").exists():
        assert time.monotonic() < deadline and not os.waitpid(pid, os.WNOHANG)[0], "never paused"
        time.sleep(POLL)
    kill(pid)
    (folder / ".paused").unlink()


def pause_before_swap() -> None:
    """A patch for the forked child: once its staging folder is complete (outputs.json written
    and flushed), the swap into place creates `.paused` beside it and sleeps until killed."""
    real = run_folder.replace_folder

    def paused(staged, target) -> None:
        Path(staged).parent.joinpath(".paused").touch()
        time.sleep(RUN_TIMEOUT)
        real(staged, target)

    run_folder.replace_folder = paused


def test_a_run_killed_with_its_staging_folder_complete_keeps_the_earlier_run(reference, tmp_path) -> None:
    out, before = over_earlier_run(reference, tmp_path)
    pid = fork_run(out, reference.cache, pause_before_swap)
    kill_when_paused(pid, tmp_path)
    staging = out.with_name(f".{out.name}.tmp-{pid}-{host_token()}")
    assert (staging / OUTPUTS_FILE).is_file() and run_entries(out) == before  # killed before the swap
    after_kill(reference, out, before, reference.cache)


def pause_at(name: str):
    """A patch for the forked child: `os.rename` or `shutil.rmtree` (`name`) of the staging folder
    `.out.tmp-PID` creates `.paused` beside it and sleeps until killed. With the exchange made
    unsupported, the rename of the staging folder is the second of the fallback (out is then at
    `.out.old-PID`); with it, the removal is of the earlier run swapped out to the staging path."""

    def patch() -> None:
        module = atomic.os if name == "rename" else atomic.shutil
        real = getattr(module, name)

        def paused(path, *args, **kwargs):
            if Path(path).name.startswith(".out.tmp-") and Path(path).exists():
                Path(path).parent.joinpath(".paused").touch()
                time.sleep(RUN_TIMEOUT)
            return real(path, *args, **kwargs)

        if name == "rename":
            atomic._exchange = lambda *a: (_ for _ in ()).throw(OSError(atomic.errno.ENOSYS, "none"))
        setattr(module, name, paused)

    return patch


@pytest.mark.parametrize("name", ["rename", "rmtree"])
def test_a_run_killed_inside_replace_folder_is_recovered(reference, tmp_path, name) -> None:
    out, before = over_earlier_run(reference, tmp_path)
    pid = fork_run(out, reference.cache, pause_at(name))
    kill_when_paused(pid, tmp_path)
    leftovers = {p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")}
    tag = f"{pid}-{host_token()}"
    assert leftovers == {f".out.tmp-{tag}", *([f".out.old-{tag}"] if name == "rename" else [])}
    after_kill(reference, out, before, reference.cache)
