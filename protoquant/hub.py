"""The Hugging Face Hub: `save_pretrained`, `from_pretrained` and `push_to_hub` for ProtoQuant.

A Hub repo holds a checkpoint folder exactly as `ProtoQuant.save` writes it (so old folders and
Hub snapshots load alike), plus a generated model card `README.md` and the run's `metrics.json`.
Named backbones are never uploaded: `load` resolves them by name and checks their weights hash.
Downloads go through the local HF cache (`huggingface_hub.snapshot_download`), so HF_HUB_OFFLINE
and `local_files_only` are honoured.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import huggingface_hub
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

import protoquant
from protoquant import __version__
from protoquant.atomic import write_bytes_atomic, write_json_atomic
from protoquant.gallery_files import has_gallery
from protoquant.model_card import model_card

if TYPE_CHECKING:  # the model inherits from the mixin here: hints only
    import torch

    from protoquant.backbones.frozen import FrozenBackbone

logger = logging.getLogger(__name__)

CARD, METRICS = "README.md", "metrics.json"
REPO_FILES = (  # everything from_pretrained downloads; other files in a repo are left alone
    "config.json",
    "model.safetensors",
    "backbone.safetensors",
    "gallery.json",
    "gallery.safetensors",
    "gallery_pictures.npz",
    CARD,
    METRICS,
)
DEFAULT_COMMIT_MESSAGE = "Upload ProtoQuant model"


class HubMixin:
    """Hub methods for `ProtoQuant`, built on its `save` and `load`."""

    def save_pretrained(
        self: protoquant.ProtoQuant,
        folder: str | Path,
        *,
        metrics: dict | None = None,
        license: str | None = None,
        repo_id: str | None = None,
    ) -> Path:
        """Write the checkpoint folder, its model card `README.md` and `metrics.json`.

        Args:
            metrics: the run's metrics; by default `metrics.json` in or beside `checkpoint`.
            license: a Hub license id (e.g. "apache-2.0") for the card; omitted when None.
            repo_id: the repo the card's usage snippet names.
        """

        metrics = run_metrics(self) if metrics is None else metrics  # read before `save` replaces it
        folder = self.save(folder)
        if metrics:
            write_json_atomic(folder / METRICS, metrics)
        card = model_card(self, metrics, license=license, repo_id=repo_id, with_gallery=has_gallery(folder))
        write_bytes_atomic(folder / CARD, card.encode("utf-8"))
        return folder

    @classmethod
    def from_pretrained(
        cls: type[protoquant.ProtoQuant],
        name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        force_download: bool = False,
        backbone: FrozenBackbone | None = None,
        device: str | torch.device = "cpu",
    ) -> protoquant.ProtoQuant:
        """Load a checkpoint folder, or Hub repo `owner/name` through the local HF cache.

        HF_HUB_OFFLINE=1 or `local_files_only` reads the cache only. The backbone is resolved
        by name and checked by hash exactly as in `ProtoQuant.load`.
        """
        folder = snapshot_folder(
            name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
        )
        return cls.load(folder, backbone=backbone, device=device)

    def push_to_hub(
        self: protoquant.ProtoQuant,
        repo_id: str,
        *,
        token: str | bool | None = None,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
        metrics: dict | None = None,
        license: str | None = None,
    ) -> str:
        """Upload the `save_pretrained` folder to `repo_id` (created when missing); returns the commit URL."""
        api = huggingface_hub.HfApi(token=token)
        with tempfile.TemporaryDirectory(prefix="protoquant-hub-") as tmp:
            folder = self.save_pretrained(
                Path(tmp) / "model", metrics=metrics, license=license, repo_id=repo_id
            )
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=revision,
                commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
                create_pr=create_pr,
            )
        logger.info("pushed %s to the Hub: %s", repo_id, commit)
        return commit


def run_metrics(model: protoquant.ProtoQuant) -> dict:
    """The run's metrics: `metrics.json` inside the model's checkpoint folder, else beside it.

    {} when the model has no folder, there is no file, or the file names other backbone weights.
    """
    if model.checkpoint is None:
        return {}
    for path in (model.checkpoint / METRICS, model.checkpoint.parent / METRICS):
        if not path.is_file():
            continue
        metrics = json.loads(path.read_text())
        recorded = metrics.get("backbone", {}).get("weights_hash")
        if recorded not in (None, model.backbone.info.weights_hash):
            logger.warning("%s: recorded for other backbone weights; not used for the model card", path)
            return {}
        return metrics
    return {}


def snapshot_folder(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """A local folder: `name_or_path` itself when it is a folder, else the repo's snapshot in the HF cache."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    repo_id = str(name_or_path)
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except HFValidationError as err:
        raise FileNotFoundError(
            f"'{repo_id}' is neither a checkpoint folder nor a Hugging Face Hub repo id ('owner/name')"
        ) from err
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
            allow_patterns=list(REPO_FILES),
            library_name="protoquant",
            library_version=__version__,
        )
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"no folder '{repo_id}' here, and Hub repo '{repo_id}' (revision {revision or 'main'}) is not in "
            f"the local Hugging Face cache ({cache_dir or huggingface_hub.constants.HF_HUB_CACHE}), and it "
            "could not be downloaded (HF_HUB_OFFLINE=1, local_files_only=True or no connection); fetch it "
            f"once online. Hub: {err}"
        ) from err
    return Path(folder)
