"""Gallery tiles drawn once per model: kept in a cache folder (in the checkpoint) and copied into
every report, so a report of a few images does not redraw the prototype gallery.

A tile depends only on the gallery (the model's prototypes, their patches and its colour scale),
so the cache folder is keyed by the gallery's model hash, its top-k and TILE_VERSION. Without a
cache folder, or where it cannot be written, tiles are drawn straight into the report.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from protoquant.explain.types import Gallery
from protoquant.render.tiles import save_tile

logger = logging.getLogger(__name__)

TILE_VERSION = 4  # bump when gallery tiles are drawn differently: cached ones are then redrawn
KEY_CHARS = 16  # hex characters of the model hash in the cache folder's name


class TileWriter:
    """Writes a report's images into `out/img`; gallery tiles go through the cache folder."""

    def __init__(self, out: Path, cache: str | Path | None, gallery: Gallery):
        self.img = out / "img"
        self.img.mkdir(parents=True, exist_ok=True)
        key = f"{gallery.model_hash[:KEY_CHARS]}-top{gallery.top_k}-v{TILE_VERSION}"
        self.cache = Path(cache) / key if cache is not None else None
        self.drawn = self.reused = 0  # gallery tiles drawn now / copied from the cache

    def report_tile(self, name: str, image: Image.Image) -> str:
        """An image of this report only (the explained images); returns its relative src."""
        save_tile(image, self.img / name)
        return f"img/{name}"

    def gallery_tile(self, name: str, draw: Callable[[], Image.Image]) -> str:
        """A tile of the model's gallery: copied from the cache, drawn (and cached) when missing."""
        target = self.img / name
        if self.cache is not None:
            cached = self.cache / name
            if cached.is_file():
                shutil.copyfile(cached, target)
                self.reused += 1
                return f"img/{name}"
            if self._store(cached, draw()):
                shutil.copyfile(cached, target)
                return f"img/{name}"
        save_tile(draw(), target)
        self.drawn += 1
        return f"img/{name}"

    @staticmethod
    def _drop_stale(folder: Path) -> None:
        """Remove the tiles of other models (or older versions) from the cache before a new key."""
        if folder.parent.is_dir():
            for stale in (p for p in folder.parent.iterdir() if p.is_dir() and p != folder):
                logger.info("removing stale gallery tiles %s", stale)
                shutil.rmtree(stale, ignore_errors=True)

    def _store(self, cached: Path, image: Image.Image) -> bool:
        """Save a drawn tile into the cache atomically; False (logged once) where it cannot be written."""
        try:
            if not cached.parent.is_dir():
                self._drop_stale(cached.parent)
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.tmp-{os.getpid()}.jpg")
            save_tile(image, tmp)
            os.replace(tmp, cached)
        except OSError as error:
            logger.warning(
                "cannot keep gallery tiles in %s (%s); drawing them into the report", self.cache, error
            )
            self.cache = None
            return False
        self.drawn += 1
        return True
