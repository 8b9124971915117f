"""Caching and training under torchrun with 2 CPU processes (gloo) match a 1-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from protoquant import distributed
from protoquant.cache.build import FeatureStore

JOB = Path(__file__).with_name("distributed_job.py")
TOLERANCE = 1e-5  # same global batches; only float summation order differs between the runs


def _launch(args: list[str], tmp: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(JOB.parents[1])}
    done = subprocess.run(args, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    _launch([sys.executable, str(JOB), str(tmp / "one"), str(tmp / "cache1")], tmp)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _launch([*torchrun, str(JOB), str(tmp / "two"), str(tmp / "cache2")], tmp)
    return tmp


def test_two_process_shards_cover_every_entry_once(runs):
    for folder in sorted((runs / "cache2").iterdir()):
        records = [
            json.loads(line)
            for f in folder.glob("written-rank*.jsonl")
            for line in f.read_text().splitlines()
        ]
        store = FeatureStore(folder)
        covered = np.zeros(len(store), dtype=int)
        for record in records:
            assert record["world"] == 2 and record["shard"] % 2 == record["rank"]
            covered[record["first"] : record["first"] + record["count"]] += 1
        assert (covered == 1).all(), folder.name
        num_shards = -(-len(store) // store.shard_size)
        assert {r["rank"] for r in records} == {s % 2 for s in range(num_shards)}  # both ranks when 2+ shards


def test_two_process_cache_equals_one_process_cache(runs):
    one = {f.name: FeatureStore(f) for f in (runs / "cache1").iterdir()}
    two = {f.name: FeatureStore(f) for f in (runs / "cache2").iterdir()}
    assert one.keys() == two.keys() and len(one) == 3  # train, val, test
    for name in one:
        entries = one[name].entries()
        assert np.array_equal(one[name].get(entries).numpy(), two[name].get(entries).numpy())
        assert np.array_equal(one[name].labels, two[name].labels)


def test_two_process_training_matches_one_process(runs):
    one = load_file(str(runs / "one" / "model" / "model.safetensors"))
    two = load_file(str(runs / "two" / "model" / "model.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).abs().max() <= TOLERANCE, key
    metrics_one = json.loads((runs / "one" / "metrics.json").read_text())
    metrics_two = json.loads((runs / "two" / "metrics.json").read_text())
    assert metrics_two["timing"]["processes"] == 2
    for stage in ("linear_probe", "quantized", "protoquant"):
        assert metrics_one[stage]["test_accuracy"] == metrics_two[stage]["test_accuracy"]


def test_cli_train_under_torchrun_reports_once(tmp_path):
    from tests.test_cli import TINY

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(JOB.parents[1])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "protoquant.cli", "train", "--out", str(tmp_path / "out"), *TINY]
    command += ["--cache.root", str(tmp_path / "cache")]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("checkpoint:") == 1  # only rank 0 reports
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["timing"]["processes"] == 2


def test_gpu_process_groups_also_reduce_cpu_tensors() -> None:
    # accuracy counts, code usage and stage-2 scores are reduced as CPU tensors: NCCL alone rejects them
    assert distributed.backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
