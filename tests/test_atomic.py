"""Crash-safe writes: atomic files, folder replacement with and without an exchange, recovery of
what a kill left, cleaning of dead processes' leftovers, a checkpoint save killed midway; and the
absolute paths a run records (its folder, the feature cache's)."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import protoquant.model
from protoquant import atomic
from protoquant.atomic import (
    carry_entries,
    clean_leftovers,
    file_hashes,
    recover,
    replace_folder,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_jsonl_atomic,
)
from protoquant.config import BackboneConfig, CacheConfig, RunConfig
from protoquant.gallery_files import model_hash
from protoquant.head import ProtoQuantHead
from protoquant.model import ProtoQuant
from protoquant.paths import cache_root
from protoquant.pipeline import resolve_run_config

KILL_WAIT = 20.0  # seconds a killed child may take to reach its pause


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def contents(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def siblings(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()} - {path.name}


def test_write_bytes_atomic_replaces_and_leaves_nothing_else(tmp_path) -> None:
    path = tmp_path / "a.bin"
    write_bytes_atomic(path, b"old")
    write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize("size", [0, 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) - 7])  # around the block
def test_sha256_file_is_the_digest_of_the_whole_file(tmp_path, size) -> None:
    data = torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(size)).byte().numpy()
    path = tmp_path / "f.bin"
    path.write_bytes(data.tobytes())
    assert sha256_file(path) == hashlib.sha256(data.tobytes()).hexdigest()


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_json_writers_refuse_nan_and_keep_the_old_file(tmp_path, value) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"accuracy": 0.5, "missing": None})
    with pytest.raises(ValueError, match="metrics.json: Out of range float"):
        write_json_atomic(path, {"accuracy": value})
    with pytest.raises(ValueError, match="history.jsonl: Out of range float"):
        write_jsonl_atomic(tmp_path / "history.jsonl", [{"loss": 1.0}, {"loss": value}])
    assert json.loads(path.read_text()) == {"accuracy": 0.5, "missing": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def exchange_supported(tmp_path: Path) -> bool:
    first, second = tmp_path / "probe1", tmp_path / "probe2"
    first.mkdir(), second.mkdir()
    try:
        atomic._exchange(first, second)
    except OSError as err:
        if err.errno in atomic.UNSUPPORTED:
            return False
        raise
    finally:
        first.rmdir(), second.rmdir()
    return True


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_folder_swaps_in_the_new_folder(tmp_path, monkeypatch, exchange) -> None:
    if exchange and not exchange_supported(tmp_path):
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE)")
    renames = []
    monkeypatch.setattr(atomic.os, "rename", lambda *a: renames.append(a) or os.replace(*a))
    if not exchange:
        unsupported = OSError(errno.EINVAL, "no exchange here")
        monkeypatch.setattr(atomic, "_exchange", lambda *a: (_ for _ in ()).throw(unsupported))
    target = folder(tmp_path / "run", {"model/a": "old", "notes": "old"})
    staged = folder(tmp_path / ".run.tmp-1", {"model/a": "new", "model/b": "new"})
    inode = staged.stat().st_ino
    replace_folder(staged, target)
    assert contents(target) == {"model/a": "new", "model/b": "new"} and target.stat().st_ino == inode
    assert siblings(target) == set()  # the old folder is removed, wherever it was moved
    assert len(renames) == (0 if exchange else 2)


def test_replace_folder_into_a_missing_target_renames(tmp_path) -> None:
    staged = folder(tmp_path / ".run.tmp-1", {"a": "new"})
    replace_folder(staged, tmp_path / "run")
    assert contents(tmp_path / "run") == {"a": "new"} and siblings(tmp_path / "run") == set()


def test_an_exchange_failure_other_than_unsupported_is_raised(tmp_path, monkeypatch) -> None:
    failure = OSError(errno.EXDEV, "another filesystem")
    monkeypatch.setattr(atomic, "_exchange", lambda *a: (_ for _ in ()).throw(failure))
    target, staged = folder(tmp_path / "run", {"a": "old"}), folder(tmp_path / ".run.tmp-1", {"a": "new"})
    with pytest.raises(OSError, match="another filesystem"):
        replace_folder(staged, target)
    assert contents(target) == {"a": "old"} and contents(staged) == {"a": "new"}


def test_recover_puts_back_only_a_dead_process_s_folder(tmp_path) -> None:
    target = tmp_path / "run"
    live = folder(tmp_path / f".run.old-{os.getpid()}", {"a": "live"})
    assert not recover(target) and live.is_dir() and not target.exists()  # still being replaced
    live.rename(tmp_path / f".run.old-{dead_pid()}")
    assert recover(target) and contents(target) == {"a": "live"} and siblings(target) == set()
    folder(tmp_path / f".run.old-{dead_pid()}", {"a": "older"})
    assert not recover(target) and contents(target) == {"a": "live"}  # the target exists: untouched


def test_clean_leftovers_removes_dead_entries_of_that_name_only(tmp_path) -> None:
    dead, live = dead_pid(), os.getpid()
    names = [f".run.tmp-{dead}", f".run.old-{dead}", f".run.tmp-{dead}.npy", f".run.tmp-{live}"]
    names += [f".other.tmp-{dead}", "run", ".run.tmp-x"]
    for name in names[:2]:
        folder(tmp_path / name, {"f": "x"})
    for name in names[2:]:
        (tmp_path / name).write_text("x")
    removed = clean_leftovers(tmp_path, "run")
    assert sorted(p.name for p in removed) == sorted(names[:3])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])
    assert clean_leftovers(tmp_path / "missing", "run") == []


def test_carry_entries_links_what_is_not_skipped(tmp_path) -> None:
    source = folder(tmp_path / "run", {"model/a": "old", "notes.txt": "mine", "report/index.html": "r"})
    folder(source, {".model.tmp-1/a": "half", ".model.old-2/a": "older", ".notes.txt.tmp-3": "mine"})
    target = folder(tmp_path / "new", {"model/a": "new"})
    assert carry_entries(source, target, skip=("model",)) == [".notes.txt.tmp-3", "notes.txt", "report"]
    (target / ".notes.txt.tmp-3").unlink()
    assert contents(target) == {"model/a": "new", "notes.txt": "mine", "report/index.html": "r"}
    assert (target / "notes.txt").stat().st_ino == (source / "notes.txt").stat().st_ino
    assert set(file_hashes(target)) == {"model/a", "notes.txt", "report/index.html"}


def tiny_model(backbone, seed: int) -> ProtoQuant:
    codebook = torch.randn(8, backbone.info.channels, generator=torch.Generator().manual_seed(seed))
    config = RunConfig(backbone=BackboneConfig(name="timm/test_convnext", weights="none", image_size=64))
    return ProtoQuant(backbone, ProtoQuantHead(codebook, 3), ("a", "b", "c"), config)


def pause_then_save(model: ProtoQuant, path: Path, where: str, ready) -> None:
    """In a forked child: save `model` to `path`, pausing (for the kill) at `where`."""
    torch.set_num_threads(1)
    real = {"rename": os.rename, "rmtree": atomic.shutil.rmtree}

    def pause(*_):
        ready.set()
        time.sleep(60)

    calls = []
    if where == "between_renames":  # the fallback: target moved aside, staged not yet in place
        atomic._exchange = lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSYS, "none"))
        atomic.os.rename = lambda *a: (
            calls.append(a),
            pause() if len(calls) == 2 else None,
            real["rename"](*a),
        )
    elif where == "before_removing_old":  # exchanged; the old checkpoint (now at the tmp path) kept
        atomic.shutil.rmtree = lambda p, *a, **k: (Path(p).exists() and pause(), real["rmtree"](p, *a, **k))
    elif where == "writing":  # the temporary folder written, not yet flushed nor swapped in
        protoquant.model.fsync_tree = pause
    model.save(path)
    os._exit(0)


@pytest.mark.parametrize("where", ["writing", "between_renames", "before_removing_old"])
def test_a_killed_save_leaves_the_old_or_the_new_checkpoint(convnext, tmp_path, where) -> None:
    old, new = tiny_model(convnext, 0), tiny_model(convnext, 1)
    path = old.save(tmp_path / "model")
    before = file_hashes(path)
    context = multiprocessing.get_context("fork")
    ready = context.Event()
    child = context.Process(target=pause_then_save, args=(new, path, where, ready))
    child.start()
    assert ready.wait(KILL_WAIT), f"the save never reached '{where}'"
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    if where == "between_renames":
        assert not path.exists()  # only here the checkpoint is briefly missing: recover puts it back
        assert recover(path)
    expected = new if where == "before_removing_old" else old
    assert model_hash(ProtoQuant.load(path, backbone=convnext)) == model_hash(expected)
    if expected is old:
        assert file_hashes(path) == before
    assert siblings(path)  # the killed save's leftovers, until the next save cleans them
    new.save(path)
    assert siblings(path) == set()
    assert model_hash(ProtoQuant.load(path, backbone=convnext)) == model_hash(new)


def test_cache_root_is_the_shared_default_or_an_absolute_root(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PROTOQUANT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(CacheConfig()) == tmp_path / "xdg" / "protoquant" / "features"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root(CacheConfig()) == tmp_path / "home" / ".cache" / "protoquant" / "features"
    monkeypatch.setenv("PROTOQUANT_CACHE", "shared/features")
    assert cache_root(CacheConfig()) == tmp_path / "shared" / "features"
    assert cache_root(CacheConfig(root="../mine")) == tmp_path.parent / "mine"


def test_a_run_records_absolute_paths_made_once(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = resolve_run_config(RunConfig(out="runs/a", cache=CacheConfig(root="features")))
    assert (config.out, config.cache.root) == (str(tmp_path / "runs" / "a"), str(tmp_path / "features"))
    monkeypatch.chdir(tmp_path / "..")
    assert resolve_run_config(config) == config  # already absolute: the working directory no longer matters
    assert resolve_run_config(RunConfig()).cache.root == ""  # the default cache of whoever reads it
