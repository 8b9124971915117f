"""Backbone + head for image-in use, and the one checkpoint format.

A checkpoint is a folder: `model.safetensors` (head tensors), `config.json` (run
config, backbone facts, class names, temperature, format version, the edit history) and, only
for backbones that no name can reference (random or fine-tuned weights), `backbone.safetensors`;
optionally the prototype gallery (`gallery.json`, `gallery.safetensors`) and, in folders
written by `save_pretrained`, a model card `README.md` and the run's `metrics.json`.
Loading is strict, and the backbone's weights hash must match the recorded one.

Format 1 is every checkpoint training writes (and edited ones with a plain head); format 2 adds
`removed_codebook` to the head tensors (prototypes kept only in the softmax normaliser, see
`protoquant.pruned_head`). Both are read; "edits" in config.json is optional (none before editing).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file
from torch import nn

from protoquant.atomic import clean_leftovers, fsync_tree, link_tree, recover, replace_folder, temporary_path
from protoquant.backbones.features import patch_features
from protoquant.backbones.frozen import FrozenBackbone, create_backbone, state_hash
from protoquant.backbones.weights import is_path
from protoquant.checkpoint_files import CONFIG_FILE, HEAD_FILE, check_shapes, read_meta, read_tensors
from protoquant.config import RunConfig, from_dict, to_dict
from protoquant.data.inputs import Images, to_rgb_images
from protoquant.data.transforms import view_transform
from protoquant.distributed import resolve_device
from protoquant.errors import CheckpointError, ConfigError
from protoquant.finetuning.files import is_finetuned_file
from protoquant.gallery_files import GALLERY_FILES, GALLERY_META, has_gallery, model_hash
from protoquant.head import HeadOutput, ProtoQuantHead
from protoquant.head_fast import HeadScores
from protoquant.history import EditRecord, read_history
from protoquant.hub import HubMixin
from protoquant.pruned_head import PrunedHead

if TYPE_CHECKING:  # the explanation and hub modules call into this one: hints only
    from protoquant.explain.types import Explanation, Gallery

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1  # a plain head; what training writes
PRUNED_FORMAT = 2  # the head carries normaliser-only prototypes (`removed_codebook`)
READABLE_FORMATS = (CHECKPOINT_FORMAT, PRUNED_FORMAT)
BACKBONE_FILE = "backbone.safetensors"  # the backbone's tensors, where no name references them


@dataclass(frozen=True)
class Prediction:
    """Output of `ProtoQuant.predict` for a batch of B images (B = 1 for a single image)."""

    classes: torch.Tensor  # (B,) predicted class index
    probabilities: torch.Tensor  # (B, C) softmax of the logits
    logits: torch.Tensor  # (B, C)
    scores: torch.Tensor  # (B, K) pooled prototype presence
    similarity: torch.Tensor  # (B, K, H, W) cosine similarity maps
    activation: torch.Tensor  # (B, K, H, W) softmax(similarity / tau) over prototypes


class ProtoQuant(HubMixin, nn.Module):
    """An interpretable classifier: frozen backbone -> prototype head.

    `save_pretrained`, `from_pretrained` and `push_to_hub` (from `HubMixin`) add the Hugging
    Face Hub to `save` / `load`. `checkpoint` is the folder the model was loaded from (None for
    a model built in memory); explanations read the prototype gallery stored there. `edits` is
    the edit history (oldest first; empty for a model as training produced it).
    """

    def __init__(
        self,
        backbone: FrozenBackbone,
        head: ProtoQuantHead,
        classes: Sequence[str],
        config: RunConfig,
        *,
        checkpoint: str | Path | None = None,
        edits: Sequence[EditRecord] = (),
    ):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.classes = tuple(classes)
        self.config = config
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.edits = tuple(edits)
        info = backbone.info
        self.transform = view_transform(config, info.mean, info.std)

    def forward(self, images: torch.Tensor) -> HeadOutput:
        """images: (B, 3, S, S) normalised tensors."""
        return self.head(self.features(images))

    def forward_logits(self, images: torch.Tensor) -> HeadScores:
        """Logits (B, C) and scores (B, K) of normalised images (B, 3, S, S), without the maps:
        the cheaper path for accuracy and serving (`ProtoQuantHead.forward_logits`)."""
        return self.head.forward_logits(self.features(images))

    @contextmanager
    def inference(self) -> Iterator[ProtoQuant]:
        """`torch.inference_mode` plus the head's reuse scope (`ProtoQuantHead.inference`)."""
        with torch.inference_mode(), self.head.inference():
            yield self

    def compile_head(self, mode: str | None = "reduce-overhead", *, on_cpu: bool = False) -> bool:
        """Compile the head's logits path; returns whether it did (`ProtoQuantHead.compile_logits`)."""
        return self.head.compile_logits(mode, on_cpu=on_cpu)

    def features(self, images: torch.Tensor, *, input_gradients: bool = False) -> torch.Tensor:
        """(B, D, H, W) patch features exactly as the cache stored them (`patch_features`: bf16
        autocast, grid pooling and float16 rounding as configured).

        Without autograd through the backbone unless `input_gradients` (see `differentiable`).
        """
        return patch_features(self.backbone, images, self.config.cache, input_gradients=input_gradients)

    def preprocess(self, images: Images) -> torch.Tensor:
        """One picture or a batch (see `protoquant.data.inputs`) -> normalised (B, 3, S, S) batch.

        Every picture becomes 8-bit RGB and then takes the evaluation transform of the feature
        cache, so the same picture gives the same batch whatever its type.
        """
        return torch.stack([self.transform(image, 0, 0) for image in to_rgb_images(images)])

    def predict(self, images: Images) -> Prediction:
        """Classify one picture or a batch.

        Args:
            images: a PIL image; a uint8 numpy array (H, W), (H, W, C) or (B, H, W, C); a uint8
                tensor (C, H, W) / (B, C, H, W) in 0-255; a float tensor (C, H, W) / (B, C, H, W)
                in [0, 1]; or a list of these. C is 1, 3 or 4.

        Returns:
            A batch Prediction (B = 1 for a single picture).
        """
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

    def explain(
        self,
        images: Images,
        *,
        top_classes: int = 1,
        top_prototypes: int = 5,
        gallery: Gallery | bool | None = None,
    ) -> Explanation | list[Explanation]:
        """Explain one picture (-> Explanation) or a batch (-> list); see `protoquant.explain.explain`.

        By default the gallery stored in `checkpoint` supplies each prototype's training
        patches; a missing gallery is an error unless `gallery=False`.
        """
        from protoquant.explain.explanation import explain  # lazy: explain imports this module

        return explain(self, images, top_classes=top_classes, top_prototypes=top_prototypes, gallery=gallery)

    def differentiable(self) -> DifferentiableModel:
        """An nn.Module from normalised images (B, 3, S, S) to logits (B, C) that lets gradients
        reach the images (for captum and other attribution tools); the parameters stay frozen.

        The default paths (`forward`, `predict`) keep the backbone free of autograd.
        """
        return DifferentiableModel(self)

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint folder `path` atomically; returns `path`.

        Everything is written into `.NAME.tmp-PID` beside it, flushed to disk, then swapped in
        (`protoquant.atomic.replace_folder`): a kill at any moment leaves the previous checkpoint
        or the new one, complete. Leftovers of killed saves are cleaned up first. The gallery
        stored in `checkpoint` travels along when it belongs to this model.
        """
        path = Path(path)
        recover(path)
        clean_leftovers(path.parent, path.name)
        tmp = temporary_path(path)
        shutil.rmtree(tmp, ignore_errors=True)  # this PID's: a dead process's before the PID was reused
        tmp.mkdir(parents=True)
        try:
            save_file(
                {k: v.contiguous().cpu() for k, v in self.head.state_dict().items()},
                str(tmp / "model.safetensors"),
            )
            if self._stores_backbone():
                state = {k: v.contiguous().cpu() for k, v in self.backbone.model.state_dict().items()}
                save_file(state, str(tmp / BACKBONE_FILE))
            meta = {
                "format": PRUNED_FORMAT if isinstance(self.head, PrunedHead) else CHECKPOINT_FORMAT,
                "config": to_dict(self.config),
                "backbone": asdict(self.backbone.info),
                "classes": list(self.classes),
                "temperature": self.head.temperature,
                "num_prototypes": self.head.num_prototypes,
                "edits": [record.to_dict() for record in self.edits],
            }
            (tmp / "config.json").write_text(json.dumps(meta, indent=2))
            self._copy_gallery(tmp)
            fsync_tree(tmp)
            replace_folder(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    def _stores_backbone(self) -> bool:
        """Whether the checkpoint must carry the backbone's tensors: random or fine-tuned weights,
        which no name references (or a checkpoint loaded from one that carried them)."""
        if self.backbone.info.weights == "random" or is_finetuned_file(self.config.backbone.weights):
            return True
        return self.checkpoint is not None and (self.checkpoint / BACKBONE_FILE).is_file()

    def _copy_gallery(self, target: Path) -> None:
        """Link (or copy) `checkpoint`'s gallery files into `target` if they were built for this model."""
        source = self.checkpoint
        if source is None or not has_gallery(source):
            return
        if json.loads((source / GALLERY_META).read_text()).get("model_hash") != model_hash(self):
            logger.warning("%s: the stored gallery belongs to another model; not copied", source)
            return
        for name in GALLERY_FILES:  # the meta file last: it names the others' hashes
            if (source / name).is_file():
                link_tree(source / name, target / name)  # shared safely: galleries are replaced, never edited

    @classmethod
    def load(
        cls, path: str | Path, *, backbone: FrozenBackbone | None = None, device: str | torch.device = "cpu"
    ) -> ProtoQuant:
        """Load a checkpoint folder strictly, in eval mode, on `device` ("auto": CUDA if available).

        The backbone is rebuilt from its recorded name (its weights checked by hash) unless given.

        Raises:
            CheckpointError: a file is missing, truncated or not of its format, config.json lacks or
                mistypes a field, a tensor has the wrong shape (codebook width vs the backbone,
                class layer vs the classes) or holds NaN / inf; the message names file and field.
        """
        path = Path(path)
        meta = _read_meta(path)
        try:
            config = from_dict(RunConfig, meta["config"])
        except ConfigError as err:
            raise CheckpointError(f"{path / CONFIG_FILE}: field 'config': {err}") from err
        if backbone is None:
            backbone = _rebuild_backbone(path, config)
        recorded = meta["backbone"]["weights_hash"]
        if backbone.info.weights_hash != recorded:
            raise CheckpointError(
                f"{path}: backbone weights hash {backbone.info.weights_hash[:12]} does not match "
                f"the checkpoint's {recorded[:12]}; the checkpoint was trained on other weights"
            )
        head = _load_head(path / HEAD_FILE, meta, backbone.info.channels)
        edits = read_history(meta.get("edits", []), str(path / "config.json"))
        device = resolve_device(device) if isinstance(device, str) else torch.device(device)
        model = cls(backbone, head, meta["classes"], config, checkpoint=path, edits=edits)
        return model.to(device).eval()


class DifferentiableModel(nn.Module):
    """Normalised images (B, 3, S, S) -> logits (B, C), with gradients flowing to the images.

    Every parameter of the wrapped model is frozen (requires_grad False) and stays in eval
    mode, so a backward pass fills `images.grad` and nothing else.
    """

    def __init__(self, model: ProtoQuant):
        super().__init__()
        self.model = model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> DifferentiableModel:
        """Frozen: stays in eval mode whatever is asked."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.head.forward_logits(self.model.features(images, input_gradients=True)).logits


def _rebuild_backbone(path: Path, config: RunConfig) -> FrozenBackbone:
    """The checkpoint's backbone from its name; random and fine-tuned backbones travel as
    `backbone.safetensors` (a fine-tuned weights file that is gone is then not needed)."""
    stored = path / BACKBONE_FILE
    built = config.backbone
    missing = is_path(built.weights) and not Path(built.weights).expanduser().is_file()
    if stored.is_file() and missing:
        built = replace(built, weights="none")  # the stored tensors replace the file
    backbone = create_backbone(built)
    if stored.is_file():
        tensors = read_tensors(stored)
        check_shapes(stored, tensors, backbone.model.state_dict(), config.backbone.name)
        backbone.model.load_state_dict(tensors, strict=True)
        weights = config.backbone.weights if built is not config.backbone else backbone.info.weights
        backbone.info = replace(backbone.info, weights=weights, weights_hash=state_hash(backbone.model))
    return backbone


def _load_head(file: Path, meta: dict, channels: int) -> ProtoQuantHead:
    """The frozen head stored in `file` for a backbone of `channels` (D); a `removed_codebook`
    tensor makes it a `PrunedHead`. Raises CheckpointError naming the tensor that does not fit."""
    tensors = read_tensors(file)
    for name in ("codebook", "removed_codebook"):
        tensor = tensors.get(name)
        if (tensor is None and name == "codebook") or (tensor is not None and tensor.ndim != 2):
            raise CheckpointError(f"{file}: no (K, D) tensor '{name}'; not a protoquant head")
        if tensor is not None and tensor.shape[1] != channels:
            raise CheckpointError(
                f"{file}: tensor '{name}' has width {tensor.shape[1]}, the backbone gives D = {channels}"
            )
    num_classes, temperature = len(meta["classes"]), meta["temperature"]
    if "removed_codebook" in tensors:
        head = PrunedHead(
            tensors["codebook"], tensors["removed_codebook"], num_classes, temperature=temperature
        )
    else:
        head = ProtoQuantHead(tensors["codebook"], num_classes, temperature=temperature)
    what = f"{num_classes} classes in {CONFIG_FILE}, K = {head.num_prototypes}"
    check_shapes(file, tensors, head.state_dict(), what)
    head.load_state_dict(tensors, strict=True)
    return head.requires_grad_(False)


def _read_meta(path: Path) -> dict:
    """The checked `config.json` of checkpoint folder `path` (see `checkpoint_files.read_meta`)."""
    return read_meta(path, READABLE_FORMATS)
