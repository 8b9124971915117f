"""A damaged cache is repaired by build_cache (only the bad shards) or reported by name by FeatureStore."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import protoquant.cache.extract as extract
from protoquant.atomic import host_token
from protoquant.cache import verify
from protoquant.cache.build import FeatureStore, build_cache
from tests.cache.test_build import CountingBackbone, _transform

ENTRIES, SHARD = 36, 8  # tiny_synthetic, views=2; cache_config.shard_size


@pytest.fixture
def built(convnext, tiny_synthetic, cache_config):
    """(build() -> store, the first store, its features, its pooled features, the counting backbone)."""
    counting = CountingBackbone(convnext)
    transform = _transform(counting)

    def build():
        return build_cache(tiny_synthetic, counting, transform, views=2, config=cache_config)

    store = build()
    counting.images = 0
    return build, store, store.get(np.arange(ENTRIES)), store.pooled().clone(), counting


def _data_offset(path: Path) -> int:
    """Byte offset of the array data in a .npy file (after its header)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        read(handle)
        return handle.tell()


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 10)


def _flip_bits(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(_data_offset(path) + 5)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0b1010_0101]))


def _nan_bytes(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.seek(_data_offset(path))
        handle.write(np.full(8, np.nan, dtype=np.float16).tobytes())


CORRUPTIONS = {
    "truncated": ("features-00002.npy", _truncate, "truncated"),
    "flipped bits": ("features-00001.npy", _flip_bits, "checksum mismatch"),
    "NaN bytes": ("features-00004.npy", _nan_bytes, "checksum mismatch"),
    "deleted": ("pooled-00003.npy", Path.unlink, "missing"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_bad_shard_is_reported_by_name_and_recomputed_alone(built, caplog, corruption) -> None:
    build, store, features, pooled, counting = built
    name, damage, reason = CORRUPTIONS[corruption]
    damage(store.folder / name)
    with pytest.raises(ValueError, match=rf"{name}: {reason}.*rerunning caching"):
        FeatureStore(store.folder)
    with caplog.at_level(logging.WARNING):
        repaired = build()
    assert name in caplog.text and reason in caplog.text
    shard = int(name[-9:-4])
    assert counting.images == min(SHARD, ENTRIES - shard * SHARD)  # only that shard
    assert torch.equal(repaired.get(np.arange(ENTRIES)), features) and torch.equal(repaired.pooled(), pooled)
    assert FeatureStore(store.folder).manifest["complete"]


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("broken", ["garbage", "missing field"])
def test_an_unreadable_manifest_is_named_and_rewritten_keeping_the_shards(built, caplog, broken) -> None:
    build, store, features, _, counting = built
    path = store.folder / "manifest.json"
    if broken == "garbage":
        path.write_text('{"key": {"views": 2}, "comple')
    else:
        _edit_manifest(store.folder, lambda m: m.pop("grid"))
    with pytest.raises(ValueError, match=rf"{path}: (not valid JSON|missing field 'grid')"):
        FeatureStore(store.folder)
    with caplog.at_level(logging.WARNING):
        repaired = build()
    assert str(path) in caplog.text and counting.images == 0  # the shards' own records vouch for them
    assert torch.equal(repaired.get(np.arange(ENTRIES)), features)


def test_labels_come_from_the_dataset_and_an_edited_manifest_is_recomputed(
    built, tiny_synthetic, caplog
) -> None:
    build, store, features, _, counting = built
    _edit_manifest(store.folder, lambda m: m["labels"].__setitem__(3, (m["labels"][3] + 1) % 3))
    with pytest.raises(ValueError, match=r"manifest.json: labels differ from the dataset's at image 3"):
        FeatureStore(store.folder, labels=tiny_synthetic.labels)
    reader = FeatureStore(store.folder)  # without labels: the manifest's, for readers
    assert reader.labels[6] != np.repeat(tiny_synthetic.labels, 2)[6]
    with caplog.at_level(logging.WARNING):
        repaired = build()
    assert "manifest.json: labels differ" in caplog.text and counting.images == ENTRIES
    assert np.array_equal(repaired.labels, np.repeat(tiny_synthetic.labels, 2))
    assert torch.equal(repaired.get(np.arange(ENTRIES)), features)


def test_an_edited_shape_is_reported_and_recomputed(built, caplog) -> None:
    build, store, features, _, counting = built
    _edit_manifest(store.folder, lambda m: m.__setitem__("grid", [3, 3]))
    with pytest.raises(ValueError, match=r"manifest.json: shard 0: record says features-00000.npy is"):
        FeatureStore(store.folder)
    with caplog.at_level(logging.WARNING):
        repaired = build()
    assert "field 'grid' differs" in caplog.text and counting.images == ENTRIES
    assert torch.equal(repaired.get(np.arange(ENTRIES)), features)


def test_an_edited_shard_record_in_the_manifest_is_restored_from_the_shard_record(built) -> None:
    build, store, features, _, counting = built
    _edit_manifest(store.folder, lambda m: m["shards"][1]["files"]["pooled-00001.npy"].update(shape=[8, 9]))
    with pytest.raises(ValueError, match=r"manifest.json: shard 1: record says pooled-00001.npy"):
        FeatureStore(store.folder)
    repaired = build()
    assert counting.images == 0 and torch.equal(repaired.get(np.arange(ENTRIES)), features)


def test_a_deleted_record_is_restored_or_its_shard_recomputed(built, caplog) -> None:
    build, store, features, _, counting = built
    (store.folder / "shard-00002.json").unlink()
    with caplog.at_level(logging.WARNING):
        build()  # complete cache: the manifest still holds the record
    assert "shard-00002.json" in caplog.text and counting.images == 0
    assert (store.folder / "shard-00002.json").is_file()
    _edit_manifest(store.folder, lambda m: m.__setitem__("complete", False))  # an interrupted build
    (store.folder / "shard-00002.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        repaired = build()
    assert "features-00002.npy has no record" in caplog.text and counting.images == SHARD
    assert torch.equal(repaired.get(np.arange(ENTRIES)), features)


def test_non_finite_features_are_refused_when_written(
    convnext, tiny_synthetic, cache_config, monkeypatch
) -> None:
    original = extract.patch_features

    def overflowing(backbone, images, config, **kwargs):
        features = original(backbone, images, config, **kwargs)  # (B, D, H, W)
        features[-1, 0, 0, 0] = float("inf")
        return features

    monkeypatch.setattr(extract, "patch_features", overflowing)
    transform = _transform(convnext)
    with pytest.raises(
        ValueError, match=r"synthetic/train: shard 0 \(entries 0..7\) has non-finite.*first 3"
    ):
        build_cache(tiny_synthetic, convnext, transform, views=2, config=cache_config)
    assert not list(Path(cache_config.root).glob("*/features-*.npy"))


def _age(folder: Path, seconds: float) -> None:
    """Set every shard file's mtime `seconds` into the past (older than the racy window)."""
    for path in folder.glob("*-0*.npy"):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - int(seconds * 1e9)))


def test_the_stamp_spares_rehashing_until_a_file_changes(built, monkeypatch) -> None:
    _, store, _, _, _ = built
    hashed = []
    real = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    _age(store.folder, 3600)
    verify._MEMO.clear()  # as a new process
    FeatureStore(store.folder)
    assert len(hashed) == 2 * 5  # changed mtimes: every file hashed once, then stamped
    hashed.clear()
    (store.folder / "verified.json").unlink()
    FeatureStore(store.folder)
    assert hashed == []  # this process hashed them already (and writes the stamp again)
    verify._MEMO.clear()
    FeatureStore(store.folder)
    assert hashed == []  # a new process: stat only, against the stamp
    touched = store.folder / "pooled-00001.npy"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    FeatureStore(store.folder)
    assert hashed == ["pooled-00001.npy"]  # re-verified (and still sound)
    _flip_bits(store.folder / "features-00003.npy")  # now: racily clean, hashed again anyway
    with pytest.raises(ValueError, match="features-00003.npy: checksum mismatch"):
        FeatureStore(store.folder)


def test_temporary_files_of_dead_processes_are_removed(built) -> None:
    build, store, _, _, _ = built
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    names = {
        "dead": f".features-00001.npy.tmp-{pid}-{host_token()}.npy",
        "alive": f".manifest.json.tmp-{os.getpid()}-{host_token()}",
        "other machine": f".pooled-00002.npy.tmp-{pid}-another_host.npy",
    }
    for name in names.values():
        (store.folder / name).write_bytes(b"partial")
    build()
    assert not (store.folder / names["dead"]).exists()
    assert (store.folder / names["alive"]).exists() and (store.folder / names["other machine"]).exists()
