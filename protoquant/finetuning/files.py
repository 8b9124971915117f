"""The fine-tuning folder: its key, the finished outputs and the resume file.

A folder holds `backbone.safetensors` (the fine-tuned model's whole state dict in its original
architecture, loadable through `backbone.weights`), `classifier.safetensors` (the linear layer
trained with it), and `finetune.json` (what was trained and how it went), written last: its
presence means finished. While training, `resume.pt` holds the state after the last completed
epoch (written atomically after each one, removed at the end). The default folder is
`<cache root>/finetune/<key>`, the key hashing everything the result depends on.

One job trains into a folder at a time: its rank 0 holds `flock` on `.finetune.lock` while it
trains (`training_lock`). A second job of the same key (another run sharing the cache root)
logs that it waits, polls every `LOCK_POLL_SECONDS` (all its ranks together, so none sits in a
long collective), and once the lock is free takes the finished result, or resumes from
`resume.pt` if the first job died. A lock dies with its process.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from protoquant import distributed
from protoquant.atomic import sha256_file, write_bytes_atomic, write_file_atomic, write_json_atomic
from protoquant.cache.lock import try_flock
from protoquant.config import RunConfig
from protoquant.data.base import ImageDataset, stable_hash
from protoquant.errors import ConfigError
from protoquant.paths import absolute, cache_root

logger = logging.getLogger(__name__)

FINETUNE_FORMAT = 1  # bump when the folder layout or the key changes
WEIGHTS_FILE = "backbone.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
RESULT_FILE = "finetune.json"
RESUME_FILE = "resume.pt"
LOCK_FILE = ".finetune.lock"
LOCK_POLL_SECONDS = 10.0  # how often a waiting job looks at a busy folder's lock again
FOLDER_SUBDIR = "finetune"  # under the cache root
KEY_CHARS = 16  # digest characters in a default folder's name
UNKEYED_FIELDS = ("enabled", "out", "num_workers")  # finetune fields the result does not depend on


@dataclass(frozen=True)
class FinetuneResult:
    """Where the fine-tuned weights are and what they reached."""

    weights: Path  # <folder>/backbone.safetensors: pass as backbone.weights
    weights_hash: str  # state_hash of the fine-tuned model (what the feature cache key records)
    best_val_accuracy: float  # NaN without validation images
    folder: Path


def _split_identity(dataset: ImageDataset) -> dict:
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "fingerprint": dataset.fingerprint(),
        "num_images": len(dataset),
    }


def finetune_key(
    config: RunConfig, train: ImageDataset, val: ImageDataset, base_hash: str, transform: dict
) -> dict:
    """Everything the fine-tuned weights depend on (`config.backbone` resolved, its input concrete).

    `base_hash` is the starting weights' state hash, `transform` the image views' description.
    """
    backbone = config.backbone
    section = {k: v for k, v in asdict(config.finetune).items() if k not in UNKEYED_FIELDS}
    return {
        "format": FINETUNE_FORMAT,
        "train": _split_identity(train),
        "val": _split_identity(val),
        "backbone": {
            "name": backbone.name,
            "weights": backbone.weights,
            "base_hash": base_hash,
            "init_seed": backbone.init_seed,
            "image_size": backbone.image_size,
            "crop_ratio": backbone.crop_ratio,
            "interpolation": backbone.interpolation,
            "mean": list(backbone.mean),
            "std": list(backbone.std),
        },
        "transform": transform,
        "finetune": section,
        "seed": config.seed,
    }


def finetune_folder(config: RunConfig, key: dict) -> Path:
    """`finetune.out` (absolute), or `<cache root>/finetune/<first 16 key digest characters>`."""
    if config.finetune.out:
        return absolute(config.finetune.out)
    return cache_root(config.cache) / FOLDER_SUBDIR / stable_hash(key)[:KEY_CHARS]


def read_finished(folder: Path, key: dict) -> FinetuneResult | None:
    """The result of a finished folder for `key`; None if not finished.

    Raises:
        ConfigError: the folder holds a fine-tuning of another key (a reused `finetune.out`).
    """
    import json

    meta_file = folder / RESULT_FILE
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    if meta.get("key") != json.loads(json.dumps(key)):
        raise ConfigError(
            f"config field 'finetune.out': {folder} holds a fine-tuning of other data, backbone or "
            "settings; choose another folder (or '' for the keyed default) or delete it"
        )
    accuracy = meta["best_val_accuracy"]
    return FinetuneResult(
        weights=folder / WEIGHTS_FILE,
        weights_hash=meta["weights_hash"],
        best_val_accuracy=math.nan if accuracy is None else float(accuracy),
        folder=folder,
    )


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def write_outputs(folder: Path, net: torch.nn.Module, meta: dict) -> Path:
    """The weights, the classifier and, last, `finetune.json` (`meta` + file hash); returns the weights."""
    weights = folder / WEIGHTS_FILE
    write_file_atomic(weights, lambda tmp: save_file(_cpu_state(net.model), str(tmp)), suffix=".safetensors")
    write_file_atomic(
        folder / CLASSIFIER_FILE,
        lambda tmp: save_file(_cpu_state(net.classifier), str(tmp)),
        suffix=".safetensors",
    )
    write_json_atomic(folder / RESULT_FILE, {**meta, "weights_sha256": sha256_file(weights)})
    (folder / RESUME_FILE).unlink(missing_ok=True)
    return weights


def write_resume(folder: Path, state: dict) -> None:
    """`state` (tensors and plain values) to `resume.pt`, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes_atomic(folder / RESUME_FILE, buffer.getvalue())


def read_resume(folder: Path, key: dict) -> dict | None:
    """The state in `resume.pt` if it was written for `key`; None when there is none (or it is
    another key's: it is then ignored and later overwritten, after a warning)."""
    path = folder / RESUME_FILE
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("key_digest") != stable_hash(key):
        logger.warning("%s was written for another fine-tuning; starting over", path)
        return None
    logger.info("resuming the fine-tuning in %s after epoch %d", folder, state["epoch"])
    return state


def is_finetuned_file(path: str | Path) -> bool:
    """Whether `path` is the weights file of a finished fine-tuning folder."""
    path = Path(path)
    return path.name == WEIGHTS_FILE and (path.parent / RESULT_FILE).is_file()


@contextmanager
def training_lock(folder: Path, key: dict) -> Iterator[FinetuneResult | None]:
    """Hold `folder`'s lock for this job (rank 0 takes it, every rank waits together) and yield
    the folder's finished result for `key` as it is once the lock is held: None means train."""
    ctx = distributed.context()
    if ctx.is_main:
        folder.mkdir(parents=True, exist_ok=True)
    fd, told = None, False
    while True:
        fd = try_flock(folder / LOCK_FILE) if ctx.is_main else None
        if distributed.broadcast_object(fd is not None, ctx):  # rank 0's answer on every rank
            break
        if not told:
            logger.warning("%s: another process is fine-tuning into this folder; waiting for it", folder)
            told = True
        time.sleep(LOCK_POLL_SECONDS)
    try:
        yield read_finished(folder, key)
    finally:
        if fd is not None:
            os.close(fd)
