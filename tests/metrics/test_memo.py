"""The memo of changed-image features stays within its byte bound and forgets the least recently used."""

import numpy as np
import pytest
import torch

from protoquant.metrics import FeatureMemo, MetricSettings
from protoquant.metrics.context import EvalContext

ITEM = torch.ones(4, 2, 2)  # (D, H, W): 16 float16 values, 32 bytes


def test_least_recently_used_features_are_evicted_first():
    memo = FeatureMemo(max_bytes=64)  # two items
    memo.put(("a",), ITEM)
    memo.put(("b",), 2 * ITEM)
    assert memo.get(("a",)) is not None  # "a" is now the most recent
    memo.put(("c",), 3 * ITEM)
    assert memo.get(("b",)) is None and memo.get(("a",)) is not None and memo.get(("c",)) is not None
    assert len(memo) == 2 and memo.nbytes == 64 and memo.evictions == 1
    memo.put(("c",), 4 * ITEM)  # replacing a key does not count twice
    assert memo.nbytes == 64 and float(memo.get(("c",))[0, 0, 0]) == 4.0


def test_a_zero_memo_keeps_nothing_and_oversized_features_are_not_kept():
    nothing = FeatureMemo(0)
    nothing.put(("a",), ITEM)
    assert len(nothing) == 0 and nothing.nbytes == 0
    small = FeatureMemo(16)
    small.put(("a",), ITEM)
    assert len(small) == 0
    with pytest.raises(ValueError, match="max_bytes"):
        FeatureMemo(-1)


def test_memo_features_batches_the_backbone_and_reuses_only_what_the_memo_holds(tiny_metrics_run):
    result = tiny_metrics_run
    test = result.splits.test
    settings = MetricSettings(batch_size=2)
    images = {i: result.model.preprocess(test.load_image(i))[0] for i in range(5)}
    calls: list[int] = []

    def make(keys):
        calls.append(len(keys))
        return torch.stack([images[k[-1]] for k in keys])

    def context(memo):
        return EvalContext(
            result.model, test, settings, torch.device("cpu"), result.caches.test.store, memo=memo
        )

    keys = [("x", i) for i in range(5)]
    kept, none = context(FeatureMemo()), context(FeatureMemo(0))
    features = kept.memo_features(keys, make)
    assert calls == [2, 2, 1] and features.shape[0] == 5  # at most batch_size per backbone pass
    assert torch.equal(none.memo_features(keys, make), features) and len(none.memo) == 0
    calls.clear()
    assert torch.equal(kept.memo_features(keys[::-1], make), features.flip(0)) and calls == []
    assert kept.missing_features(keys + [("x", 9)]) == 1
    reference = result.model.features(torch.stack([images[i] for i in range(5)]))
    assert np.allclose(features.numpy(), reference.numpy(), atol=1e-3)
