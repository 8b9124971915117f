"""The run folder: written in one step, with `outputs.json` (written last) as its table of contents.

A run's outputs (RUN_ENTRIES) are built beside `out` as `.OUT.tmp-PID` and swapped in
(`protoquant.atomic.replace_folder`), so a kill at any moment leaves the previous run folder or
the new one, complete. `outputs.json` lists every file's sha256 and the model hash, so a reader
can check that what it sees belongs together.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from protoquant.atomic import (
    carry_entries,
    clean_leftovers,
    file_hashes,
    fsync_tree,
    recover,
    replace_folder,
    temporary_path,
    write_json_atomic,
    write_jsonl_atomic,
)
from protoquant.config import RunConfig, save_yaml
from protoquant.gallery_files import model_hash
from protoquant.metrics.result import jsonable
from protoquant.model import ProtoQuant

logger = logging.getLogger(__name__)

OUTPUTS_FILE = "outputs.json"  # written last: every output file's sha256 and the model hash
OUTPUTS_FORMAT = 1  # bump when outputs.json changes
RUN_ENTRIES = ("model", "config.yaml", "metrics.json", "history.jsonl", OUTPUTS_FILE)  # what a run writes


def tidy_run_folder(out: Path) -> None:
    """Undo what killed writers of `out` left: a moved-aside run folder back, their temporary ones gone."""
    recover(out)
    clean_leftovers(out.parent, out.name)
    for name in RUN_ENTRIES if out.is_dir() else ():
        clean_leftovers(out, name)


def write_outputs(
    out: Path, config: RunConfig, model: ProtoQuant, metrics: dict, history: list[dict]
) -> None:
    """Write the run folder `out` in one step (RUN_ENTRIES, `outputs.json` last).

    The folder is built as `.OUT.tmp-PID` beside `out`, flushed, and swapped with any existing
    `out`. Entries of an existing `out` that a run does not write (the user's files, reports, a
    cache) are carried over as hard links; the previous `model` and its gallery are not.

    Raises:
        ValueError: `metrics` holds NaN or infinity (nothing is written; `run` records them as None).
        NotADirectoryError: `out` exists and is not a folder.
    """
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out {out}: exists and is not a folder; expected the run folder")
    staging = temporary_path(out)
    shutil.rmtree(staging, ignore_errors=True)  # this PID's: a dead process's before the PID was reused
    staging.mkdir(parents=True)
    try:
        save_yaml(config, staging / "config.yaml")
        model.save(staging / "model")
        write_json_atomic(staging / "metrics.json", metrics)
        write_jsonl_atomic(staging / "history.jsonl", [jsonable({"stage": 1, **row}) for row in history])
        listing = {"format": OUTPUTS_FORMAT, "model_hash": model_hash(model), "files": file_hashes(staging)}
        write_json_atomic(staging / OUTPUTS_FILE, listing)
        if out.is_dir():
            carry_entries(out, staging, skip=RUN_ENTRIES)
        fsync_tree(staging)
        replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("run finished: %s", out)
