"""OpenCV-equivalent bicubic, argmax tie rules, quantile boxes and regions."""

import numpy as np
import pytest
import torch

from protoquant.metrics.maps import (
    argmax_column_major,
    argmax_row_major,
    cubic_taps,
    quantile_box,
    resize_bilinear,
    resize_cubic,
    top_region,
)


def test_cubic_taps_hand_computed():
    # 2 -> 4: positions (d + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25; border replicated
    index, weight = cubic_taps(2, 4)
    assert index[0].tolist() == [0, 0, 0, 1]  # floor(-0.25) = -1 -> taps -2..1 clipped
    assert index[1].tolist() == [0, 0, 1, 1]
    assert torch.allclose(weight.sum(dim=1), torch.ones(4), atol=1e-6)
    # fraction 0.25 with A = -0.75: w1 = ((A + 2) x - (A + 3)) x^2 + 1
    x, a = 0.25, -0.75
    assert weight[1, 1].item() == pytest.approx(((a + 2) * x - (a + 3)) * x * x + 1, abs=1e-7)


def test_constant_map_stays_constant_and_one_hot_matches_kernel():
    assert torch.allclose(
        resize_cubic(torch.full((3, 5), 2.5), (16, 20)), torch.full((16, 20), 2.5), atol=1e-6
    )
    m = torch.zeros(2, 2)
    m[0, 0] = 1
    out = resize_cubic(m, (8, 8))
    # separable: out[i, j] = r[i] * r[j] with r the column response of a unit step
    r = resize_cubic(torch.tensor([[1.0], [0.0]]), (8, 1))[:, 0]
    assert torch.allclose(out, r[:, None] * r[None, :], atol=1e-6)
    assert out[0, 0] > 1  # cubic overshoot (A = -0.75)


def test_bit_exact_against_opencv():
    cv2 = pytest.importorskip("cv2")
    use_ipp = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)  # OpenCV's own C++ path (IPP builds differ by ~1e-6)
    try:
        rng = np.random.default_rng(0)
        for height, width in [(7, 7), (2, 3), (14, 14), (5, 26)]:
            m = rng.random((height, width)).astype(np.float32)
            ref = cv2.resize(m, (224, 224), interpolation=cv2.INTER_CUBIC)
            assert np.array_equal(resize_cubic(torch.from_numpy(m), (224, 224)).numpy(), ref)
    finally:
        cv2.ipp.setUseIPP(use_ipp)


def test_argmax_tie_rules():
    maps = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])  # ties at (0, 1) and (1, 0)
    assert [int(v) for v in argmax_row_major(maps)] == [0, 1]  # first in row-major order
    assert [int(v) for v in argmax_column_major(maps)] == [1, 0]  # first column, then first row
    rows, cols = argmax_row_major(torch.zeros(1, 3, 3))
    assert (int(rows), int(cols)) == (0, 0)  # constant map


def test_quantile_box_and_strict_region():
    heat = np.zeros((10, 10))
    heat[2:4, 5:8] = 1.0
    assert quantile_box(heat, 0.95) == (2, 5, 3, 7)
    region = top_region(torch.tensor([[0.0, 1.0], [2.0, 3.0]]), 0.5)  # quantile 1.5, strict
    assert region.tolist() == [[False, False], [True, True]]
    assert not top_region(torch.ones(3, 3), 0.9).any()  # constant map: empty


def test_bilinear_shape():
    assert resize_bilinear(torch.rand(2, 3, 4), (8, 8)).shape == (2, 8, 8)
