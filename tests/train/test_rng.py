"""Training draws from its own seeded generators: the caller's global RNG state is left as it was,
and the same seed gives the same heads."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import protoquant.pipeline as pipeline
from protoquant.config import CodebookConfig, HeadConfig, ProbeConfig
from protoquant.head import ProtoQuantHead
from protoquant.train.baseline import train_baseline_head
from protoquant.train.codebook import train_codebook
from protoquant.train.head import train_head
from protoquant.train.probe import train_probe

CPU = torch.device("cpu")
FAST_HEAD = HeadConfig(epochs=3, top_k_per_class=2, top_k_epochs=2)  # top-k: the weights restart too


def _stages(caches, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """State dicts of the probe, codebook, head and baseline head trained with `seed`."""
    probe = train_probe(caches.train, caches.val, 3, ProbeConfig(epochs=2), seed=seed, device=CPU)
    codebook_config = CodebookConfig(num_prototypes=8, kmeans_patches=100, kmeans_iters=2, epochs=1)
    quantizer, _ = train_codebook(caches.train, caches.val, probe, codebook_config, seed=seed, device=CPU)
    codes = quantizer.codebook.detach()
    usage = torch.ones(len(codes))
    head, _ = train_head(codes, usage, caches.train, caches.val, 3, FAST_HEAD, seed=seed, device=CPU)
    baseline, _ = train_baseline_head(caches.train, caches.val, 3, FAST_HEAD, seed=seed, device=CPU)
    modules = {"probe": probe, "codebook": quantizer, "head": head, "baseline": baseline}
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in modules.items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_stages_leave_the_global_generator_alone_and_repeat(tiny_run) -> None:
    caches = tiny_run.result.caches
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = _stages(caches, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)  # a different global state must not change the results
    second = _stages(caches, seed=0)
    for name in first:
        assert _equal(first[name], second[name]), name
    other = _stages(caches, seed=1)
    assert not _equal(first["probe"], other["probe"]) and not _equal(first["head"], other["head"])


def test_a_run_on_a_built_cache_leaves_the_global_generator_alone(tiny_run, tmp_path) -> None:
    config = replace(tiny_run.config, out=str(tmp_path / "out"))  # the tiny run's cache, a new run folder
    torch.manual_seed(7)
    state = torch.get_rng_state()
    result = pipeline.run(config)
    assert torch.equal(torch.get_rng_state(), state)
    assert _equal(result.model.head.state_dict(), tiny_run.result.model.head.state_dict())


@pytest.mark.parametrize("seed", [0, 5])
def test_new_heads_draw_their_initial_weights_from_the_seed(seed) -> None:
    codes = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    make = lambda: ProtoQuantHead(codes, 3, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    state = torch.get_rng_state()
    assert torch.equal(make().class_layer.weight, make().class_layer.weight)
    assert torch.equal(torch.get_rng_state(), state)
