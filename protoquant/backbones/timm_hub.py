"""timm models named `timm/hf-hub:<org>/<name>[@revision]`, read from the local Hugging Face cache.

A timm repository on the Hugging Face hub holds `config.json` (the architecture, its arguments,
the class count and the pretrained config: input size, interpolation, crop_pct, mean, std) and
the weights (`model.safetensors`, or `pytorch_model.bin`). Both are looked up in the hub cache
(`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, read when the model is
built) as `models--<org>--<name>/snapshots/<commit>/`; nothing is downloaded unless
`backbone.download` is set, and a file that is missing fails at once, naming the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

from protoquant.backbones.weights import WeightsSource, explicit_timm_weights, hub_cache_dir, missing_weights

HF_HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's export names, preferred first


@dataclass(frozen=True)
class HubModel:
    """A timm hub repository's config.json, parsed: what `timm.create_model` needs to rebuild it."""

    repo: str  # <org>/<name>
    revision: str | None
    architecture: str  # a timm model name
    pretrained_cfg: dict = field(repr=False)
    model_args: dict = field(default_factory=dict)


def repo_folder(repo: str) -> Path:
    """Where the hub cache keeps repository `repo` (`models--<org>--<name>`)."""
    return hub_cache_dir() / f"models--{repo.replace('/', '--')}"


def split_name(model_name: str) -> tuple[str, str | None]:
    """`hf-hub:<org>/<name>[@revision]` -> (repo, revision)."""
    spec = model_name.removeprefix(HF_HUB_PREFIX)
    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"backbone name 'timm/{model_name}': expected 'timm/hf-hub:<org>/<name>[@revision]'")
    return repo, revision or None


def cached_file(repo: str, filename: str, revision: str | None, *, download: bool) -> Path | None:
    """`filename` of the repository from the hub cache; downloaded into it only if `download`."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.utils import EntryNotFoundError

    cache = str(hub_cache_dir())
    found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
    if isinstance(found, str):
        return Path(found)
    if not download:
        return None
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache))
    except EntryNotFoundError:
        return None


def _pretrained_cfg(data: dict, repo: str) -> tuple[str, dict]:
    """(architecture, pretrained config) of a config.json, in its current or its older one-dict form."""
    from timm.models import PretrainedCfg

    cfg = dict(data.get("pretrained_cfg", data))
    architecture = data.get("architecture", cfg.get("architecture"))
    if not isinstance(architecture, str):
        raise ValueError(f"{repo}/{CONFIG_FILE}: no 'architecture' (the timm model name)")
    if "num_classes" in data:
        cfg["num_classes"] = data["num_classes"]
    known = {f.name for f in fields(PretrainedCfg)}
    cfg = {k: v for k, v in cfg.items() if k in known and k not in ("file", "url", "state_dict")}
    return architecture, {**cfg, "hf_hub_id": repo, "architecture": architecture}


def load_hub_model(model_name: str, *, download: bool) -> HubModel:
    """Read the config.json of `hf-hub:<org>/<name>[@revision]` from the hub cache.

    Raises:
        FileNotFoundError: config.json is not cached (and `download` is off); the message says where.
        ValueError: the file is not a timm config, or names an architecture timm does not know.
    """
    import timm

    repo, revision = split_name(model_name)
    path = cached_file(repo, CONFIG_FILE, revision, download=download)
    if path is None:
        raise FileNotFoundError(
            f"backbone 'timm/{model_name}': {CONFIG_FILE} is not in the Hugging Face cache "
            f"({repo_folder(repo)}/snapshots/<commit>/). Provide it by one of: setting "
            "backbone.download=true on a machine with internet; copying that models--... folder from "
            "a machine that has it (HF_HUB_CACHE or HF_HOME choose the cache folder)."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    architecture, cfg = _pretrained_cfg(data, repo)
    if not timm.is_model(architecture):
        raise ValueError(f"{path}: architecture '{architecture}' is not a model of timm {timm.__version__}")
    return HubModel(repo, revision, architecture, cfg, dict(data.get("model_args") or {}))


def resolve_hub_weights(hub: HubModel, spec: str, download: bool) -> WeightsSource:
    """backbone.weights for a hub model: 'default' = the repository's weights file, 'none' or a file."""
    explicit = explicit_timm_weights(spec)
    if explicit is not None:
        return explicit
    for allowed in (False, True) if download else (False,):  # every cached name before any download
        for filename in WEIGHT_FILES:
            path = cached_file(hub.repo, filename, hub.revision, download=allowed)
            if path is not None:
                return WeightsSource(str(path), path=path)
    folder = repo_folder(hub.repo) / "snapshots" / "<commit>"
    raise missing_weights(f"timm/{HF_HUB_PREFIX}{hub.repo}", " or ".join(WEIGHT_FILES), [folder], "")
