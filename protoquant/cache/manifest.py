"""The manifest of a cache folder: reading and checking it, shard records, marking it complete.

`manifest.json` holds the cache key and its digest, the entry count, shard size, feature map
shape (grid, channels), the image labels and class names, `complete`, and once complete the
record of every shard (`shards`), copied from the shard records `shard-NNNNN.json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protoquant.atomic import write_bytes_atomic
from protoquant.cache.files import MANIFEST_NAME, shard_paths
from protoquant.cache.shards import read_record
from protoquant.cache.verify import ShardProblem, record_problem, write_stamp

FIELDS = {
    "key": dict,
    "digest": str,
    "num_entries": int,
    "shard_size": int,
    "channels": int,
    "grid": list,
    "labels": list,
    "classes": list,
    "complete": bool,
}
NOT_STARTED = "not started"  # shard_state of a shard with neither files nor record


def num_shards(manifest: dict) -> int:
    return -(-manifest["num_entries"] // manifest["shard_size"])


def _structure_problem(manifest: object) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    for field, kind in FIELDS.items():
        if field not in manifest:
            return f"missing field '{field}'"
        value = manifest[field]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return f"field '{field}' should be {kind.__name__}, found {type(value).__name__}"
    views = manifest["key"].get("views")
    if not isinstance(views, int) or views < 1 or manifest["shard_size"] < 1:
        return "key.views and shard_size should be positive integers"
    if len(manifest["labels"]) * views != manifest["num_entries"]:
        return f"{len(manifest['labels'])} labels x {views} views != num_entries {manifest['num_entries']}"
    records = manifest.get("shards")
    if manifest["complete"] and (not isinstance(records, list) or len(records) != num_shards(manifest)):
        return f"complete, but 'shards' is not a list of {num_shards(manifest)} shard records"
    return None


def read_manifest(folder: Path) -> dict:
    """The manifest of `folder`. Raises FileNotFoundError when there is none, ValueError naming it
    when it is not valid JSON or lacks a field."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no feature cache manifest at {path}")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); rerunning caching rebuilds it") from None
    problem = _structure_problem(manifest)
    if problem is not None:
        raise ValueError(f"{path}: {problem}; rerunning caching rebuilds it")
    return manifest


def labels_problem(manifest: dict, labels: np.ndarray) -> str | None:
    """How the manifest's image labels differ from `labels` (N_images,), or None."""
    stored, given = np.asarray(manifest["labels"]), np.asarray(labels)
    if stored.shape != given.shape:
        return f"{len(stored)} image labels, the dataset has {len(given)}"
    differ = np.flatnonzero(stored != given)
    if differ.size == 0:
        return None
    first = differ[0]
    return (
        f"labels differ from the dataset's at image {first} (manifest {stored[first]}, dataset "
        f"{given[first]}; {differ.size} images differ)"
    )


@dataclass
class Plan:
    """A cache folder and its manifest, as one build sees them."""

    folder: Path
    manifest: dict

    @property
    def num_shards(self) -> int:
        return num_shards(self.manifest)

    def rows(self, shard: int) -> tuple[int, int]:
        """(first entry, entry count) of `shard`."""
        size, total = self.manifest["shard_size"], self.manifest["num_entries"]
        return shard * size, min(size, total - shard * size)

    def record_problem(self, record: object, shard: int) -> str | None:
        first, rows = self.rows(shard)
        return record_problem(record, shard, first, rows, self.manifest["grid"], self.manifest["channels"])

    def write_manifest(self) -> None:
        write_bytes_atomic(self.folder / MANIFEST_NAME, json.dumps(self.manifest).encode())


def manifest_record_problems(plan: Plan) -> list[ShardProblem]:
    """Records of a complete manifest that do not describe their shard."""
    path = plan.folder / MANIFEST_NAME
    found = [(s, plan.record_problem(r, s)) for s, r in enumerate(plan.manifest["shards"])]
    return [ShardProblem(s, path, f"shard {s}: {problem}") for s, problem in found if problem]


def shard_state(plan: Plan, shard: int) -> str | None:
    """None when `shard` is finished (a valid record whose files have its sizes), else why not."""
    record = read_record(plan.folder, shard)
    files = [path for path in shard_paths(plan.folder, shard) if path.exists()]
    if record is None:
        return f"{files[0].name} has no record" if files else NOT_STARTED
    problem = plan.record_problem(record, shard)
    if problem is not None:
        return problem
    for name, entry in record["files"].items():
        path = plan.folder / name
        if not path.exists() or os.stat(path).st_size != entry["bytes"]:
            return f"{name} is missing or not of its record's size"
    return None


def mark_complete(plan: Plan) -> None:
    """Copy every shard record into the manifest and mark it complete; the stamp vouches for
    each file as it was when written (hashed then). Every shard must be finished."""
    records = [read_record(plan.folder, s) for s in range(plan.num_shards)]
    stamp = {
        name: [e["bytes"], e["mtime_ns"], e["inode"], e["sha256"]]
        for record in records
        for name, e in record["files"].items()
        if isinstance(e.get("mtime_ns"), int) and isinstance(e.get("inode"), int)
    }
    write_stamp(plan.folder, stamp)
    plan.manifest |= {"complete": True, "shards": records}
    plan.write_manifest()
