"""Ready-made run settings, built from the config alone (no torch), so `--help` can show them."""

from __future__ import annotations

from protoquant.config import BackboneConfig, CodebookConfig, HeadConfig, RunConfig

DEMO_STAGE = 3  # MobileNetV2 feature stage of the demo (14 x 14 grid)
DEMO_PROTOTYPES = 128  # K of the demo at that grid (32 lost 37 points there; BENCHMARKS.md)


def demo_config(out: str = "runs/demo") -> RunConfig:
    """Settings for the built-in data: part-scale features, tau and lr chosen on validation, 5 prototypes per class.

    MobileNetV2's stage 3 (14 x 14 grid, stride 16, receptive field 267 px) instead of its last map
    (7 x 7, 491 px): the leading prototypes land on the parts (BENCHMARKS.md, placement), and a
    finer grid needs more prototypes than the last map's 32 to keep accuracy.
    """
    return RunConfig(
        out=out,
        backbone=BackboneConfig(stage=DEMO_STAGE),
        codebook=CodebookConfig(num_prototypes=DEMO_PROTOTYPES, epochs=10, kmeans_patches=50_000),
        head=HeadConfig(temperature_grid=(0.02, 0.05), lr_grid=(5e-2, 2e-1), epochs=100),
    )
