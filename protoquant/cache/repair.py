"""Repairing a complete cache whose shards failed verification: only the bad shards are redone.

Each bad shard is removed under its lock (so two processes repairing one folder do not remove a
shard the other has just recomputed) and the manifest is marked incomplete; the build then
computes the missing shards as it would resume an interrupted run.
"""

from __future__ import annotations

import json
import logging

from protoquant.atomic import write_bytes_atomic
from protoquant.cache.files import record_path, shard_paths
from protoquant.cache.lock import ShardLocks
from protoquant.cache.manifest import Plan
from protoquant.cache.shards import read_record
from protoquant.cache.verify import ShardProblem, verify_shards

logger = logging.getLogger(__name__)


def _discard(plan: Plan, shard: int, locks: ShardLocks) -> None:
    """Remove the files and record of `shard`, unless they are sound by now."""
    locks.claim(shard, wait=True)
    try:
        record = read_record(plan.folder, shard)
        if plan.record_problem(record, shard) is None and not verify_shards(plan.folder, [record]):
            return  # another process recomputed it, or only the manifest's copy of the record was bad
        for path in (*shard_paths(plan.folder, shard), record_path(plan.folder, shard)):
            path.unlink(missing_ok=True)
    finally:
        locks.release(shard)


def _restore_records(plan: Plan, skip: set[int]) -> None:
    """Rewrite the shard records that differ from the manifest's copies (shards not in `skip`)."""
    for shard, record in enumerate(plan.manifest["shards"]):
        if shard not in skip and read_record(plan.folder, shard) != record:
            path = record_path(plan.folder, shard)
            logger.warning("%s: missing or different from the manifest's copy; restored from it", path)
            write_bytes_atomic(path, json.dumps(record).encode())


def repair(plan: Plan, problems: list[ShardProblem], locks: ShardLocks) -> None:
    """Remove the shards named in `problems` and mark `plan`'s manifest incomplete (not written);
    restore the records of the other shards from the manifest. `plan` must be complete."""
    for problem in problems:
        logger.warning("%s; recomputing shard %d", problem, problem.shard)
    bad = sorted({problem.shard for problem in problems})
    for shard in bad:
        _discard(plan, shard, locks)
    _restore_records(plan, skip=set(bad))
    if bad:
        plan.manifest["complete"] = False
        del plan.manifest["shards"]
