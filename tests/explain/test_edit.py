"""Head edits: top-k, disable, merge, removal of unused prototypes, the history, the edit session."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from protoquant.explain import edit
from protoquant.explain.edit_session import EditPlan, edit_checkpoint
from protoquant.explain.gallery import build_gallery, has_gallery, load_gallery, save_gallery
from protoquant.head import ProtoQuantHead
from protoquant.history import EditRecord, ModelState, read_history
from protoquant.model import ProtoQuant
from protoquant.pruned_head import PrunedHead


@pytest.fixture(scope="module")
def head(tiny_run) -> ProtoQuantHead:
    return tiny_run.result.model.head


@pytest.fixture(scope="module")
def features(tiny_run) -> torch.Tensor:
    """(N, D, H, W) cached features of every test image."""
    test = tiny_run.result.caches.test
    return test.store.get(test.entries).float()


def _files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_pruned_head_without_removed_prototypes_is_the_plain_head(head, features) -> None:
    pruned = PrunedHead(
        head.codebook, head.codebook[:0], head.class_weights.shape[0], temperature=head.temperature
    )
    pruned.class_layer.load_state_dict(head.class_layer.state_dict())
    plain, same = head(features), pruned(features)
    for name in ("logits", "scores", "similarity", "activation"):
        torch.testing.assert_close(getattr(same, name), getattr(plain, name))


def test_removing_unused_prototypes_leaves_every_logit_unchanged(head, features) -> None:
    limited = edit.limit_top_k(head, 2)  # 3 classes x 2: at most 6 of 16 prototypes stay weighted
    pruned, kept = edit.remove_unused(limited, "exact")
    assert isinstance(pruned, PrunedHead) and pruned.num_prototypes == len(kept) < head.num_prototypes
    assert pruned.num_removed == head.num_prototypes - len(kept)
    before, after = limited(features), pruned(features)
    torch.testing.assert_close(after.logits, before.logits)
    torch.testing.assert_close(after.scores, before.scores[:, kept])
    torch.testing.assert_close(pruned.class_weights, limited.class_weights[:, kept])


def test_pruned_head_follows_in_place_changes_of_its_removed_prototypes(head, features) -> None:
    pruned, _ = edit.remove_unused(edit.limit_top_k(head, 2), "exact")
    with torch.no_grad():
        before = pruned(features).logits.clone()
        pruned.removed_codebook.data.copy_(pruned.removed_codebook.flip(0) * 3.0 + 1.0)
        after = pruned(features).logits
    assert not torch.allclose(before, after)


def test_dropping_unused_prototypes_from_the_softmax_changes_the_logits(head, features) -> None:
    """Why "exact" exists: the removed prototypes' share of the normaliser matters."""
    limited = edit.limit_top_k(head, 2)
    dropped, kept = edit.remove_unused(limited, "drop")
    assert type(dropped) is ProtoQuantHead and dropped.num_prototypes == len(kept)
    before, after = limited(features).logits, dropped(features).logits
    assert not torch.allclose(after, before)
    assert (after >= before - 1e-6).all()  # a smaller normaliser only raises the presence scores


def test_exact_removal_twice_keeps_both_sets_in_the_normaliser(head, features) -> None:
    once, _ = edit.remove_unused(edit.limit_top_k(head, 3), "exact")
    twice, kept = edit.remove_unused(edit.limit_top_k(once, 1), "exact")
    assert twice.num_prototypes + twice.num_removed == head.num_prototypes
    reference = edit.limit_top_k(edit.limit_top_k(head, 3), 1)
    torch.testing.assert_close(twice(features).logits, reference(features).logits)


def test_top_k_leaves_at_most_k_positive_weights_per_class(head) -> None:
    mask = head.class_layer.mask.clone()
    for k in (1, 3):
        limited = edit.limit_top_k(head, k)
        assert int((limited.class_weights > 0).sum(dim=1).max()) <= k
        top = head.class_weights.topk(k, dim=1).values
        torch.testing.assert_close(limited.class_weights.topk(k, dim=1).values, top)
    assert torch.equal(head.class_layer.mask, mask)  # the input is untouched


def test_disabled_prototype_contributes_nothing(head, features) -> None:
    scores = head.scores(features)
    k = int(head.class_weights.sum(dim=0).argmax())  # the most weighted prototype
    off = edit.disable(head, k)
    contributions = off.contributions(off.scores(features))  # (B, C, K)
    assert torch.equal(contributions[:, :, k], torch.zeros_like(contributions[:, :, k]))
    torch.testing.assert_close(off.scores(features), scores)  # it still takes its softmax share
    expected = head(features).logits - head.contributions(scores)[:, :, k]
    torch.testing.assert_close(off(features).logits, expected)


def test_prototype_disabled_for_one_class_still_counts_for_the_others(head, features) -> None:
    k, c = int(head.class_weights[1].argmax()), 1
    off = edit.disable(head, k, c)
    before, after = head.contributions(head.scores(features)), off.contributions(off.scores(features))
    assert torch.equal(after[:, c, k], torch.zeros_like(after[:, c, k]))
    others = [i for i in range(head.class_weights.shape[0]) if i != c]
    torch.testing.assert_close(after[:, others], before[:, others])
    limited = edit.limit_top_k(off, head.num_prototypes)  # the top-k never re-enables it
    assert float(limited.class_weights[c, k]) == 0.0


def _with_duplicate(head: ProtoQuantHead, source: int) -> ProtoQuantHead:
    """`head` plus a near copy of prototype `source` that takes half of its weights."""
    generator = torch.Generator().manual_seed(0)
    copy = head.codebook[source] + 1e-3 * head.codebook[source].norm() * torch.randn(
        head.codebook.shape[1], generator=generator
    )
    codebook = torch.cat([head.codebook, copy[None]])
    out = ProtoQuantHead(codebook, head.class_weights.shape[0], temperature=head.temperature)
    weights = torch.cat([head.class_weights, head.class_weights[:, source : source + 1] / 2], dim=1)
    weights[:, source] /= 2
    with torch.no_grad():
        out.class_layer.weight.copy_(weights)
        out.usage.copy_(torch.cat([head.usage, head.usage[source : source + 1] / 2]))
    return out.requires_grad_(False)


def test_merge_moves_the_weights_and_changes_logits_by_the_score_gap(head, features) -> None:
    source = int(head.class_weights.sum(dim=0).argmax())
    doubled = _with_duplicate(head, source)
    merged, groups = edit.merge_duplicates(doubled, 0.99)
    duplicate = head.num_prototypes
    assert [source, duplicate] in groups
    torch.testing.assert_close(
        merged.class_weights[:, source], doubled.class_weights[:, [source, duplicate]].sum(dim=1)
    )
    scores = doubled.scores(features)
    gap = scores[:, source] - scores[:, duplicate]  # (B,)
    change = merged(features).logits - doubled(features).logits  # (B, C)
    torch.testing.assert_close(change, gap[:, None] * doubled.class_weights[None, :, duplicate])
    assert torch.equal(merged(features).logits.argmax(1), doubled(features).logits.argmax(1))
    pruned, kept = edit.remove_unused(merged, "exact")
    assert duplicate not in kept
    torch.testing.assert_close(pruned(features).logits, merged(features).logits)


def test_history_round_trips_through_save_and_load(tiny_run, tmp_path) -> None:
    model = tiny_run.result.model
    state = ModelState(0.5, 10, 4.0, 16)
    record = EditRecord("top_k", {"k": 4}, "2026-01-01T00:00:00+00:00", state, state, {"kept": [1, 2]})
    pruned, _ = edit.remove_unused(edit.limit_top_k(model.head, 2), "exact")
    edited = ProtoQuant(model.backbone, pruned, model.classes, model.config, edits=(record,))
    loaded = ProtoQuant.load(edited.save(tmp_path / "edited"))
    assert loaded.edits == (record,)
    assert isinstance(loaded.head, PrunedHead) and loaded.head.num_removed == pruned.num_removed
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.predict(images).logits, edited.predict(images).logits)
    assert ProtoQuant.load(Path(tiny_run.config.out) / "model").edits == ()  # a checkpoint without edits
    with pytest.raises(ValueError, match=r"edits\[0\].*after"):
        read_history([{**record.to_dict(), "after": {}}], "config.json")


def test_checkpoint_written_before_edits_existed_loads_without_history(tiny_run, tmp_path) -> None:
    old = tmp_path / "old"
    shutil.copytree(Path(tiny_run.config.out) / "model", old)
    meta = json.loads((old / "config.json").read_text())
    del meta["edits"]
    (old / "config.json").write_text(json.dumps(meta))
    model = ProtoQuant.load(old)
    assert model.edits == () and type(model.head) is ProtoQuantHead and meta["format"] == 1


@pytest.fixture(scope="module")
def with_gallery(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint with a prototype gallery."""
    folder = tmp_path_factory.mktemp("edit") / "model"
    shutil.copytree(Path(tiny_run.config.out) / "model", folder)
    save_gallery(build_gallery(tiny_run.result.model, tiny_run.result.caches.train_plain, top_k=2), folder)
    return folder


def test_edit_session_records_measures_and_leaves_the_input_untouched(with_gallery, tmp_path) -> None:
    before = _files(with_gallery)
    plan = EditPlan(disable=((0, None),), top_k=2, remove_unused=True)
    result = edit_checkpoint(with_gallery, tmp_path / "edited", plan)
    assert _files(with_gallery) == before
    assert [r.operation for r in result.records] == ["disable", "top_k", "remove_unused"]
    removal = result.records[-1]
    assert (
        removal.details["val_max_logit_change"] < 1e-4 and removal.details["val_prediction_agreement"] == 1.0
    )
    assert removal.after.num_prototypes == len(removal.details["kept"]) and 0 not in removal.details["kept"]
    assert all(r.after == n.before for r, n in zip(result.records, result.records[1:]))
    loaded = ProtoQuant.load(tmp_path / "edited")
    assert loaded.edits == result.records and result.gallery == "rebuilt"
    assert load_gallery(tmp_path / "edited", model=loaded).num_prototypes == loaded.head.num_prototypes


def test_weight_only_edits_carry_the_gallery_and_refit_keeps_the_mask(with_gallery, tmp_path) -> None:
    result = edit_checkpoint(with_gallery, tmp_path / "edited", EditPlan(top_k=2, refit=True, refit_epochs=3))
    assert result.gallery == "carried over" and has_gallery(tmp_path / "edited")
    loaded = ProtoQuant.load(tmp_path / "edited")
    load_gallery(tmp_path / "edited", model=loaded)  # raises unless it belongs to the edited model
    assert int((loaded.head.class_weights > 0).sum(dim=1).max()) <= 2
    assert result.records[-1].operation == "refit" and result.records[-1].parameters["epochs"] == 3


def test_edit_refuses_to_overwrite_without_being_asked(with_gallery, tmp_path) -> None:
    with pytest.raises(ValueError, match="overwrite"):
        edit_checkpoint(with_gallery, with_gallery, EditPlan(top_k=2))
    with pytest.raises(ValueError, match="no edit"):
        edit_checkpoint(with_gallery, tmp_path / "x", EditPlan())
