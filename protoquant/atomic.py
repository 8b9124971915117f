"""Crash-safe writes: files and whole folders become visible complete or not at all.

Temporary entries sit beside their target as `.NAME.tmp-PID-HOST` (being written) and
`.NAME.old-PID-HOST` (the replaced folder, on systems without an atomic exchange), so a killed
process leaves them behind under its own PID and machine. `recover` puts back a folder that a
kill left moved aside, `clean_leftovers` removes the entries of processes of this machine that
are no longer alive (another machine's, on a shared file system, are left alone).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
RENAME_EXCHANGE = 2  # <linux/fs.h>: swap two existing paths in one step
UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP)  # no exchange on this kernel or filesystem
LEFTOVER = re.compile(  # a temporary entry; one without a host is taken to be this machine's
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-(?P<host>[A-Za-z0-9_-]+))?(?:\.npy)?$"
)


def host_token() -> str:
    """This machine's name, reduced to the characters a temporary entry's name may carry."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temporary_path(target: Path, kind: str = "tmp", suffix: str = "") -> Path:
    """`target`'s sibling `.NAME.KIND-PID-HOST[suffix]` (KIND 'tmp' or 'old') of this process."""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{host_token()}{suffix}")


def fsync_path(path: Path) -> None:
    """Flush one file or folder to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (itself included) to disk."""
    for root, _, files in os.walk(folder, topdown=False):  # a folder after its entries
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def write_file_atomic(
    path: str | Path, write: Callable[[Path], None], *, suffix: str = "", durable: bool = True
) -> None:
    """`write(tmp)` on a temporary sibling of `path`, then rename it over `path`; a failure removes it.

    `durable` flushes the file before the rename and the folder after it (off for files whose
    damage a checksum reveals anyway, such as cache shards).
    """
    path = Path(path)
    tmp = temporary_path(path, suffix=suffix)
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (see `write_file_atomic`)."""
    write_file_atomic(path, lambda tmp: tmp.write_bytes(data))


def sha256_file(path: Path) -> str:
    """sha256 hex digest of the file at `path`, read in 1 MiB blocks (what hashlib.file_digest
    does, which needs Python 3.11)."""
    digest, block = hashlib.sha256(), bytearray(1 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(block):
            digest.update(view[:size])
    return digest.hexdigest()


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON, written atomically.

    Raises:
        ValueError: `obj` holds NaN or infinity (JSON has no such numbers; nothing is written).
    """
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: {err}; store missing values as null") from err
    write_bytes_atomic(path, text.encode())


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """One JSON document per line, written atomically.

    Raises:
        ValueError: a row holds NaN or infinity (nothing is written).
    """
    try:
        lines = [json.dumps(row, allow_nan=False) + "\n" for row in rows]
    except ValueError as err:
        raise ValueError(f"{path}: {err}; store missing values as null") from err
    write_bytes_atomic(path, "".join(lines).encode())


def _exchange(first: Path, second: Path) -> None:
    """Swap two existing paths atomically (Linux renameat2).

    Raises:
        OSError: with errno in UNSUPPORTED where the system cannot exchange, else the failure.
    """
    renameat2 = (
        getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    )
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"cannot exchange {first} and {second}: {os.strerror(code)}")


def replace_folder(staged: str | Path, target: str | Path) -> None:
    """Move the complete folder `staged` to `target`, replacing any folder there.

    A kill at any moment leaves `target` old or new and complete (or, on systems without an
    atomic exchange, briefly moved to `.NAME.old-PID`, which `recover` puts back).
    """
    staged, target = Path(staged), Path(target)
    if not target.exists():
        os.rename(staged, target)
    else:
        try:
            _exchange(staged, target)
            old = staged  # the previous target now sits at the staged path
        except OSError as err:
            if err.errno not in UNSUPPORTED:
                raise
            old = temporary_path(target, "old")
            os.rename(target, old)
            os.rename(staged, target)
        fsync_path(target.parent)
        shutil.rmtree(old)
    fsync_path(target.parent)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine runs (an unknown owner's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _dead_owner(match: re.Match) -> bool:
    """Whether the process that named a temporary entry (LEFTOVER match) is gone for certain."""
    return match["host"] in (None, host_token()) and not pid_alive(int(match["pid"]))


def _leftovers(folder: Path, name: str | None = None, kind: str = "") -> list[Path]:
    """Temporary entries in `folder` of dead processes: of `name` (or of any) and of one kind (or both)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = LEFTOVER.match(entry.name)
        if match and name in (None, match["name"]) and kind in ("", match["kind"]) and _dead_owner(match):
            found.append(entry)
    return found


def recover(target: str | Path) -> bool:
    """Put back a folder a killed `replace_folder` left at `.NAME.old-PID`; True if it did.

    Only when `target` is missing and that process is dead (a live one is still replacing it).
    """
    target = Path(target)
    if target.exists():
        return False
    for old in _leftovers(target.parent, target.name, "old"):
        os.rename(old, target)
        fsync_path(target.parent)
        return True
    return False


def clean_leftovers(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove `folder`'s `.NAME.tmp-*` and `.NAME.old-*` entries (of any NAME when None) left by
    dead processes of this machine.

    Entries of live processes (this one included) and of other machines are kept. Returns the
    removed paths.
    """
    removed = []
    for entry in _leftovers(Path(folder), name):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        removed.append(entry)
    return removed


def link_tree(source: Path, target: Path) -> None:
    """Recreate `source` (file, symlink or folder) at `target` with hard links; copy what cannot link."""
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir()
        for entry in source.iterdir():
            link_tree(entry, target / entry.name)
    else:
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


def carry_entries(source: Path, target: Path, *, skip: tuple[str, ...]) -> list[str]:
    """Hard-link the entries of folder `source` into folder `target`, except those named in `skip`
    and their temporary entries (`.NAME.tmp-PID...`, `.NAME.old-PID...`).

    Returns the carried names. Raises FileExistsError when `target` already holds one of them.
    """

    def skipped(name: str) -> bool:
        match = LEFTOVER.match(name)
        return name in skip or (match is not None and match["name"] in skip)

    carried = sorted(entry.name for entry in source.iterdir() if not skipped(entry.name))
    for name in carried:
        link_tree(source / name, target / name)
    return carried


def file_hashes(folder: Path) -> dict[str, str]:
    """{path relative to `folder` ('/'-separated): sha256} of every file under `folder`, sorted."""
    hashes = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        hashes[path.relative_to(folder).as_posix()] = sha256_file(path)
    return hashes
