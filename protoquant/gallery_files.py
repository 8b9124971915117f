"""The gallery's files in a checkpoint folder, and the hash that ties a gallery to its model.

Low in the layers on purpose: the model copies a gallery when it saves and the hub uploads one,
while building and reading galleries lives in `protoquant.explain.gallery`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

GALLERY_TENSORS, GALLERY_META = "gallery.safetensors", "gallery.json"
GALLERY_PICTURES = "gallery_pictures.zip"  # window crops and source thumbnails, JPEG
GALLERY_FILES = (GALLERY_TENSORS, GALLERY_PICTURES, GALLERY_META)  # the meta file last: it commits


def has_gallery(checkpoint: str | Path) -> bool:
    """Whether the checkpoint folder holds a gallery (its tensors and its meta file)."""
    return (Path(checkpoint) / GALLERY_META).is_file() and (Path(checkpoint) / GALLERY_TENSORS).is_file()


def model_hash(model) -> str:
    """sha256 over the codebook and the effective class weights of `model.head`."""
    digest = hashlib.sha256()
    for tensor in (model.head.codebook, model.head.class_weights):
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
