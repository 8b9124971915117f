"""Removing unused prototypes: head size, head speed and logit change, exact vs drop.

Starts from a trained checkpoint (default: the demo model), limits every class to its top-k
prototypes (`protoquant.explain.edit.limit_top_k`, no re-fit: the point here is the removal),
then removes the prototypes no class weighs, once keeping their share of the softmax normaliser
("exact") and once dropping them ("drop"). On the cached test features of the run it reports,
for each head: K (explained) + R (normaliser-only), the head tensors' bytes, the median time of
one head forward pass over all test maps, the largest logit change against the top-k head and
the agreement of predictions with it.

    python benchmarks/edit_prune.py [--model runs/demo/model] [--top_k 5] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine

from protoquant.cache.build import build_cache
from protoquant.data import load_splits
from protoquant.explain import edit
from protoquant.model import ProtoQuant


def _test_features(model: ProtoQuant) -> torch.Tensor:
    """(N, D, H, W) cached test features (view 0), as float32."""
    config = model.config
    test = load_splits(config.data, config.seed).test
    store = build_cache(test, model.backbone, model.transform, views=1, config=config.cache, device="cpu")
    return store.get(store.entries()).float()


def _bytes(head: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in head.state_dict().values())


def _turns(heads: dict, features: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one forward pass of every head, timed in turns (after one warm-up each)."""
    times: dict[str, list[float]] = {name: [] for name in heads}
    for round_ in range(repeats + 1):
        for name, head in heads.items():
            start = time.perf_counter()
            head(features)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/demo/model")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    model = ProtoQuant.load(args.model)
    features = _test_features(model)
    limited = edit.limit_top_k(model.head, args.top_k)
    heads = {
        "trained": model.head,
        f"top-{args.top_k} (mask)": limited,
        "removed, exact": edit.remove_unused(limited, "exact")[0],
        "removed, drop": edit.remove_unused(limited, "drop")[0],
    }
    with torch.no_grad():
        reference = limited(features).logits
        seconds = _turns(heads, features, args.repeats)
        print(f"{machine()}; {len(features)} test maps {tuple(features.shape[1:])}")
        print("| head | K + R | head tensors | forward, all test maps | max logit change | agreement |")
        print("|---|---|---|---|---|---|")
        for name, head in heads.items():
            logits = head(features).logits
            change = float((logits - reference).abs().max())
            agree = float((logits.argmax(1) == reference.argmax(1)).float().mean())
            removed = getattr(head, "num_removed", 0)
            print(
                f"| {name} | {head.num_prototypes} + {removed} | {_bytes(head) / 1e6:.2f} MB "
                f"| {1e3 * seconds[name]:.1f} ms | {change:.2e} | {100 * agree:.1f} % |"
            )


if __name__ == "__main__":
    main()
