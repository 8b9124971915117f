"""A damaged feature cache under a complete run, then `train` again on it.

Right means either an error naming the damaged file, or exit 0 with the damage repaired: the
reference's metrics, every cache folder's manifest and shard files byte-identical to the
reference cache's (the damaged shard recomputed, not read), no `.*.tmp-*` leftovers, and the
run's checkpoint loadable throughout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fault_cases.harness import (
    NAMED,
    REPAIRED,
    Case,
    Outcome,
    Workspace,
    cache_folders,
    first_problem,
    judge,
    leftovers,
    metrics_problem,
    unloadable,
)
from fault_cases.references import TINY

SHARD = "features-00001.npy"  # the shard most cases damage (the training cache has 4)
FLOAT16_NAN = b"\x00\x7e"  # little-endian float16 quiet NaN
FLOAT32_NAN = b"\x00\x00\xc0\x7f"


def train_cache(folder: Path) -> Path:
    """The training split's cache folder below a case's folder."""
    return next(p for p in cache_folders(folder).values() if p.name.startswith("synthetic-train-"))


def data_offset(path: Path) -> int:
    """Byte offset of the array data in an .npy file (after its header)."""
    with open(path, "rb") as handle:
        major, _ = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        read(handle)
        return handle.tell()


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)


def truncate(cache: Path) -> None:
    path = cache / SHARD
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bits(cache: Path) -> None:
    path = cache / SHARD
    data = bytearray(path.read_bytes())
    for position in range(data_offset(path) + 1, len(data), 97):  # a high bit of every ~50th value
        data[position] ^= 0x20
    path.write_bytes(bytes(data))


def nan_features(cache: Path) -> None:
    path = cache / SHARD
    _overwrite(path, data_offset(path), FLOAT16_NAN * 64)


def nan_pooled(cache: Path) -> None:
    path = cache / "pooled-00001.npy"
    _overwrite(path, data_offset(path), FLOAT32_NAN * 16)


def wrong_rows(cache: Path) -> None:
    path = cache / SHARD
    np.save(path, np.load(path)[:2])


def _manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(cache: Path) -> None:
        path = cache / "manifest.json"
        manifest = json.loads(path.read_text())
        edit(manifest)
        path.write_text(json.dumps(manifest))

    return apply


def _rotate_labels(manifest: dict) -> None:
    manifest["labels"] = [(label + 1) % len(manifest["classes"]) for label in manifest["labels"]]


def complete_but_missing(cache: Path) -> None:
    """A cache killed after two of its four shards, with "complete": true written into it."""
    for shard in (2, 3):
        for kind in ("features", "pooled"):
            (cache / f"{kind}-{shard:05d}.npy").unlink()
    log = cache / "written-rank0.jsonl"
    kept = [line for line in log.read_text().splitlines() if json.loads(line)["shard"] < 2]
    log.write_text("".join(line + "\n" for line in kept))
    _manifest(lambda m: m.update(complete=True))(cache)


def leftover_files(cache: Path) -> None:
    (cache / f".{SHARD}.tmp-99999.npy").write_bytes(b"\x93NUMPY half a shard")
    (cache / ".manifest.json.tmp-99999").write_text('{"half": ')
    run = next(parent / "run" for parent in cache.parents if (parent / "run").is_dir())
    (run / ".model.tmp-99999").mkdir()
    (run / ".metrics.json.tmp-99999").write_text("{")


DAMAGE = {
    "cache-truncated-shard": (truncate, (SHARD,)),
    "cache-bit-flips-in-shard": (flip_bits, (SHARD,)),
    "cache-nan-bytes-in-shard": (nan_features, (SHARD,)),
    "cache-nan-bytes-in-pooled": (nan_pooled, ("pooled-00001",)),
    "cache-shard-wrong-rows": (wrong_rows, (SHARD,)),
    "cache-zero-byte-shard": (lambda c: (c / SHARD).write_bytes(b""), (SHARD,)),
    "cache-deleted-shard": (lambda c: (c / SHARD).unlink(), (SHARD,)),
    "cache-deleted-pooled": (lambda c: (c / "pooled-00002.npy").unlink(), ("pooled-00002",)),
    "cache-manifest-labels-changed": (_manifest(_rotate_labels), ("manifest.json", "labels")),
    "cache-manifest-grid-changed": (_manifest(lambda m: m.update(grid=[3, 3])), ("manifest.json", "grid")),
    "cache-manifest-channels-changed": (_manifest(lambda m: m.update(channels=32)), ("manifest.json",)),
    "cache-manifest-shard-size-changed": (_manifest(lambda m: m.update(shard_size=8)), ("manifest.json",)),
    "cache-manifest-digest-changed": (_manifest(lambda m: m.update(digest="0" * 64)), ("manifest.json",)),
    "cache-manifest-garbage-json": (
        lambda c: (c / "manifest.json").write_text("{not json"),
        ("manifest.json",),
    ),
    "cache-manifest-deleted": (lambda c: (c / "manifest.json").unlink(), ("manifest.json",)),
    "cache-complete-true-on-incomplete": (complete_but_missing, ("features-00002", "manifest.json")),
}


VOLATILE = {"mtime_ns", "inode", "pid", "host", "time", "created", "written_at"}  # differ between copies


def normalised(value):
    """A manifest without file-system facts (mtime, inode, ...) and with record lists sorted."""
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        items = [normalised(v) for v in value]
        return (
            sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
            if all(isinstance(v, dict) for v in items)
            else items
        )
    return value


def same_as_reference(case: Path, reference: Path) -> str | None:
    """Why a cache folder below `case` differs from the reference's (manifest or any shard)."""
    for relative, folder in cache_folders(reference).items():
        mine = case / relative
        for file in sorted(folder.glob("*.npy")):
            if not (mine / file.name).is_file() or (mine / file.name).read_bytes() != file.read_bytes():
                return f"{folder.name[:20]}/{file.name} is not the reference's after the run"
        try:
            manifest = json.loads((mine / "manifest.json").read_text())
        except (OSError, ValueError):
            return f"{folder.name[:20]}/manifest.json unreadable after the run"
        if normalised(manifest) != normalised(json.loads((folder / "manifest.json").read_text())):
            return f"{folder.name[:20]}/manifest.json is not the reference's after the run"
    return None


def cache_case(name: str, damage: Callable[[Path], None], names: tuple[str, ...]) -> Case:
    def run(ws: Workspace) -> Outcome:
        run_dir = ws.copy_run(ws.refs.tiny)
        damage(train_cache(ws.dir))
        proc = ws.cli(TINY)

        def check() -> str | None:
            left = leftovers(ws.dir)
            return first_problem(
                lambda: metrics_problem(run_dir / "metrics.json", ws.refs.tiny_metrics),
                lambda: same_as_reference(ws.dir, ws.refs.tiny),
                lambda: f"leftovers: {', '.join(left[:3])}" if left else None,
            )

        return judge(
            proc, names=names, check=check, success=REPAIRED, lost=lambda: unloadable(run_dir / "model")
        )

    accept = (REPAIRED,) if name == "cache-leftover-tmp-files" else (REPAIRED, NAMED)
    return Case(name, "corrupt cache", run, accept=accept)


def cases(refs) -> list[Case]:
    damage = {**DAMAGE, "cache-leftover-tmp-files": (leftover_files, ())}
    return [cache_case(name, func, names) for name, (func, names) in damage.items()]
