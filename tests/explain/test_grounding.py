"""Nearest training patch of every prototype, against brute force over the cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from protoquant.codebook import to_patches
from protoquant.explain.grounding import nearest_patches

CPU = torch.device("cpu")


def test_nearest_patches_match_brute_force(tiny_run) -> None:
    subset = tiny_run.result.caches.train_plain
    codes = tiny_run.stage1_codes
    features = subset.store.get(subset.entries)  # (N, D, H, W)
    patches = to_patches(features)  # (N*H*W, D)
    cosine = F.cosine_similarity(codes[:, None], patches[None], dim=2)  # (K, N*H*W)
    expected, flat = cosine.max(dim=1)
    found = nearest_patches(codes, subset, 3, CPU)  # batches that do not divide N
    torch.testing.assert_close(found.cosine, expected, atol=1e-5, rtol=0)
    height, width = features.shape[2:]
    cells = height * width
    for k in range(len(codes)):
        entry, cell = int(found.entry[k]), int(found.cell[k])
        assert entry in subset.entries.tolist() and 0 <= cell < cells
        patch = subset.store.get([entry])[0, :, cell // width, cell % width]
        assert abs(float(F.cosine_similarity(codes[k], patch, dim=0)) - float(expected[k])) < 1e-5


def test_a_code_equal_to_a_patch_is_exactly_grounded(tiny_run) -> None:
    subset = tiny_run.result.caches.train_plain
    entry = int(subset.entries[2])
    patch = subset.store.get([entry])[0, :, 1, 0]  # (D,)
    found = nearest_patches(patch[None], subset, 4, CPU)
    assert float(found.cosine[0]) > 1 - 1e-5
    same = subset.store.get([int(found.entry[0])])[0].flatten(1)[:, int(found.cell[0])]  # (D,)
    assert float(F.cosine_similarity(same, patch, dim=0)) > 1 - 1e-5
