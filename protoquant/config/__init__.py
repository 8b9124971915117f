"""Every knob of a run, as frozen dataclasses with the paper's values as defaults.

`RunConfig` nests one dataclass per stage (`protoquant.config.sections`). It round-trips through
plain dicts and YAML (`protoquant.config.files`), and the CLI derives its `--section.field` flags
from these definitions.
"""

from protoquant.config.files import (
    RENAMED_FIELDS,
    flat_fields,
    from_dict,
    leaf_fields,
    load_yaml,
    save_yaml,
    to_dict,
    upgrade,
    with_overrides,
)
from protoquant.config.sections import (
    RGB_CHANNELS,
    SEED_MAX,
    WEIGHT_THRESHOLD,
    BackboneConfig,
    CacheConfig,
    CodebookConfig,
    DataConfig,
    FinetuneConfig,
    HeadConfig,
    Interpolation,
    ProbeConfig,
    PrototypeInit,
    RunConfig,
    ScoresDtype,
)

__all__ = [
    "RENAMED_FIELDS",
    "RGB_CHANNELS",
    "SEED_MAX",
    "WEIGHT_THRESHOLD",
    "BackboneConfig",
    "CacheConfig",
    "CodebookConfig",
    "DataConfig",
    "FinetuneConfig",
    "HeadConfig",
    "Interpolation",
    "ProbeConfig",
    "PrototypeInit",
    "RunConfig",
    "ScoresDtype",
    "flat_fields",
    "from_dict",
    "leaf_fields",
    "load_yaml",
    "save_yaml",
    "to_dict",
    "upgrade",
    "with_overrides",
]
