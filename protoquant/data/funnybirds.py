"""FunnyBirds (Hesse et al., ICCV 2023) from the layout of its official download.

Files (as the reference `datasets/funny_birds.py` reads them): `classes.json` (list of
`{"class_idx": c, "parts": {slot: variant}}`), `parts.json` (`{slot: [variant dicts]}`, slots
beak, eye, foot, tail, wing), `dataset_{train,test}.json` (one dict of render parameters per
image, with `class_idx` and `bg_objects`), images `{split}/<class_idx>/<i:06d>.png` with i the
image's index in the json (256x256 RGBA; alpha dropped, no normalisation), colour-coded part
maps `{split}_part_map/<class_idx>/<i:06d>.png`, and re-renders
`{split}_interventions/<class_idx>/<i:06d>/body_<kept slots, sorted, joined by _>.png` and
`.../background_interventions/<j>.png` (background object j removed).

Part colours are those of the reference: eye01 (255, 255, 253), eye02 (255, 255, 254), beak
(255, 255, 0), foot01 (255, 0, 1), foot02 (255, 0, 2), wing01 (0, 255, 1), wing02 (0, 255, 2),
tail (0, 0, 255); background object j is (204, 204, 204 + j). `annotations` gives one exact
mask per coloured part (eyes, feet and wings separately; `part_groups` maps slots to them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from protoquant.data.base import PartAnnotations
from protoquant.data.images import FileImageDataset, open_rgb
from protoquant.data.synthetic import minimal_sufficient_sets

PART_COLOURS = {
    "eye01": (255, 255, 253),
    "eye02": (255, 255, 254),
    "beak": (255, 255, 0),
    "foot01": (255, 0, 1),
    "foot02": (255, 0, 2),
    "wing01": (0, 255, 1),
    "wing02": (0, 255, 2),
    "tail": (0, 0, 255),
}  # part-map colour of each part, in the reference's order
BACKGROUND_RGB = (204, 204, 204)  # background object j is drawn as (204, 204, 204 + j) in part maps
SPLITS = ("train", "test")


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"FunnyBirds file {path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def find_funnybirds_root(root: str | Path) -> Path:
    """`root` if it holds classes.json, else `root/FunnyBirds`; FileNotFoundError otherwise."""
    root = Path(root)
    for candidate in (root, root / "FunnyBirds"):
        if (candidate / "classes.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"FunnyBirds: {root / 'classes.json'} not found (nor {root / 'FunnyBirds/classes.json'})"
    )


def read_class_parts(path: Path, parts: dict[str, list]) -> np.ndarray:
    """classes.json -> (C, P) variant index of every slot (parts.json key order), by class_idx."""
    entries = read_json(path)
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty list of classes")
    table = np.full((len(entries), len(parts)), -1, dtype=np.int64)
    for n, entry in enumerate(entries):
        where = f"{path}: entry {n}"
        c = entry.get("class_idx") if isinstance(entry, dict) else None
        if not isinstance(c, int) or not 0 <= c < len(entries) or table[c, 0] >= 0:
            raise ValueError(
                f"{where}: class_idx must be a new integer in 0..{len(entries) - 1}, found {c!r}"
            )
        variants = entry.get("parts", {})
        if not isinstance(variants, dict) or sorted(variants) != sorted(parts):
            raise ValueError(f"{where}: parts must name exactly the slots {sorted(parts)} of parts.json")
        for p, slot in enumerate(parts):
            if not isinstance(variants[slot], int) or not 0 <= variants[slot] < len(parts[slot]):
                raise ValueError(
                    f"{where}: {slot} variant {variants[slot]!r} outside 0..{len(parts[slot]) - 1}"
                )
            table[c, p] = variants[slot]
    return table


def read_samples(path: Path, num_classes: int) -> list[dict]:
    """dataset_{split}.json: a list of per-image parameter dicts with a valid class_idx."""
    samples = read_json(path)
    if not isinstance(samples, list):
        raise ValueError(f"{path}: expected a list of images")
    for n, sample in enumerate(samples):
        c = sample.get("class_idx") if isinstance(sample, dict) else None
        if not isinstance(c, int) or not 0 <= c < num_classes:
            raise ValueError(
                f"{path}: entry {n}: class_idx must be an integer in 0..{num_classes - 1}, found {c!r}"
            )
    return samples


class FunnyBirds(FileImageDataset):
    """FunnyBirds "train" or "test": images, exact part masks, part and background interventions.

    Args:
        root: the FunnyBirds folder (holding classes.json) or its parent.
        split: "train" or "test".
    """

    name = "funnybirds"

    def __init__(self, root: str | Path, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"FunnyBirds split must be one of {list(SPLITS)}, got {split!r}")
        if not str(root):
            raise ValueError("FunnyBirds needs data.root: the FunnyBirds folder")
        self.root = find_funnybirds_root(root)
        self.split = split
        parts = read_json(self.root / "parts.json")
        if not (isinstance(parts, dict) and parts and all(isinstance(v, list) and v for v in parts.values())):
            raise ValueError(f"{self.root / 'parts.json'}: expected {{slot: [variants, ...]}}")
        self.part_slots = tuple(parts)  # P slots in parts.json order
        self.class_parts = read_class_parts(self.root / "classes.json", parts)  # (C, P)
        self.classes = tuple(
            "-".join(f"{s}{v}" for s, v in zip(self.part_slots, row)) for row in self.class_parts.tolist()
        )
        self.samples = read_samples(self.root / f"dataset_{split}.json", len(self.classes))
        self.labels = np.asarray([s["class_idx"] for s in self.samples], dtype=np.int64)
        self.files = tuple(f"{split}/{c}/{i:06d}.png" for i, c in enumerate(self.labels.tolist()))
        self.part_names = tuple(PART_COLOURS)
        self.part_groups = {
            s: tuple(n for n in PART_COLOURS if n.rstrip("0123456789") == s) for s in self.part_slots
        }

    @property
    def has_parts(self) -> bool:
        return (self.root / f"{self.split}_part_map").is_dir()

    def _item(self, index: int) -> str:
        """`<class_idx>/<i:06d>` of image `index` (the reference's file stem)."""
        return f"{self.labels[index]}/{index:06d}"

    def part_map(self, index: int) -> np.ndarray:
        """(H, W, 3) uint8 colour-coded part map of image `index` (alpha dropped)."""
        return np.asarray(open_rgb(self.root / f"{self.split}_part_map" / f"{self._item(index)}.png"))

    def annotations(self, index: int) -> PartAnnotations | None:
        """Exact part masks from the part map; keypoints = mask centroids (x, y); no box."""
        if not self.has_parts:
            return None
        colours = self.part_map(index)  # (H, W, 3)
        masks = np.stack([(colours == c).all(axis=2) for c in PART_COLOURS.values()])  # (P, H, W)
        visible = masks.any(axis=(1, 2))
        keypoints = np.zeros((len(masks), 2), dtype=np.float32)  # (P, 2) as (x, y)
        for p in np.flatnonzero(visible):
            rows, cols = np.nonzero(masks[p])
            keypoints[p] = (cols.mean(), rows.mean())
        return PartAnnotations(self.part_names, keypoints, visible, None, masks)

    def num_background_objects(self, index: int) -> int:
        """Number of background objects of image `index` (from its `bg_objects` parameter)."""
        value = self.samples[index].get("bg_objects")
        if not isinstance(value, str):
            raise ValueError(
                f"{self.root / f'dataset_{self.split}.json'}: entry {index}: no 'bg_objects' string"
            )
        return len(re.findall(r"\d+", value))

    def background_masks(self, index: int) -> np.ndarray:
        """(M, H, W) bool visible pixels of each background object j (colour (204, 204, 204 + j))."""
        colours = self.part_map(index)  # (H, W, 3)
        r, g, b = BACKGROUND_RGB
        masks = [(colours == (r, g, b + j)).all(axis=2) for j in range(self.num_background_objects(index))]
        return np.stack(masks) if masks else np.zeros((0, *colours.shape[:2]), dtype=bool)

    def intervention_path(self, index: int, removed_parts: Sequence[str]) -> Path:
        """File of image `index` re-rendered without the named slots (none removed: all-parts re-render)."""
        unknown = sorted(set(removed_parts) - set(self.part_slots))
        if unknown:
            raise ValueError(f"unknown FunnyBirds part(s) {unknown}; valid: {list(self.part_slots)}")
        kept = sorted(set(self.part_slots) - set(removed_parts))
        name = "body_" + "_".join(kept) + ".png"
        return self.root / f"{self.split}_interventions" / self._item(index) / name

    def intervention(self, index: int, removed_parts: Sequence[str]) -> Image.Image:
        """Image `index` re-rendered without the named part slots (e.g. ["beak", "wing"]).

        With no slot removed this is the re-render with all parts (`body_beak_eye_foot_tail_wing.png`),
        which the reference evaluates in place of the original image when nothing is removed.
        """
        return open_rgb(self.intervention_path(index, removed_parts))

    def has_full_render(self, index: int) -> bool:
        """Whether image `index` has its all-parts re-render on disk (see `intervention`)."""
        return self.intervention_path(index, ()).is_file()

    def background_intervention(self, index: int, object_index: int) -> Image.Image:
        """Image `index` re-rendered without background object `object_index`."""
        count = self.num_background_objects(index)
        if not 0 <= object_index < count:
            raise IndexError(f"background object {object_index} out of range [0, {count}) for image {index}")
        folder = self.root / f"{self.split}_interventions" / self._item(index) / "background_interventions"
        return open_rgb(folder / f"{object_index}.png")

    def render(
        self, index: int, *, remove_parts: Sequence[int] = (), remove_background: Sequence[int] = ()
    ) -> Image.Image:
        """SyntheticParts-style access: slots or ONE background object removed (the stored re-renders)."""
        if remove_parts and remove_background or len(remove_background) > 1:
            raise ValueError(
                "FunnyBirds stores re-renders without parts, or without one background object, not both"
            )
        if remove_background:
            return self.background_intervention(index, int(remove_background[0]))
        if remove_parts:
            bad = [p for p in remove_parts if not 0 <= int(p) < len(self.part_slots)]
            if bad:
                raise IndexError(f"part indices {bad} out of range [0, {len(self.part_slots)})")
            return self.intervention(index, [self.part_slots[int(p)] for p in remove_parts])
        return self.load_image(index)

    def minimal_sufficient_parts(self, class_index: int) -> list[tuple[int, ...]]:
        """Minimal slot sets that tell class `class_index` apart from every other class."""
        if not 0 <= class_index < self.num_classes:
            raise IndexError(f"class_index {class_index} out of range [0, {self.num_classes})")
        return minimal_sufficient_sets(self.class_parts, class_index)
