"""FunnyBirds protocols: dilation, strict thresholds, CSDC with every class's minimal sets, D, BI, SD, TS."""

import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from protoquant.data.funnybirds import FunnyBirds
from protoquant.data.synthetic import minimal_sufficient_sets
from protoquant.metrics.funnybirds import (
    Tally,
    background_relevant,
    best_threshold,
    combine,
    csdc,
    dilate,
    distractibility_terms,
    important,
    irrelevant,
    region_importance,
    single_deletion,
    slots_of_parts,
    ts_assumption,
    ts_checks,
    ts_classes,
)
from protoquant.metrics.maps import UPSAMPLING, resize_bilinear, resize_cubic, upsample
from protoquant.metrics.run_funnybirds import (
    _Image,
    _plan,
    _score,
    minimal_sets,
    part_slots,
)
from protoquant.metrics.settings import FB_THRESHOLD_COUNT, MetricSettings, fb_thresholds
from tests.data.layouts import FB_BEAK, FB_SIZE, write_funnybirds


def test_dilation_is_a_5x5_max_pool():
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    mask[0, 4, 4] = True
    assert int(dilate(mask).sum()) == 25 and dilate(mask)[0, 2, 2] == 1 and dilate(mask)[0, 1, 4] == 0


def test_instances_of_one_part_are_dilated_separately_and_summed():
    attribution = torch.ones(10, 10)
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, 0, 0] = True  # eye01 in the corner: 3 x 3 after dilation
    masks[1, 0, 1] = True  # eye02 next to it: 3 x 4, overlapping eye01's dilation
    masks[2, 5, 5] = True  # beak: 5 x 5
    importance = region_importance(attribution, masks, np.array([0, 0, 1]), 2)
    assert importance.tolist() == [9 + 12, 25]


def test_important_is_strict_at_the_boundary():
    flags = important(np.array([10.0, 5.0, 4.9]), 100.0, np.array([0.05, 0.1]))
    assert flags.tolist() == [[True, False, False], [False, False, False]]


def test_csdc_max_over_minimal_sets_and_the_last_class_has_its_sets():
    flags = np.array([[True, False, True, False]])
    assert csdc(flags, [(0, 1), (2,)]).tolist() == [1.0]
    assert csdc(flags, [(0, 1)]).tolist() == [0.5]
    assert csdc(flags, []).tolist() == [0.0]
    class_parts = np.array([[0, 0, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1]])

    class Interventions:  # a dataset exposing only its class table
        pass

    base = Interventions()
    base.class_parts = class_parts
    last = len(class_parts) - 1
    sets = minimal_sets(base, last)
    assert sets == minimal_sufficient_sets(class_parts, last) == [(1,)]  # the reference finds none here
    assert csdc(np.array([[False, True, False]]), sets).tolist() == [1.0]


def test_irrelevant_and_background_relevance_boundaries():
    removed = np.array([9.5, 9.6, 10.5, 5.0])  # original 10: drops 0.5 (= 5 %), 0.4, increase, 5
    assert irrelevant(10.0, removed).tolist() == [False, True, True, False]
    assert background_relevant(10.0, removed).tolist() == [True, False, False, True]


def test_distractibility_skips_images_without_irrelevant_regions():
    regions = np.array([[True, True, False], [False, True, False]])
    assert distractibility_terms(regions, np.array([False, False, False])) is None
    assert distractibility_terms(regions, np.array([True, False, True])).tolist() == [0.5, 0.0]


def test_single_deletion_spearman():
    assert single_deletion(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(1.0)
    assert single_deletion(np.array([3.0, 2.0, 1.0]), np.array([10.0, 20.0, 30.0])) == pytest.approx(0.0)
    assert math.isnan(single_deletion(np.array([1.0, 1.0]), np.array([1.0, 2.0])))


def test_target_sensitivity_pair_assumption_and_checks():
    class_parts = np.array([[0, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 0], [1, 0, 1, 1]])
    pair = ts_classes(class_parts, 0)
    assert pair is not None
    first, second, overlap1, overlap2 = pair
    assert (first, second) == (1, 2) and overlap1.tolist() == [0] and overlap2.tolist() == [3]
    original = np.array([5.0, 4.0, 4.0, 0.0])
    assert ts_assumption(original, np.array([5, 1, 3.5, 0]), np.array([5, 3.5, 1, 0]), 1, 2)
    assert not ts_assumption(original, np.array([5, 3.5, 3.5, 0]), np.array([5, 1, 1, 0]), 1, 2)
    assert ts_checks(np.array([3.0, 0, 0, 1]), np.array([1.0, 0, 0, 2]), overlap1, overlap2) == (1.0, 1.0)
    assert ts_classes(np.array([[0, 0], [1, 1]]), 0) is None


def test_threshold_choice_and_aggregates():
    per = {
        "csdc": np.array([0.3, 0.6, 0.6]),
        "pc": np.array([0.9, 0.6, 0.6]),
        "dc": np.array([0.0, 0.3, 0.3]),
        "d": np.array([0.5, 0.5, 0.5]),
    }
    assert best_threshold(*per.values()) == 1  # objective 0.9, 1.0, 1.0: first maximum
    scores = combine(per, {"accuracy": 1.0, "bi": 0.9, "sd": 0.6, "ts": 0.8}, np.array([0.01, 0.02, 0.03]))
    assert scores.threshold == 0.02 and scores.completeness == pytest.approx((0.5 + 0.5) / 2)
    assert scores.headline == pytest.approx((0.5 + 0.6 + 0.8) / 3)


# ---- the runner on the official layout: parts matched by name, "nothing removed" re-render ----------


@pytest.fixture(scope="module")
def fb_dataset(tmp_path_factory):
    """The miniature official layout (masks eye01, eye02, beak, ... vs slots beak, eye, foot, tail, wing)."""
    return FunnyBirds(write_funnybirds(tmp_path_factory.mktemp("fb_runner")), "test")


def slot_image(dataset, index: int, logits, importance: np.ndarray, total: float) -> _Image:
    """An `_Image` of `dataset` whose class-importance cache is filled (no model needed)."""
    annotation = dataset.annotations(index)
    slots, group_of = part_slots(dataset, annotation.part_names)
    image = _Image(
        index=index,
        label=int(dataset.labels[index]),
        logits=np.asarray(logits, float),
        similarity=torch.zeros(1, 1, 1),
        activation=torch.zeros(1, 1, 1),
        scores=torch.zeros(1),
        masks=torch.from_numpy(annotation.masks),
        group_of=group_of,
        num_groups=len(slots),
        background=torch.from_numpy(dataset.background_masks(index)),
        full_render=dataset.has_full_render(index),
    )
    background = np.zeros(len(image.background))
    image.cache = {c: (importance, background, total) for c in range(len(logits))}
    return image


def test_masks_out_of_slot_order_are_matched_to_slots_by_name(fb_dataset):
    annotation = fb_dataset.annotations(0)
    slots, group_of = part_slots(fb_dataset, annotation.part_names)
    assert slots == ("beak", "eye", "foot", "tail", "wing")
    assert group_of.tolist() == [1, 1, 0, 2, 2, 4, 4, 3]  # eye01 eye02 beak foot01 foot02 wing01 wing02 tail
    attribution = torch.zeros(FB_SIZE, FB_SIZE)
    attribution[FB_BEAK] = 1.0  # 4 x 10 = 40 px, all on the beak
    importance = region_importance(attribution, torch.from_numpy(annotation.masks), group_of, len(slots))
    assert importance.tolist() == [40.0, 0, 0, 0, 0]  # slot 0 = beak (first-appearance order gave "eye")
    image = slot_image(fb_dataset, 0, [0.0, 5.0, 1.0], importance, 40.0)
    plan = _plan(SimpleNamespace(settings=MetricSettings()), image, fb_dataset, fb_thresholds())
    assert set(plan["dc"]) == {(0,)} and set(plan["pc"]) == {(1, 2, 3, 4)}  # remove the beak / the rest
    no_beak = np.asarray(
        Image.open(fb_dataset.root / "test_interventions/1/000000/body_eye_foot_tail_wing.png")
    )
    np.testing.assert_array_equal(np.asarray(fb_dataset.render(0, remove_parts=[0])), no_beak[..., :3])
    with pytest.raises(ValueError, match=r"annotated part\(s\) \['crest'\] match no part slot"):
        slots_of_parts(("crest", "beak"), slots)


def _pc_after_full_render(dataset, full_logits) -> tuple[dict, Tally]:
    """Every part important (PC removes nothing); all re-renders keep the clean logits but the full one."""
    clean = [0.0, 5.0, 1.0]  # test image 0 is class 1, predicted 1
    image = slot_image(dataset, 0, clean, np.full(5, 10.0), 10.0)
    plan = _plan(SimpleNamespace(settings=MetricSettings()), image, dataset, fb_thresholds())
    logits = {(0, *key): np.asarray(clean) for key in plan["keys"]}
    if ((), ()) in plan["keys"]:
        logits[(0, (), ())] = np.asarray(full_logits)
    tally = Tally()
    _score(SimpleNamespace(settings=MetricSettings()), image, plan, logits, tally, dataset, fb_thresholds())
    return plan, tally


def test_nothing_removed_uses_the_full_re_render_where_it_exists(fb_dataset, tmp_path):
    plan, tally = _pc_after_full_render(fb_dataset, [0.0, 1.0, 5.0])
    assert ((), ()) not in plan["keys"] and tally.full_renders == 0  # no re-render: the original image
    assert tally.pc == [[1.0] * FB_THRESHOLD_COUNT]
    root = Path(shutil.copytree(fb_dataset.root, tmp_path / "FunnyBirds"))
    full = root / "test_interventions/1/000000/body_beak_eye_foot_tail_wing.png"
    Image.fromarray(np.full((FB_SIZE, FB_SIZE, 4), 200, np.uint8), "RGBA").save(full)
    with_render = FunnyBirds(root, "test")
    assert with_render.has_full_render(0) and not with_render.has_full_render(1)
    np.testing.assert_array_equal(
        np.asarray(with_render.intervention(0, [])), np.full((FB_SIZE, FB_SIZE, 3), 200)
    )
    plan, tally = _pc_after_full_render(with_render, [0.0, 1.0, 5.0])  # the re-render is predicted as class 2
    assert ((), ()) in plan["keys"] and tally.full_renders == 1
    assert tally.pc == [[0.0] * FB_THRESHOLD_COUNT]  # prediction changed: PC 0 at every threshold


def test_upsampling_is_a_setting_and_unknown_modes_are_named():
    maps = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(
        upsample(maps, (32, 32), "bicubic").numpy(), resize_cubic(maps, (32, 32)).numpy()
    )
    np.testing.assert_array_equal(
        upsample(maps, (32, 32), "bilinear").numpy(), resize_bilinear(maps, (32, 32)).numpy()
    )
    assert MetricSettings().funnybirds_upsampling == "bicubic" and set(UPSAMPLING) == {"bicubic", "bilinear"}
    with pytest.raises(
        ValueError, match=r"upsampling must be one of \['bicubic', 'bilinear'\], got 'nearest'"
    ):
        upsample(maps, (32, 32), "nearest")


SHARED_FUNNYBIRDS = Path(__file__).resolve().parents[2].parent / "shared" / "funnybirds" / "FunnyBirds"


@pytest.mark.skipif(
    not (SHARED_FUNNYBIRDS / "classes.json").is_file(),
    reason=f"the FunnyBirds subset is not at {SHARED_FUNNYBIRDS} (../shared/funnybirds from the repository)",
)
def test_real_re_renders_change_the_pixels_of_the_slot_matched_by_name():
    dataset = FunnyBirds(SHARED_FUNNYBIRDS, "test")
    annotation = dataset.annotations(0)
    slots, group_of = part_slots(dataset, annotation.part_names)
    slot_masks = np.stack(
        [annotation.masks[group_of == g].any(axis=0) for g in range(len(slots))]
    )  # (G, H, W)
    full = np.asarray(dataset.intervention(0, []), dtype=np.int16)
    for g, slot in enumerate(slots):
        if not slot_masks[g].any():
            continue
        changed = (full != np.asarray(dataset.intervention(0, [slot]), dtype=np.int16)).any(axis=2)
        overlap = (slot_masks & changed[None]).sum(axis=(1, 2))  # (G,)
        assert int(np.argmax(overlap)) == g, (slot, overlap.tolist())
