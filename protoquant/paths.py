"""Where the feature cache lives: one folder shared by every run, whatever its `--out`.

An empty `cache.root` means `$PROTOQUANT_CACHE` if set, else `$XDG_CACHE_HOME/protoquant/features`,
else `~/.cache/protoquant/features` (the convention timm and Hugging Face follow). The environment
is read when a cache is opened, never at import.
"""

from __future__ import annotations

import os
from pathlib import Path

from protoquant.config import CacheConfig

CACHE_ENV = "PROTOQUANT_CACHE"  # the feature cache's folder, overriding the XDG default
CACHE_SUBDIR = Path("protoquant") / "features"  # inside $XDG_CACHE_HOME or ~/.cache


def default_cache_root() -> Path:
    """The folder an empty `cache.root` stands for (absolute)."""
    if os.environ.get(CACHE_ENV):
        return absolute(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return absolute(Path(base) / CACHE_SUBDIR)


def absolute(path: str | Path) -> Path:
    """`path` made absolute against the working directory, `~` expanded, `..` folded."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def cache_root(config: CacheConfig) -> Path:
    """The feature cache folder `config` names: its `root`, absolute, or the default when empty."""
    return absolute(config.root) if config.root else default_cache_root()
