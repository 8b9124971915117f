"""Miniature copies of the official dataset layouts (file names and formats as released).

Every builder writes into a given folder and returns the dataset root; the module constants
hold the values the tests check against (computed by hand in the tests, not by the loaders).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image


def write_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> np.ndarray:
    """A seeded noise image (W, H) = size, saved by extension; returns its (H, W, C) pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = len(mode)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels if channels > 1 else pixels[..., 0], mode=mode)
    image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return pixels


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# ---- CUB-200-2011 -------------------------------------------------------------------------

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
CUB_PARTS = [
    "back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg",
    "left wing", "nape", "right eye", "right leg", "right wing", "tail", "throat",
]  # fmt: skip
# id, class id, file, is_training_image, (W, H), box (x, y, w, h)
CUB_IMAGES = [
    (1, 1, "Black_Footed_Albatross_0046_18.jpg", 1, (60, 40), (10.7, 5.2, 30.9, 20.5)),
    (2, 1, "Black_Footed_Albatross_0009_34.jpg", 0, (50, 50), (0.0, 0.0, 50.0, 50.0)),
    (3, 2, "Laysan_Albatross_0002_1027.jpg", 1, (48, 64), (4.0, 8.0, 40.0, 50.0)),
    (4, 3, "Sooty_Albatross_0031_1066.jpg", 1, (64, 48), (1.5, 2.5, 60.9, 44.9)),
    (5, 2, "Laysan_Albatross_0049_918.jpg", 0, (40, 40), (2.0, 3.0, 30.0, 30.0)),
    (6, 3, "Sooty_Albatross_0008_796.jpg", 0, (40, 30), (5.0, 5.0, 20.0, 20.0)),
    (7, 1, "Black_Footed_Albatross_0002_55.jpg", 1, (44, 36), (0.0, 1.0, 44.0, 35.0)),
]
CUB_BEAK_OF_IMAGE_1 = (35.5, 12.25)  # part 2 of image 1, visible; its back (part 1) is not visible


def cub_part(image_id: int, part: int) -> tuple[float, float, int]:
    """(x, y, visible) of a part; invisible parts are written as 0.0 0.0 0 like the real file."""
    if image_id == 1 and part == 2:
        return (*CUB_BEAK_OF_IMAGE_1, 1)
    if (image_id + part) % 4 == 0 or (image_id == 1 and part == 1):
        return 0.0, 0.0, 0
    return 2.5 + part + image_id, 1.25 + 2 * part, 1


def write_cub(parent: Path) -> Path:
    """CUB_200_2011/ with the seven annotation files and JPEG images; returns that folder."""
    root = parent / "CUB_200_2011"
    paths = {i: f"{CUB_CLASSES[c - 1]}/{name}" for i, c, name, *_ in CUB_IMAGES}
    for i, _, _, _, size, _ in CUB_IMAGES:
        write_image(root / "images" / paths[i], size, seed=i)
    write_lines(root / "images.txt", [f"{i} {paths[i]}" for i in paths])
    write_lines(root / "image_class_labels.txt", [f"{i} {c}" for i, c, *_ in CUB_IMAGES])
    write_lines(root / "train_test_split.txt", [f"{i} {t}" for i, _, _, t, *_ in CUB_IMAGES])
    write_lines(root / "bounding_boxes.txt", [f"{i} {x} {y} {w} {h}" for i, *_, (x, y, w, h) in CUB_IMAGES])
    write_lines(root / "classes.txt", [f"{k} {name}" for k, name in enumerate(CUB_CLASSES, 1)])
    write_lines(root / "parts" / "parts.txt", [f"{k} {name}" for k, name in enumerate(CUB_PARTS, 1)])
    locs = []
    for i, *_ in CUB_IMAGES:
        for p in range(1, len(CUB_PARTS) + 1):
            x, y, v = cub_part(i, p)
            locs.append(f"{i} {p} {x:.1f} {y:.1f} {v}" if (x, y) == (0, 0) else f"{i} {p} {x} {y} {v}")
    write_lines(root / "parts" / "part_locs.txt", locs)
    return root


# ---- Stanford Cars-196 --------------------------------------------------------------------

CARS_CLASSES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]
CARS_SIZE = (48, 32)  # (W, H) of every image
# fname, 1-based class, (x1, y1, x2, y2)
CARS_TRAIN = [
    ("00001.jpg", 3, (5, 6, 40, 30)),
    ("00002.jpg", 1, (0, 0, 48, 32)),
    ("00003.jpg", 2, (10, 2, 20, 12)),
    ("00004.jpg", 1, (1, 1, 47, 31)),
]
CARS_TEST = [("00001.jpg", 2, (2, 3, 30, 25)), ("00002.jpg", 3, (0, 4, 44, 28))]
CARS_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def cars_struct(entries: list[tuple[str, int, tuple[int, ...]]], *, fields=CARS_FIELDS) -> np.ndarray:
    """A (1, N) MATLAB struct array like the devkit's `annotations` (2-D numeric fields)."""
    records = np.zeros((1, len(entries)), dtype=[(f, object) for f in fields])
    for n, (fname, label, box) in enumerate(entries):
        values = {
            **{f: np.array([[v]], dtype=np.uint16) for f, v in zip(CARS_FIELDS[:4], box)},
            "class": np.array([[label]], dtype=np.uint8),
            "fname": np.array([fname]),
        }
        records[0, n] = tuple(values[f] for f in fields)
    return records


def write_cars(parent: Path, *, layout: str = "devkit") -> Path:
    """The original devkit layout in `parent`, or torchvision's under `parent/stanford_cars`."""
    base = parent / "stanford_cars" if layout == "torchvision" else parent
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    names = np.empty((1, len(CARS_CLASSES)), dtype=object)
    names[0, :] = CARS_CLASSES
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": cars_struct(CARS_TRAIN)})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": cars_struct(CARS_TEST)})
    for folder, entries in (("cars_train", CARS_TRAIN), ("cars_test", CARS_TEST)):
        for n, (fname, *_) in enumerate(entries):
            write_image(base / folder / fname, CARS_SIZE, seed=100 + n)
    return parent


# ---- ImageNet-1k --------------------------------------------------------------------------

IMAGENET_WORDS = {
    "n01440764": "tench, Tinca tinca",
    "n01443537": "goldfish, Carassius auratus",
    "n02102040": "English springer, English springer spaniel",
}
IMAGENET_IDS = {"n02102040": 1, "n01440764": 2, "n01443537": 3}  # ILSVRC2012_IDs, not in wnid order
IMAGENET_VAL = ["n01443537", "n01440764", "n02102040", "n01440764", "n01443537"]  # wnid of val image n
IMAGENET_TRAIN_PER_CLASS = 2


def imagenet_meta(path: Path) -> None:
    """A devkit meta.mat: (N, 1) struct `synsets`, leaves plus one non-leaf synset."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height"]
    fields.append("num_train_images")
    rows = [(i, w, IMAGENET_WORDS[w], "gloss", 0, np.zeros((1, 0)), 0, 1300) for w, i in IMAGENET_IDS.items()]
    rows.append((4, "n00001740", "entity", "root", 3, np.array([[1, 2, 3]]), 19, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for n, row in enumerate(rows):
        synsets[n, 0] = tuple(np.array([[v]]) if isinstance(v, int) else v for v in row)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": synsets})


def write_imagenet(parent: Path, *, val: str = "folders") -> Path:
    """train/<wnid>/ plus val/ as "folders", flat with the "kaggle" csv, or flat with the "devkit" truth."""
    images = parent / "ILSVRC" / "Data" / "CLS-LOC" if val == "kaggle" else parent
    for c, wnid in enumerate(sorted(IMAGENET_WORDS)):
        for k in range(IMAGENET_TRAIN_PER_CLASS):
            write_image(images / "train" / wnid / f"{wnid}_{1000 + k}.JPEG", (16, 12), seed=10 * c + k)
    for n, wnid in enumerate(IMAGENET_VAL, 1):
        folder = images / "val" / wnid if val == "folders" else images / "val"
        write_image(folder / f"ILSVRC2012_val_{n:08d}.JPEG", (12, 16), seed=50 + n)
    if val == "kaggle":
        write_lines(
            parent / "LOC_synset_mapping.txt", [f"{w} {IMAGENET_WORDS[w]}" for w in sorted(IMAGENET_WORDS)]
        )
        rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 10 11 {w} 3 4 8 9" for n, w in enumerate(IMAGENET_VAL, 1)]
        write_lines(parent / "LOC_val_solution.csv", ["ImageId,PredictionString", *reversed(rows)])
    if val == "devkit":
        data = parent / "ILSVRC2012_devkit_t12" / "data"
        imagenet_meta(data / "meta.mat")
        write_lines(
            data / "ILSVRC2012_validation_ground_truth.txt", [str(IMAGENET_IDS[w]) for w in IMAGENET_VAL]
        )
    return parent


# ---- FunnyBirds ---------------------------------------------------------------------------

FB_SIZE = 256  # official image side
FB_VARIANTS = {"beak": 4, "eye": 3, "foot": 4, "tail": 9, "wing": 6}  # variants per slot, as released
FB_CLASSES = [
    {"beak": 0, "eye": 0, "foot": 0, "tail": 0, "wing": 0},
    {"beak": 1, "eye": 0, "foot": 0, "tail": 0, "wing": 0},
    {"beak": 1, "eye": 2, "foot": 0, "tail": 0, "wing": 5},
]
FB_TEST = [(1, "3,0,"), (0, ""), (2, "4,")]  # (class_idx, bg_objects) of test images 0, 1, 2
FB_TRAIN = [(0, "1,"), (1, "2,2,"), (2, ""), (0, "0,")]
FB_BEAK = (slice(30, 34), slice(10, 20))  # rows, cols of the beak in test image 0's part map
FB_EYE = (50, 100)  # row, col of the single eye01 pixel
FB_BACKGROUND = [(slice(0, 2), slice(0, 3)), (slice(200, 201), slice(5, 9))]  # objects 0 and 1


def _fb_sample(class_idx: int, bg_objects: str) -> dict:
    sample = {"class_idx": class_idx, "camera_distance": 300, "camera_pitch": 1.0, "camera_roll": 0.5}
    for slot, variant in FB_CLASSES[class_idx].items():
        sample[f"{slot}_model"] = f"{slot}{variant + 1:02d}.glb"
    return {**sample, "bg_objects": bg_objects, "bg_radius": "150," * bg_objects.count(",")}


def fb_part_map() -> np.ndarray:
    """(H, W, 4) RGBA part map of test image 0: a beak, one eye pixel, two background objects."""
    colours = np.zeros((FB_SIZE, FB_SIZE, 4), dtype=np.uint8)
    colours[..., 3] = 255
    colours[FB_BEAK] = (255, 255, 0, 255)
    colours[FB_EYE] = (255, 255, 253, 255)
    for j, region in enumerate(FB_BACKGROUND):
        colours[region] = (204, 204, 204 + j, 255)
    return colours


def write_funnybirds(parent: Path) -> Path:
    """FunnyBirds/ with json files, RGBA images, test part maps and test interventions."""
    root = parent / "FunnyBirds"
    root.mkdir(parents=True)
    parts = {
        s: [{"model": f"{s}{k + 1:02d}.glb", "color": "red"} for k in range(n)]
        for s, n in FB_VARIANTS.items()
    }
    (root / "parts.json").write_text(json.dumps(parts))
    classes = [{"class_idx": c, "parts": p} for c, p in enumerate(FB_CLASSES)]
    (root / "classes.json").write_text(json.dumps(classes))
    for split, samples in (("train", FB_TRAIN), ("test", FB_TEST)):
        (root / f"dataset_{split}.json").write_text(json.dumps([_fb_sample(c, bg) for c, bg in samples]))
        for i, (c, _) in enumerate(samples):
            write_image(root / split / str(c) / f"{i:06d}.png", (FB_SIZE, FB_SIZE), seed=200 + i, mode="RGBA")
    for i, (c, _) in enumerate(FB_TEST):
        path = root / "test_part_map" / str(c) / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fb_part_map() if i == 0 else np.zeros((FB_SIZE, FB_SIZE, 4), np.uint8), "RGBA").save(
            path
        )
    folder = root / "test_interventions" / "1" / "000000"
    write_image(folder / "body_eye_foot_tail_wing.png", (FB_SIZE, FB_SIZE), seed=300, mode="RGBA")
    write_image(folder / "body_.png", (FB_SIZE, FB_SIZE), seed=301, mode="RGBA")
    for j in range(2):
        write_image(
            folder / "background_interventions" / f"{j}.png", (FB_SIZE, FB_SIZE), seed=310 + j, mode="RGBA"
        )
    return root


# ---- image folders ------------------------------------------------------------------------

FOLDER_SPLIT = {"cat/a.png": "train", "cat/b.jpg": "test", "cat/sub/c.png": "train", "dog/d.JPEG": "train"}
FOLDER_SPLIT["dog/e f.png"] = "test"  # a name with a space
FOLDER_UNLISTED = ["dog/g.png"]  # on disk, not in the split file


def write_image_folder(parent: Path) -> Path:
    """root/<class>/... images, a non-image file and `split.txt`; returns root."""
    root = parent / "folder"
    for n, rel in enumerate([*FOLDER_SPLIT, *FOLDER_UNLISTED]):
        write_image(root / rel, (10, 8), seed=400 + n)
    (root / "dog" / "notes.txt").write_text("not an image\n")
    lines = ["# path split", ""] + [f"{rel} {split}" for rel, split in FOLDER_SPLIT.items()]
    write_lines(root / "split.txt", lines)
    return root


POOL_CLASSES = ("bee", "cat", "dog")  # your own images: written out of order, the loader must sort them


def write_pool(root: Path, per_class: int = 10, prefix: str = "") -> Path:
    """root/<prefix>/<class>/<i>.png for every class of POOL_CLASSES (seeded noise); returns root."""
    for c, name in enumerate(reversed(POOL_CLASSES)):
        for i in range(per_class):
            write_image(root / prefix / name / f"{i:02d}.png", (6, 5), seed=100 * c + i)
    return root
