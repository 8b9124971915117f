"""The Hugging Face Hub, offline: save_pretrained / from_pretrained round trips, the model card,
and push_to_hub / from_pretrained("owner/repo") against a mocked Hub and a local HF cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml

from protoquant.config import WEIGHT_THRESHOLD, RunConfig, from_dict
from protoquant.model import ProtoQuant

CHECKPOINT_FILES = {"config.json", "model.safetensors", "backbone.safetensors"}


@pytest.fixture(scope="module")
def loaded(tiny_run) -> ProtoQuant:
    return ProtoQuant.load(Path(tiny_run.config.out) / "model")


@pytest.fixture(scope="module")
def images(tiny_run) -> torch.Tensor:
    return torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def _config_block(card: str) -> dict:
    return yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])


def test_save_pretrained_round_trip(loaded, tiny_run, images, tmp_path) -> None:
    folder = loaded.save_pretrained(tmp_path / "hf", license="apache-2.0")
    assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES | {"README.md", "metrics.json"}
    assert json.loads((folder / "metrics.json").read_text()) == tiny_run.result.metrics
    again = ProtoQuant.from_pretrained(folder)
    assert again.checkpoint == folder and not again.training
    assert torch.equal(again.predict(images).logits, loaded.predict(images).logits)
    assert ProtoQuant.load(folder).config == loaded.config  # an ordinary checkpoint folder
    assert _front_matter((folder / "README.md").read_text())["license"] == "apache-2.0"


def test_model_card_facts(loaded, tiny_run, tmp_path) -> None:
    card = (loaded.save_pretrained(tmp_path / "hf") / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "protoquant" and meta["pipeline_tag"] == "image-classification"
    assert "protoquant" in meta["tags"] and "license" not in meta
    metrics = tiny_run.result.metrics
    for stage in ("linear_probe", "protoquant"):
        assert f"{100 * metrics[stage]['test_accuracy']:.1f} %" in card
    assert loaded.backbone.info.weights_hash in card and all(name in card for name in loaded.classes)
    weights = loaded.head.class_weights  # (C, K)
    global_size = int((weights.amax(dim=0) > WEIGHT_THRESHOLD).sum())
    per_class = float((weights > WEIGHT_THRESHOLD).sum(dim=1).float().mean())
    assert f"| explanation size | {global_size} prototypes" in card
    assert f"| per-class size | {per_class:.1f} prototypes" in card
    assert f"| temperature (tau) | {loaded.head.temperature:g} |" in card
    assert from_dict(RunConfig, _config_block(card)) == loaded.config
    assert 'ProtoQuant.from_pretrained("OWNER/REPO")' in card and "gallery=False" in card


def test_card_without_metrics_says_so(tiny_run, loaded, tmp_path) -> None:
    in_memory = tiny_run.result.model  # no folder: no metrics.json to find
    card = (in_memory.save_pretrained(tmp_path / "bare") / "README.md").read_text()
    assert "Not recorded" in card and "metrics" not in _front_matter(card)
    assert not (tmp_path / "bare" / "metrics.json").exists()
    run = tmp_path / "run"
    shutil.copytree(loaded.checkpoint, run / "model")
    metrics = {**tiny_run.result.metrics, "backbone": {"weights_hash": "0" * 64}}
    (run / "metrics.json").write_text(json.dumps(metrics))  # a run on other weights
    card = (ProtoQuant.load(run / "model").save_pretrained(tmp_path / "other") / "README.md").read_text()
    assert "Not recorded" in card


@pytest.fixture
def mock_hub(monkeypatch, tmp_path) -> dict:
    """HfApi.create_repo / upload_folder record their calls and keep a copy of the uploaded folder."""
    calls: dict = {"remote": tmp_path / "remote"}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = (repo_id, kwargs)
        shutil.copytree(folder_path, calls["remote"])
        return f"https://huggingface.co/{repo_id}/commit/0123"

    def snapshot_download(repo_id, **kwargs):
        calls["snapshot_download"] = (repo_id, kwargs)
        return str(calls["remote"])

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_push_to_hub_then_from_pretrained(loaded, tiny_run, images, mock_hub) -> None:
    url = loaded.push_to_hub("user/repo", private=True, commit_message="first")
    assert url.endswith("/commit/0123")
    assert mock_hub["create_repo"] == ("user/repo", {"private": True, "exist_ok": True, "repo_type": "model"})
    repo_id, upload = mock_hub["upload_folder"]
    assert repo_id == "user/repo" and upload["commit_message"] == "first"
    remote = mock_hub["remote"]
    assert {p.name for p in remote.iterdir()} == CHECKPOINT_FILES | {"README.md", "metrics.json"}
    card = (remote / "README.md").read_text()
    assert f"{100 * tiny_run.result.metrics['protoquant']['test_accuracy']:.1f} %" in card
    assert from_dict(RunConfig, _config_block(card)) == loaded.config
    assert 'ProtoQuant.from_pretrained("user/repo")' in card
    pulled = ProtoQuant.from_pretrained("user/repo", revision="v1", local_files_only=True)
    repo_id, download = mock_hub["snapshot_download"]
    assert repo_id == "user/repo" and download["revision"] == "v1" and download["local_files_only"]
    assert "model.safetensors" in download["allow_patterns"]
    assert pulled.checkpoint == remote
    assert torch.equal(pulled.predict(images).logits, loaded.predict(images).logits)


def test_from_pretrained_reads_the_local_hf_cache_offline(loaded, images, tmp_path) -> None:
    """A real snapshot_download over a hand-made HF cache (HF_HUB_OFFLINE=1 in the tests)."""
    repo = tmp_path / "hub" / "models--user--repo"
    snapshot = repo / "snapshots" / ("a" * 40)
    loaded.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    pulled = ProtoQuant.from_pretrained("user/repo", cache_dir=tmp_path / "hub")
    assert pulled.checkpoint == snapshot
    assert torch.equal(pulled.predict(images).logits, loaded.predict(images).logits)
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        ProtoQuant.from_pretrained("user/missing", cache_dir=tmp_path / "hub", local_files_only=True)


def test_a_name_that_is_neither_folder_nor_repo_id(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor"):
        ProtoQuant.from_pretrained(str(tmp_path / "no" / "such" / "model"))
