"""The logits path: same logits and scores as the reference forward, and reuse that never goes stale.

Tolerances (fp32): scores atol 1e-6 at tau >= 0.1 (1e-5 at tau = 0.01, where the softmax input
reaches 100), logits rtol 1e-5 / atol 1e-5. The paths differ only in where 1 / tau is applied.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from protoquant.config import BackboneConfig, RunConfig
from protoquant.errors import ConfigError
from protoquant.explain import edit
from protoquant.head import ProtoQuantHead
from protoquant.head_fast import DerivedTensors, compile_logits, logits_and_scores
from protoquant.model import ProtoQuant
from protoquant.pruned_head import PrunedHead
from protoquant.train.head import limit_top_k

D, C = 16, 5


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _head(k: int = 24, temperature: float = 0.1, seed: int = 0) -> ProtoQuantHead:
    head = ProtoQuantHead(
        torch.randn(k, D, generator=_generator(seed)),
        C,
        temperature=temperature,
        generator=_generator(seed + 1),
    )
    with torch.no_grad():  # some negative raw weights: the ReLU must matter
        head.class_layer.weight.sub_(torch.rand(C, k, generator=_generator(seed + 2)))
    return head.requires_grad_(False).eval()


def _features(b: int = 3, h: int = 4, w: int = 5, seed: int = 9) -> torch.Tensor:
    return torch.randn(b, D, h, w, generator=_generator(seed))


def _assert_same(head: ProtoQuantHead, features: torch.Tensor) -> None:
    """forward_logits == the reference forward, to the module's stated tolerance."""
    reference, fast = head(features), head.forward_logits(features)
    score_atol = 1e-5 if head.temperature < 0.1 else 1e-6
    torch.testing.assert_close(fast.scores, reference.scores, rtol=1e-5, atol=score_atol)
    torch.testing.assert_close(fast.logits, reference.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("b, k, h, w", [(1, 1, 1, 1), (3, 24, 4, 5), (8, 300, 7, 7), (2, 64, 14, 3)])
@pytest.mark.parametrize("temperature", [0.01, 0.1, 1.0])
def test_fast_path_matches_reference(b, k, h, w, temperature) -> None:
    head = _head(k, temperature)
    features = _features(b, h, w)
    _assert_same(head, features)
    _assert_same(head, features.contiguous(memory_format=torch.channels_last))
    with head.inference():
        _assert_same(head, features)


def test_fast_path_matches_reference_with_masks_and_pruning() -> None:
    head = _head(40)
    features = _features(4, 6, 6)
    limited = edit.limit_top_k(head, 3)
    disabled = edit.disable(limited, 5)
    for variant in (limited, disabled):
        assert (variant.class_layer.mask == 0).any()
        _assert_same(variant, features)
    pruned, kept = edit.remove_unused(disabled, "exact")
    assert isinstance(pruned, PrunedHead) and pruned.num_removed > 0
    _assert_same(pruned, features)
    # the pruned head's logits are the unpruned head's: its removed prototypes stay in the normaliser
    torch.testing.assert_close(
        pruned.forward_logits(features).logits, disabled.forward_logits(features).logits
    )
    torch.testing.assert_close(
        pruned.forward_logits(features).scores, disabled.forward_logits(features).scores[:, kept]
    )
    with pruned.inference():
        _assert_same(pruned, features)
        _assert_same(pruned, features)  # second call: reused tensors
    dropped, _ = edit.remove_unused(disabled, "drop")
    _assert_same(dropped, features)


def test_pure_function_matches_for_pruned_heads() -> None:
    removed = torch.randn(6, D, generator=_generator(3))
    head = PrunedHead(torch.randn(10, D, generator=_generator(4)), removed, C, temperature=0.2)
    layer, features = head.class_layer, _features()
    logits, scores = logits_and_scores(features, head.codebook, layer.weight, layer.mask, 0.2, removed)
    torch.testing.assert_close(logits, head(features).logits, rtol=1e-5, atol=1e-5)
    assert scores.shape == (3, 10)


def _fresh(head: ProtoQuantHead, features: torch.Tensor) -> torch.Tensor:
    """Logits from the head's current tensors by the reference path (reuses nothing)."""
    return head(features).logits


def test_reuse_follows_every_tracked_change() -> None:
    head, features = _head(), _features()
    with head.inference():
        before = head.forward_logits(features).logits
        with torch.no_grad():
            head.codebook.mul_(-1.0)  # in place
        after = head.forward_logits(features).logits
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, _fresh(head, features))
        state = {**head.state_dict(), "class_layer.weight": torch.rand(C, 24, generator=_generator(5))}
        head.load_state_dict(state)
        torch.testing.assert_close(head.forward_logits(features).logits, _fresh(head, features))
        limit_top_k(head.class_layer, 2)  # the mask, in place
        torch.testing.assert_close(head.forward_logits(features).logits, _fresh(head, features))
        head.codebook = torch.randn(24, D, generator=_generator(6))  # a new buffer
        torch.testing.assert_close(head.forward_logits(features).logits, _fresh(head, features))
        head.class_layer.weight.data = torch.rand(C, 24, generator=_generator(7)) + 1.0
        torch.testing.assert_close(head.forward_logits(features).logits, _fresh(head, features))
        head.temperature = 0.5
        torch.testing.assert_close(head.forward_logits(features).logits, _fresh(head, features))
        head.double()  # cast: new storages of another dtype
        torch.testing.assert_close(
            head.forward_logits(features.double()).logits, _fresh(head, features.double())
        )
        head.float()
        with torch.inference_mode():  # in place inside inference mode still bumps the version
            head.class_layer.mask[0] = 0.0
            torch.testing.assert_close(head.forward_logits(features).logits, _fresh(head, features))


def test_data_assignment_twice_cannot_reuse_a_freed_address() -> None:
    head, features = _head(), _features()
    layer = head.class_layer
    with head.inference():
        for seed in range(6):  # each new tensor is allocated while the previous one is alive
            layer.weight.data = torch.rand(C, 24, generator=_generator(seed)) + seed
            torch.testing.assert_close(head.forward_logits(features).logits, _fresh(head, features))


def test_edits_give_heads_with_their_own_empty_state() -> None:
    head, features = _head(), _features()
    with head.inference():
        head.forward_logits(features)
        edited = edit.disable(head, 3)
        assert edited._fast.derived.depth == 0
        assert not torch.equal(edited.forward_logits(features).logits, head.forward_logits(features).logits)
        _assert_same(edited, features)
        _assert_same(head, features)  # the original, unchanged and still reusing
    restored = pickle.loads(pickle.dumps(head))
    assert restored._fast.derived.depth == 0 and copy.deepcopy(head)._fast.mode is None
    _assert_same(restored, features)


def _counting(builds: list) -> callable:
    def build() -> tuple[torch.Tensor]:
        builds.append(1)
        return (torch.zeros(1),)

    return build


def test_reuse_only_inside_the_scope_and_never_for_inference_tensors() -> None:
    derived, source, builds = DerivedTensors(), torch.zeros(3), []
    for _ in range(2):
        derived.get((source,), (), _counting(builds))
    assert len(builds) == 2  # outside the scope: recomputed every call
    derived.enter()
    for _ in range(3):
        derived.get((source,), (), _counting(builds))
    assert len(builds) == 3  # built once inside
    with torch.no_grad():
        source.add_(1.0)
    derived.get((source,), (), _counting(builds))
    assert len(builds) == 4
    derived.get((source,), ("other extra",), _counting(builds))
    assert len(builds) == 5
    with torch.inference_mode():
        frozen = torch.zeros(3)
    for _ in range(2):
        derived.get((frozen,), (), _counting(builds))
    assert len(builds) == 7  # inference tensors have no version counter: never reused
    derived.exit()
    derived.get((source,), ("other extra",), _counting(builds))
    assert len(builds) == 8  # the scope's tensors were dropped at exit


def test_head_built_in_inference_mode_still_answers_right() -> None:
    with torch.inference_mode():
        head, features = _head(), _features()
        with head.inference():
            _assert_same(head, features)
            head.class_layer.mask[:, 0] = 0.0
            _assert_same(head, features)


def test_gradients_flow_and_training_weights_are_never_reused() -> None:
    head, features = _head(), _features()
    head.class_layer.weight.requires_grad_(True)
    with head.inference():
        head.forward_logits(features).logits.sum().backward()
        fast_grad = head.class_layer.weight.grad.clone()
        head.class_layer.weight.grad = None
        head(features).logits.sum().backward()
        torch.testing.assert_close(fast_grad, head.class_layer.weight.grad, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            head.class_layer.weight.mul_(2.0)
        _assert_same(head, features)
    images = features.clone().requires_grad_(True)
    head.requires_grad_(False)
    with head.inference():
        with torch.inference_mode():
            head.forward_logits(features)  # reuse filled inside inference mode ...
        head.forward_logits(images).logits[:, 1].sum().backward()  # ... and used with autograd
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_compile_mode_is_checked_and_a_missing_compiler_degrades(caplog) -> None:
    head = _head()
    with pytest.raises(ConfigError, match="compile mode must be one of"):
        head.compile_logits("fastest")
    with pytest.raises(ConfigError, match="reduce-overhead"):
        compile_logits("turbo", torch.device("cpu"))
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("no-such-compiler-xyz",)}):
        with caplog.at_level("WARNING", logger="protoquant.head"):
            assert head.compile_logits("default", on_cpu=True) is False
        assert "needs a C++ compiler (no-such-compiler-xyz on PATH)" in caplog.text
        head._fast.set_mode("default")  # the compiler vanished after compile_logits: checked again lazily
        caplog.clear()
        with caplog.at_level("WARNING", logger="protoquant.head_fast"):
            _assert_same(head, _features())
        assert "needs a C++ compiler" in caplog.text
    assert head._fast.compiled(torch.device("cpu")) is None


def test_compiled_path_matches_reference() -> None:
    pytest.importorskip("torch._inductor")
    from protoquant.head_fast import compile_prerequisite_missing

    if compile_prerequisite_missing(torch.device("cpu")):
        pytest.skip("no C++ compiler for torch.compile on the CPU")
    head, features = _head(8), _features(2, 2, 2)
    assert head.compile_logits("default", on_cpu=True) is True
    _assert_same(head, features)
    with torch.no_grad():
        head.codebook.mul_(-1.0)  # the compiled function reads the live tensors
    _assert_same(head, features)
    assert head.compile_logits(None) is False
    assert head._fast.compiled(torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")  # gpu.sh runs it
def test_cuda_graph_path_matches_reference_across_replays() -> None:
    head = _head(40).cuda()
    batches = [_features(4, 7, 7, seed=s).cuda() for s in (1, 2)]
    assert head.compile_logits("reduce-overhead") is True
    with head.inference(), torch.inference_mode():
        outputs = [head.forward_logits(f) for _ in range(3) for f in batches]  # recorded, then replayed
        references = [head(f) for f in batches]
    for i, fast in enumerate(outputs):  # an earlier result is not overwritten by a later replay
        reference = references[i % len(batches)]
        torch.testing.assert_close(fast.scores, reference.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.logits, reference.logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        head.codebook.mul_(-1.0)  # the graphs read the live tensors
    with head.inference(), torch.inference_mode():
        _assert_same(head, batches[0])


@pytest.fixture(scope="module")
def tiny_model(backbone_factory) -> ProtoQuant:
    backbone = backbone_factory("timm/test_convnext")
    head = ProtoQuantHead(torch.randn(12, backbone.info.channels, generator=_generator(0)), 3)
    config = RunConfig(backbone=BackboneConfig("timm/test_convnext", "none", image_size=64))
    return ProtoQuant(backbone, head.requires_grad_(False), ("a", "b", "c"), config).eval()


def test_model_logits_path_matches_forward(tiny_model) -> None:
    images = torch.randn(2, 3, 64, 64, generator=_generator(1))
    reference = tiny_model(images)
    with tiny_model.inference():
        fast = tiny_model.forward_logits(images)
        assert torch.is_inference_mode_enabled()
    torch.testing.assert_close(fast.logits, reference.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.scores, reference.scores, rtol=1e-5, atol=1e-6)
    differentiable = tiny_model.differentiable()(images)
    torch.testing.assert_close(differentiable, reference.logits, rtol=2e-3, atol=2e-3)  # no fp16 rounding


def test_model_compile_head_stays_eager_on_the_cpu_unless_asked(tiny_model, caplog) -> None:
    with caplog.at_level("WARNING", logger="protoquant.head"):
        assert tiny_model.compile_head("reduce-overhead") is False
    assert "on_cpu=True" in caplog.text and tiny_model.head._fast.mode is None
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("no-such-compiler-xyz",)}):
        assert tiny_model.compile_head("default", on_cpu=True) is False
    assert "needs a C++ compiler" in caplog.text and tiny_model.head._fast.mode is None
    assert tiny_model.compile_head(None) is False
