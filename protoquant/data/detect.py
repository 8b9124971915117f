"""`data.dataset: auto`: tell a dataset's layout from the signature files of its official release.

Checked in this order, each by file names only (nothing is decoded):

| name | signature (in `root` or the sub-folder its loader also accepts) |
|---|---|
| `cub` | `images.txt` and `train_test_split.txt` (`root` or `root/CUB_200_2011`) |
| `funnybirds` | `classes.json` and `parts.json` (`root` or `root/FunnyBirds`) |
| `cars` | `devkit/cars_meta.mat` (`root` or `root/stanford_cars`) |
| `fashion-mnist` | `train-images-idx3-ubyte[.gz]` |
| `imagenet` | the Kaggle `ILSVRC/Data/CLS-LOC/` folder, `LOC_synset_mapping.txt` or the devkit's `meta.mat`, or `train/` of wnid folders only (`n01440764`) beside `val/` |
| `image-folder` | anything else: class folders, split folders or a split file (`protoquant.data.image_folder`) |

Without a root, `auto` is the built-in synthetic data.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path

from protoquant.config import DataConfig
from protoquant.data.cars import META_FILE as CARS_META
from protoquant.data.cars import TORCHVISION_DIR
from protoquant.data.cub import CUB_DIR
from protoquant.data.imagenet import DEVKIT_META, KAGGLE_IMAGES, SYNSET_MAPPING, find_meta

logger = logging.getLogger(__name__)

AUTO = "auto"
WNID = re.compile(r"n\d{8}")  # an ImageNet class folder name
FUNNYBIRDS_DIR = "FunnyBirds"
FASHION_MNIST_TRAIN = "train-images-idx3-ubyte"


def _has_all(folders: tuple[Path, ...], names: tuple[str, ...]) -> bool:
    return any(all((folder / name).is_file() for name in names) for folder in folders)


def _is_imagenet(root: Path) -> bool:
    if (root / KAGGLE_IMAGES).is_dir() or find_meta(root, SYNSET_MAPPING) or find_meta(root, DEVKIT_META):
        return True
    train, val = root / "train", root / "val"
    if not (train.is_dir() and val.is_dir()):
        return False
    with os.scandir(train) as entries:
        wnids = [e.name for e in entries if e.is_dir()]
    return bool(wnids) and all(WNID.fullmatch(w) for w in wnids)


def detect_dataset(root: str | Path) -> str:
    """The registry name of the layout found in `root` (see the module docstring).

    Raises:
        FileNotFoundError: `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {str(root)!r} is not a folder")
    if _has_all((root, root / CUB_DIR), ("images.txt", "train_test_split.txt")):
        return "cub"
    if _has_all((root, root / FUNNYBIRDS_DIR), ("classes.json", "parts.json")):
        return "funnybirds"
    if _has_all((root, root / TORCHVISION_DIR), (CARS_META,)):
        return "cars"
    if any((root / f"{FASHION_MNIST_TRAIN}{ext}").is_file() for ext in ("", ".gz")):
        return "fashion-mnist"
    if _is_imagenet(root):
        return "imagenet"
    return "image-folder"


def resolve_dataset(config: DataConfig) -> DataConfig:
    """`config` with `dataset: auto` replaced by the concrete name (what runs and checkpoints record)."""
    if config.dataset != AUTO:
        return config
    name = detect_dataset(config.root) if config.root else "synthetic"
    if config.root:
        logger.info("data.dataset auto: %s is a %s layout", config.root, name)
    return dataclasses.replace(config, dataset=name)
