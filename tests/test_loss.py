import math

import pytest
import torch
import torch.nn.functional as F
from helpers import queue_of
from reference import classic_swav_loss

from ignite_swav import SwAVLoss


def make_crops(num_crops: int, batch: int, dim: int, prototypes: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeddings = [F.normalize(torch.randn(batch, dim, generator=g), dim=1) for _ in range(num_crops)]
    scores = [z @ prototypes.t() for z in embeddings]
    return scores, embeddings


def unit_prototypes(k: int = 10, dim: int = 8, seed: int = 1) -> torch.Tensor:
    return F.normalize(torch.randn(k, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_uniform_scores_give_log_k():
    loss_fn = SwAVLoss()
    k = 30
    scores = [torch.zeros(8, k) for _ in range(4)]
    embeddings = [F.normalize(torch.ones(8, 5), dim=1) for _ in range(4)]
    loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=torch.ones(k, 5))
    assert math.isclose(float(loss), math.log(k), rel_tol=1e-6)


@pytest.mark.parametrize("crops_for_assign,num_crops", [((0, 1), 2), ((0, 1), 6), ((0,), 3), ((1, 3), 4)])
def test_matches_the_papers_double_loop(crops_for_assign, num_crops):
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(num_crops, 16, 8, prototypes)
    scores = [s.requires_grad_() for s in scores]
    loss = SwAVLoss(crops_for_assign)(scores=scores, embeddings=embeddings, prototypes=prototypes)
    grads = torch.autograd.grad(loss, scores, allow_unused=True)

    ref_scores = [s.detach().double().requires_grad_() for s in scores]
    expected = classic_swav_loss(ref_scores, crops_for_assign)
    # a crop that is assigned and predicted by no other crop gets no gradient in the paper's loop
    ref_grads = torch.autograd.grad(expected, ref_scores, allow_unused=True)
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    for g, r, s in zip(grads, ref_grads, scores):
        r = torch.zeros_like(s, dtype=torch.float64) if r is None else r
        g = torch.zeros_like(s) if g is None else g
        assert torch.allclose(g.double(), r, atol=1e-6)


def test_queue_is_filled_newest_first_and_used_only_once_full():
    prototypes = unit_prototypes()
    loss_fn = SwAVLoss(crops_for_assign=(0, 1))
    loss_fn.queue = queue_of(torch.zeros(2, 8, 8))  # room for two batches of 4
    pushed = []
    for step in range(3):
        scores, embeddings = make_crops(3, 4, 8, prototypes, seed=step)
        queue_before = loss_fn.queue.rows.clone()
        loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
        if step < 2:
            # not full before this step: plain SwAV, the queue is not used
            assert not loss_fn.queue_in_use
            expected = classic_swav_loss(scores, (0, 1))
        else:
            assert loss_fn.queue_in_use
            # the queue as it was before this step (read before write), scored under the current prototypes
            expected = classic_swav_loss(scores, (0, 1), queue_scores=[q @ prototypes.t() for q in queue_before])
        assert math.isclose(float(loss), float(expected), rel_tol=1e-5)
        pushed.append(embeddings)
        # newest rows first: this batch's embeddings of the assigned crops sit on top
        for slot, crop in enumerate((0, 1)):
            assert torch.equal(loss_fn.queue.rows[slot, :4], embeddings[crop])
            assert torch.equal(loss_fn.queue.rows[slot, 4:], pushed[-2][crop] if step else torch.zeros(4, 8))


def test_queue_changes_the_codes_once_used():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(2, 4, 8, prototypes)
    loss_fn = SwAVLoss()
    loss_fn.queue = queue_of(F.normalize(torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(5)), dim=2))
    with_queue = loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
    without = SwAVLoss()(scores=scores, embeddings=embeddings, prototypes=prototypes)
    assert loss_fn.queue_in_use
    assert not math.isclose(float(with_queue), float(without), rel_tol=1e-4)


def test_queue_shorter_than_the_batch_keeps_the_first_rows():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(2, 6, 8, prototypes)
    loss_fn = SwAVLoss()
    loss_fn.queue = queue_of(torch.zeros(2, 4, 8))
    loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
    assert torch.equal(loss_fn.queue.rows[0], embeddings[0][:4])


def test_bfloat16_scores_under_autocast_give_a_float32_loss():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(4, 8, 8, prototypes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SwAVLoss()(scores=[s.bfloat16() for s in scores], embeddings=embeddings, prototypes=prototypes)
    assert loss.dtype == torch.float32
    expected = classic_swav_loss([s.bfloat16().double() for s in scores], (0, 1))
    assert math.isclose(float(loss), float(expected), rel_tol=1e-4)


def test_non_finite_scores_name_the_crop_and_leave_the_queue_unchanged():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(3, 4, 8, prototypes)
    scores[2] = scores[2].clone()
    scores[2][1, 3] = float("nan")
    loss_fn = SwAVLoss()
    loss_fn.queue = queue_of(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in scores\[2\]"):
        loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
    assert torch.equal(loss_fn.queue.rows, torch.zeros(2, 8, 8))
    scores[2][1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"scores\[2\]"):
        loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)


def test_non_finite_embeddings_are_never_pushed():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(2, 4, 8, prototypes)
    embeddings[1] = embeddings[1].clone()
    embeddings[1][0, 0] = float("inf")
    loss_fn = SwAVLoss()
    loss_fn.queue = queue_of(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"embeddings\[1\]"):
        loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
    assert torch.equal(loss_fn.queue.rows, torch.zeros(2, 8, 8))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"crops_for_assign": ()}, ValueError, "crops_for_assign must name at least one crop"),
        ({"crops_for_assign": (0, 0)}, ValueError, r"must not repeat a crop, got \(0, 0\)"),
        ({"crops_for_assign": (0, -1)}, ValueError, r"crops_for_assign\[1\] must be an integer >= 0, got -1"),
        ({"crops_for_assign": 0}, TypeError, "crops_for_assign must be a sequence"),
        ({"temperature": 0}, ValueError, "temperature must be a positive finite number, got 0"),
        ({"epsilon": float("nan")}, ValueError, "epsilon must be a positive finite number"),
        ({"sinkhorn_iterations": 0}, ValueError, "sinkhorn_iterations must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        SwAVLoss(**kwargs)


def _inputs():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(3, 4, 8, prototypes)
    return scores, embeddings, prototypes


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda s, z, p: (s[:2], z, p), "one entry per crop each, got 2 scores and 3 embeddings"),
        (lambda s, z, p: (s[:1], z[:1], p), "at least 2 crops"),
        (lambda s, z, p: ([s[0], s[1][:3], s[2]], z, p), r"scores\[1\] has shape \(3, 10\).*same batch size"),
        (lambda s, z, p: (s, [z[0], z[1], z[2][:2]], p), r"embeddings\[2\] has shape \(2, 8\), expected \(4, 8\)"),
        (lambda s, z, p: (s, z, p[:, :5]), "prototypes have width 5.*embeddings have width 8"),
        (lambda s, z, p: (s, z, p[:7]), r"prototypes have 7 rows \(shape \(7, 8\)\), but the scores have 10 columns"),
        (lambda s, z, p: (s[0], z, p), "scores must be a list with one tensor per crop"),
        (lambda s, z, p: ([t[0] for t in s], z, p), r"scores\[0\] must be a 2-D tensor"),
        (lambda s, z, p: ([t[:0] for t in s], [t[:0] for t in z], p), "empty batch"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_message(mutate, message):
    scores, embeddings, prototypes = mutate(*_inputs())
    with pytest.raises((ValueError, TypeError), match=message):
        SwAVLoss()(scores=scores, embeddings=embeddings, prototypes=prototypes)


def test_an_assigned_crop_the_loss_is_not_given_is_named():
    scores, embeddings, prototypes = _inputs()
    with pytest.raises(ValueError, match=r"crops_for_assign=\(0, 5\) names crop\(s\) \[5\].*given 3 crops"):
        SwAVLoss(crops_for_assign=(0, 5))(scores=scores, embeddings=embeddings, prototypes=prototypes)


def test_a_queue_of_the_wrong_shape_is_refused():
    scores, embeddings, prototypes = _inputs()
    loss_fn = SwAVLoss()
    loss_fn.queue = queue_of(torch.zeros(2, 8, 16))
    with pytest.raises(ValueError, match=r"queue has shape \(2, 8, 16\), expected \(2, length, 8\)"):
        loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)


def test_scores_beyond_the_cosine_range_are_refused_and_never_pushed():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(2, 4, 8, prototypes)
    huge = [s * 3e37 for s in scores]  # finite, but not cosine similarities (and scores / temperature overflow)
    loss_fn = SwAVLoss()
    loss_fn.queue = queue_of(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"scores\[0\] reach 2.2\de\+37 in magnitude, beyond the cosine range"):
        loss_fn(scores=huge, embeddings=embeddings, prototypes=prototypes)
    assert torch.equal(loss_fn.queue.rows, torch.zeros(2, 8, 8))


def test_embeddings_that_are_not_unit_vectors_are_refused_and_never_pushed():
    # a custom head without L2 normalisation: before, it trained with loss 0.0 and queue rows of norm 74
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(3, 4, 8, prototypes)
    embeddings = [z * 74 for z in embeddings]
    loss_fn = SwAVLoss()
    loss_fn.queue = queue_of(torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"embeddings\[0\] are not unit vectors \(norms from 74 to 74\).*F.normalize"):
        loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
    assert torch.equal(loss_fn.queue.rows, torch.zeros(2, 8, 8))


def test_prototypes_that_are_not_unit_rows_are_refused_once_they_score_the_queue():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(2, 4, 8, prototypes)
    loss_fn = SwAVLoss()
    queue = F.normalize(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(3)), dim=2)
    loss_fn.queue = queue_of(queue.clone())
    with pytest.raises(ValueError, match=r"the prototypes are not unit rows \(norms from 3 to 3\) while they score"):
        loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes * 3)
    assert torch.equal(loss_fn.queue.rows, queue)
    # without a queue, the prototypes are not used by the loss and not checked
    SwAVLoss()(scores=scores, embeddings=embeddings, prototypes=prototypes * 3)


@pytest.mark.parametrize("name", ["temperature", "epsilon"])
def test_a_divisor_so_small_that_float32_overflows_is_refused(name):
    with pytest.raises(ValueError, match=rf"{name} must be a positive finite number >= 1e-30, got 1e-300"):
        SwAVLoss(**{name: 1e-300})


def test_bfloat16_rounding_of_unit_vectors_is_accepted():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(3, 16, 8, prototypes)
    loss = SwAVLoss()(
        scores=[s.bfloat16() for s in scores], embeddings=[z.bfloat16() for z in embeddings], prototypes=prototypes
    )
    assert torch.isfinite(loss)


def test_a_deferred_check_raises_later_and_the_queue_is_never_written():
    prototypes = unit_prototypes()
    scores, embeddings = make_crops(2, 4, 8, prototypes)
    embeddings[0] = embeddings[0].clone()
    embeddings[0][2, 1] = float("nan")
    loss_fn = SwAVLoss()
    loss_fn.queue = queue_of(torch.zeros(2, 8, 8))
    loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes, check_finite=False)
    assert loss.ndim == 0 and torch.equal(loss_fn.queue.rows, torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match=r"embeddings\[0\]"):
        loss_fn.raise_if_non_finite()
    loss_fn.raise_if_non_finite()  # reported once

    # never checked by the caller: the next call reports it before computing anything
    loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes, check_finite=False)
    finite_scores, finite_embeddings = make_crops(2, 4, 8, prototypes)
    with pytest.raises(ValueError, match=r"embeddings\[0\]"):
        loss_fn(scores=finite_scores, embeddings=finite_embeddings, prototypes=prototypes)
    assert torch.equal(loss_fn.queue.rows, torch.zeros(2, 8, 8))
    loss_fn(scores=finite_scores, embeddings=finite_embeddings, prototypes=prototypes, check_finite=False)
    loss_fn.raise_if_non_finite()
    assert torch.equal(loss_fn.queue.rows[0, :4], finite_embeddings[0])


def test_a_refused_step_on_a_full_queue_leaves_it_in_use():
    prototypes = unit_prototypes()
    loss_fn = SwAVLoss()
    full = F.normalize(torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(4)), dim=2)
    loss_fn.queue = queue_of(full.clone())
    scores, embeddings = make_crops(2, 4, 8, prototypes)
    loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
    assert loss_fn.queue_in_use
    before = loss_fn.queue.rows.clone()
    bad = [embeddings[0].clone(), embeddings[1]]
    bad[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        loss_fn(scores=scores, embeddings=bad, prototypes=prototypes)
    assert loss_fn.queue_in_use and torch.equal(loss_fn.queue.rows, before)
    loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
    assert loss_fn.queue_in_use


def test_a_queue_filled_in_place_is_read_once_when_assigned():
    from helpers import DispatchCounter

    prototypes = unit_prototypes()
    scores, embeddings = make_crops(2, 4, 8, prototypes)
    loss_fn = SwAVLoss()
    half = torch.zeros(2, 8, 8)
    half[:, :4] = F.normalize(torch.randn(2, 4, 8), dim=2)  # 4 rows written: 4 to go
    loss_fn.queue = queue_of(half)
    with DispatchCounter() as first:
        loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes, check_finite=False)
    assert first.synchronisations == 1 and not loss_fn.queue_in_use  # the fill level, read once
    with DispatchCounter() as second:
        loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes, check_finite=False)
    assert second.synchronisations == 1 and loss_fn.queue_in_use  # the pending check of the first call only
