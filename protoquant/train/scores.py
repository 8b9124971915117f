"""The fixed pooled scores (N, K) that stage 2 trains on: in memory, or in scratch files.

With frozen prototypes the pooled score of every cached training entry is fixed, so stage 2
computes it once per temperature. Up to `head.scores_memory_mb` the (N, K) table stays in memory
(every process holds all rows, gathered under torchrun); a larger table is written to a scratch
folder inside the training cache's folder, one file per process with the rows that process
computed, and every process reads the rows of each batch back with positioned reads. Memory then
depends on the batch size and K, not on N. The folder is named like every temporary entry of
`protoquant.atomic` (`.scores.tmp-PID-HOST`), so one a killed run leaves is removed by a later one.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from protoquant import distributed, progress
from protoquant.atomic import clean_leftovers, temporary_path
from protoquant.cache.resident import as_source
from protoquant.cache.view import CacheView
from protoquant.config import HeadConfig
from protoquant.errors import CacheError
from protoquant.head import ProtoQuantHead
from protoquant.train.score_tables import ScoresInMemory, ScoresOnDisk, TrainingScores, write_rows

logger = logging.getLogger(__name__)

SCORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
SCRATCH_NAME = "scores"  # the folder is `.scores.tmp-PID-HOST` inside the training cache folder
MIB = 2**20


def scores_dtype(config: HeadConfig) -> torch.dtype:
    """The dtype that stage 2 keeps its fixed (N, K) scores in (head.scores_dtype)."""
    if config.scores_dtype not in SCORE_DTYPES:
        raise ValueError(
            f"head.scores_dtype must be one of {sorted(SCORE_DTYPES)}, got {config.scores_dtype!r}"
        )
    return SCORE_DTYPES[config.scores_dtype]


def score_batches(
    head: ProtoQuantHead, subset: CacheView, batch_size: int, device: torch.device, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """(B, K) pooled scores of every batch of the subset, in order, on the CPU as `dtype`.

    The maps are streamed (`protoquant.cache.resident`: on CUDA the next batch is copied on a side
    stream while this one computes; elsewhere each batch is read as `FeatureStore.get` reads it).
    """
    with torch.no_grad():
        batches = as_source(subset, device).batches(subset.entries, batch_size)
        steps = -(-len(subset.entries) // batch_size)
        for features, _ in progress.bar(batches, total=steps, desc="prototype scores", unit="batch"):
            yield head.scores(features).to("cpu", dtype)


def compute_scores(
    head: ProtoQuantHead,
    subset: CacheView,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, K) pooled prototype presence of every entry in the subset (on the CPU, as `dtype`)."""
    return torch.cat(list(score_batches(head, subset, batch_size, device, dtype)))


def all_scores(
    head: ProtoQuantHead,
    subset: CacheView,
    batch_size: int,
    device: torch.device,
    ctx: distributed.Context,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, K) scores of every entry on every rank; under torchrun each rank computes its share."""
    shard = CacheView(subset.store, distributed.shard_for_rank(subset.entries, ctx))
    return distributed.gather_strided(
        compute_scores(head, shard, batch_size, device, dtype), len(subset.entries), ctx
    )


class ScoresSource:
    """Computes the training scores of each temperature, in memory or on disk (decided once).

    Use as a context manager: leaving it closes and removes the scratch files, also on error.

    Args:
        train: every training entry. config: stage 2's config (batch size, dtype, memory limit).
        ctx: the processes that share the work (each computes its strided share).
        prototypes: K. tables: how many (N, K) tables are alive at once (one per temperature
            when the top-k cut reads them all at the end).
    """

    def __init__(
        self,
        train: CacheView,
        config: HeadConfig,
        ctx: distributed.Context,
        *,
        prototypes: int,
        tables: int = 1,
    ) -> None:
        self.train, self.ctx, self.batch_size = train, ctx, config.batch_size
        self.dtype = scores_dtype(config)
        self.table_mb = len(train.entries) * prototypes * self.dtype.itemsize / MIB
        self.in_memory, self.count = tables * self.table_mb <= config.scores_memory_mb, tables
        self.folder: Path | None = None
        self.tables: list[ScoresOnDisk] = []
        where = "memory" if self.in_memory else "scratch files in the training cache folder"
        logger.info(
            "stage 2: %d x %.0f MiB of training scores (head.scores_memory_mb %d) -> %s",
            tables, self.table_mb, config.scores_memory_mb, where,
        )  # fmt: skip

    def __enter__(self) -> ScoresSource:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=error is not None)

    def compute(self, head: ProtoQuantHead, device: torch.device) -> TrainingScores:
        """The scores of every training entry under `head`, readable batch by batch on every rank."""
        if self.in_memory:
            scores = all_scores(head, self.train, self.batch_size, device, self.ctx, self.dtype)
            return ScoresInMemory(scores, self.train.labels)
        folder = self._scratch()
        table = len(self.tables)
        shard = CacheView(self.train.store, distributed.shard_for_rank(self.train.entries, self.ctx))
        mine = folder / f"table-{table}.rank-{self.ctx.rank}"
        write_rows(score_batches(head, shard, self.batch_size, device, self.dtype), mine)
        distributed.barrier()  # every rank's file is complete before any rank opens them all
        parts = [folder / f"table-{table}.rank-{rank}" for rank in range(self.ctx.world_size)]
        self.tables.append(ScoresOnDisk(parts, self.train.labels, head.num_prototypes, self.dtype))
        return self.tables[-1]

    def _scratch(self) -> Path:
        """The scratch folder, made by rank 0 on first use; every rank learns its name."""
        if self.folder is None:
            cache = Path(self.train.store.folder)
            name = None
            if self.ctx.is_main:
                clean_leftovers(cache, SCRATCH_NAME)  # of killed runs on this machine
                name = temporary_path(cache / SCRATCH_NAME).name
                self._make_folder(cache / name)
            self.folder = cache / distributed.broadcast_object(name, self.ctx)
            logger.info("stage 2: training scores go to %s (removed at the end)", self.folder)
        return self.folder

    def _make_folder(self, folder: Path) -> None:
        needed = self.table_mb * MIB * self.count
        free = shutil.disk_usage(folder.parent).free
        if free < needed:
            raise CacheError(
                f"{folder.parent}: stage 2 needs {needed / 1e9:.1f} GB for its training scores "
                f"but {free / 1e9:.1f} GB are free; free space or raise head.scores_memory_mb"
            )
        try:
            folder.mkdir()
        except OSError as error:
            raise CacheError(
                f"{folder.parent}: cannot write stage 2's scratch scores there ({error}); the "
                f"training cache folder must be writable, or raise head.scores_memory_mb"
            ) from error

    def close(self, *, failed: bool = False) -> None:
        """Close every table and remove the scratch files (each rank its own, rank 0 the folder)."""
        for table in self.tables:
            table.close()
        if self.folder is None:
            return
        if not failed:
            distributed.barrier()  # no rank still reads another rank's file
        for table in range(len(self.tables) + 1):  # + 1: a table being written when it failed
            (self.folder / f"table-{table}.rank-{self.ctx.rank}").unlink(missing_ok=True)
            (self.folder / f".table-{table}.rank-{self.ctx.rank}.part").unlink(missing_ok=True)
        if not failed:
            distributed.barrier()
        if self.ctx.is_main:
            remove_folder(self.folder, failed)
        self.folder, self.tables = None, []


def remove_folder(folder: Path, failed: bool) -> None:
    """Remove the scratch folder; after a failure, other ranks' files may still be there."""
    if not failed:
        shutil.rmtree(folder)
        return
    try:
        folder.rmdir()
    except OSError:
        logger.warning("stage 2: %s keeps other processes' scores; a later run removes it", folder)
