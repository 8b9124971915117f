"""Ready-made run settings, built from the config alone (no torch), so `--help` can show them."""

from __future__ import annotations

from pathlib import Path

from protoquant.config import CacheConfig, CodebookConfig, HeadConfig, RunConfig


def demo_config(out: str = "runs/demo") -> RunConfig:
    """Settings for the built-in data: a small codebook, tau and lr chosen on validation, 5 prototypes per class."""
    return RunConfig(
        out=out,
        cache=CacheConfig(root=str(Path(out) / "cache")),
        # K = 32: about two prototypes per part variant, so 5 per class cover a class's parts
        codebook=CodebookConfig(num_prototypes=32, epochs=10, kmeans_patches=50_000),
        head=HeadConfig(temperature_grid=(0.02, 0.05), lr_grid=(5e-2, 2e-1), epochs=100),
    )
