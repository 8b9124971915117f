"""Backbone + head for image-in use, and the one checkpoint format.

A checkpoint is a folder: `model.safetensors` (head tensors), `config.json` (run
config, backbone facts, class names, temperature, format version) and, only for
randomly initialised backbones that no name can reference, `backbone.safetensors`.
Loading is strict, and the backbone's weights hash must match the recorded one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from protoquant.backbones.frozen import FrozenBackbone, create_backbone, state_hash
from protoquant.config import RunConfig, from_dict, to_dict
from protoquant.data.transforms import view_transform
from protoquant.head import HeadOutput, ProtoQuantHead

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class Prediction:
    """Output of `ProtoQuant.predict` for a batch of B images."""

    classes: torch.Tensor  # (B,) predicted class index
    probabilities: torch.Tensor  # (B, C) softmax of the logits
    logits: torch.Tensor  # (B, C)
    scores: torch.Tensor  # (B, K) pooled prototype presence
    similarity: torch.Tensor  # (B, K, H, W) cosine similarity maps
    activation: torch.Tensor  # (B, K, H, W) softmax(similarity / tau) over prototypes


class ProtoQuant(nn.Module):
    """An interpretable classifier: frozen backbone -> prototype head."""

    def __init__(
        self, backbone: FrozenBackbone, head: ProtoQuantHead, classes: Sequence[str], config: RunConfig
    ):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.classes = tuple(classes)
        self.config = config
        info = backbone.info
        self.transform = view_transform(config, info.mean, info.std)

    def forward(self, images: torch.Tensor) -> HeadOutput:
        """images: (B, 3, S, S) normalised tensors."""
        return self.head(self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) patch features exactly as the cache stored them (grid pooling included)."""
        features = self.backbone(images)
        pool = self.config.cache.grid_pool
        return F.avg_pool2d(features, pool, ceil_mode=True) if pool > 1 else features  # (B, D, H/p, W/p)

    def preprocess(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images, or a float (B, 3, h, w) batch in [0, 1], to a normalised (B, 3, S, S) batch."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"image tensor must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
            return self.transform.plain(images.float())
        return torch.stack([self.transform(image.convert("RGB"), 0, 0) for image in images])

    def predict(self, images: Sequence[Image.Image] | torch.Tensor) -> Prediction:
        """Classify PIL images or a (B, 3, h, w) tensor in [0, 1]."""
        return self.predict_normalised(self.preprocess(images))

    @torch.no_grad()
    def predict_normalised(self, batch: torch.Tensor) -> Prediction:
        """Classify an already preprocessed (B, 3, S, S) batch."""
        out = self(batch.to(self.head.codebook.device))
        return Prediction(
            classes=out.logits.argmax(dim=1).cpu(),
            probabilities=out.logits.softmax(dim=1).cpu(),
            logits=out.logits.cpu(),
            scores=out.scores.cpu(),
            similarity=out.similarity.cpu(),
            activation=out.activation.cpu(),
        )

    def explain(self, image, *, top_classes: int = 1, top_prototypes: int = 5, gallery=None):
        """Explain one image (PIL, or (3, h, w) in [0, 1]); see `protoquant.explain.explain`."""
        from protoquant.explain.explanation import explain  # lazy: explain imports this module

        return explain(self, image, top_classes=top_classes, top_prototypes=top_prototypes, gallery=gallery)

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint folder atomically (a temporary folder renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.contiguous().cpu() for k, v in self.head.state_dict().items()},
            str(tmp / "model.safetensors"),
        )
        if self.backbone.info.weights == "random":
            state = {k: v.contiguous().cpu() for k, v in self.backbone.model.state_dict().items()}
            save_file(state, str(tmp / "backbone.safetensors"))
        meta = {
            "format": CHECKPOINT_FORMAT,
            "config": to_dict(self.config),
            "backbone": asdict(self.backbone.info),
            "classes": list(self.classes),
            "temperature": self.head.temperature,
            "num_prototypes": self.head.num_prototypes,
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(
        cls, path: str | Path, *, backbone: FrozenBackbone | None = None, device: str | torch.device = "cpu"
    ) -> ProtoQuant:
        """Load a checkpoint folder strictly; the backbone is rebuilt from its name unless given."""
        path = Path(path)
        meta = _read_meta(path)
        config = from_dict(RunConfig, meta["config"])
        recorded = meta["backbone"]["weights_hash"]
        if backbone is None:
            backbone = create_backbone(config.backbone)
            stored = path / "backbone.safetensors"
            if stored.is_file():  # random backbones travel with the checkpoint
                try:
                    backbone.model.load_state_dict(load_file(str(stored)), strict=True)
                except RuntimeError as err:
                    raise ValueError(f"{stored}: does not match {config.backbone.name}: {err}") from err
                backbone.info = replace(backbone.info, weights_hash=state_hash(backbone.model))
        if backbone.info.weights_hash != recorded:
            raise ValueError(
                f"{path}: backbone weights hash {backbone.info.weights_hash[:12]} does not match "
                f"the checkpoint's {recorded[:12]}; the checkpoint was trained on other weights"
            )
        tensors = load_file(str(path / "model.safetensors"))
        if "codebook" not in tensors:
            raise ValueError(f"{path / 'model.safetensors'}: no 'codebook' tensor; not a protoquant head")
        head = ProtoQuantHead(tensors["codebook"], len(meta["classes"]), temperature=meta["temperature"])
        try:
            head.load_state_dict(tensors, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path / 'model.safetensors'}: does not match the head: {err}") from err
        head.requires_grad_(False).eval()
        return cls(backbone, head, meta["classes"], config).to(device)


def _read_meta(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path} is not a protoquant checkpoint (needs config.json and model.safetensors)"
        )
    meta = json.loads(config_path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{config_path}: checkpoint format {meta.get('format')}, this version reads {CHECKPOINT_FORMAT}"
        )
    return meta
