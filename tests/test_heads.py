"""Several prototype heads (DeepCluster-v2's and SeLa-v2's MultiPrototypes): each head its own codes, the loss the
mean of the heads', the health figures of all heads, one model trained end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import queue_of, random_crops, tiny_swav_model
from ignite.engine import Events

from ignite_swav import SwAVHealthMonitor, SwAVLoss, SwAVModel, SwAVPrototypes, create_swav_trainer

HEADS, K, DIM, BATCH, CROPS = 3, 6, 8, 5, 4


def heads_and_crops(seed=0):
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(HEADS, K, DIM, generator=g), dim=2)
    embeddings = [F.normalize(torch.randn(BATCH, DIM, generator=g), dim=1) for _ in range(CROPS)]
    return prototypes, embeddings


def test_the_loss_of_several_heads_is_the_mean_of_each_head_alone_with_and_without_a_queue():
    prototypes, embeddings = heads_and_crops()
    queue = torch.stack(
        [F.normalize(torch.randn(7, DIM, generator=torch.Generator().manual_seed(c)), dim=1) for c in (5, 6)]
    )
    for with_queue in (False, True):
        together = SwAVLoss()
        together.queue = queue_of(queue.clone()) if with_queue else None
        scores = [z @ prototypes.reshape(-1, DIM).t() for z in embeddings]  # (B, H * K): head after head
        loss = together(scores=scores, embeddings=embeddings, prototypes=prototypes)
        alone, codes = [], []
        for head in range(HEADS):
            single = SwAVLoss()
            single.queue = queue_of(queue.clone()) if with_queue else None
            head_scores = [z @ prototypes[head].t() for z in embeddings]
            alone.append(single(scores=head_scores, embeddings=embeddings, prototypes=prototypes[head]))
            codes.append(single.last_step.codes)
        assert float(loss) == pytest.approx(float(torch.stack(alone).mean()), rel=1e-6)
        step = together.last_step
        assert step.num_heads == HEADS and step.codes.shape == (2 * HEADS, BATCH, K)
        for crop in range(2):  # crop 0's heads, then crop 1's
            for head in range(HEADS):
                torch.testing.assert_close(step.codes[crop * HEADS + head], codes[head][crop])
        if with_queue:  # pushed once, not once per head
            torch.testing.assert_close(together.queue.rows[:, :BATCH], torch.stack(embeddings[:2]))


def test_the_health_figures_count_every_head_s_prototypes_apart():
    prototypes, embeddings = heads_and_crops()
    loss_fn = SwAVLoss()
    monitor = SwAVHealthMonitor(loss_fn)
    monitor.reset()
    # every sample's best prototype: 1 in head 0, 2 in head 1, 1 in head 2 (the same id in two heads: two prototypes)
    scores = torch.full((BATCH, HEADS * K), -0.5)
    scores[:, [1, K + 2, 2 * K + 1]] = 0.9
    loss_fn(scores=[scores] * CROPS, embeddings=embeddings, prototypes=prototypes)
    monitor.iteration_completed(None)
    figures = monitor.compute()
    assert figures["prototype_usage"] == pytest.approx(3 / (HEADS * K))
    codes = loss_fn.last_step.codes
    entropy = torch.special.entr(codes).sum() / (codes.shape[0] * codes.shape[1]) / math.log(K)
    assert figures["code_entropy"] == pytest.approx(float(entropy), rel=1e-5)
    assert figures["loss_over_lnk"] == pytest.approx(float(loss_fn.last_step.loss) / math.log(K), rel=1e-5)


def test_a_model_with_three_heads_trains_and_keeps_each_prototype_a_unit_row():
    small = tiny_swav_model()
    model = SwAVModel(small.backbone, small.projection, SwAVPrototypes(small.prototypes.in_features, [K] * HEADS))
    start = model.prototypes.weight.detach().clone()
    losses = []
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), SwAVLoss())
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output))
    trainer.run([random_crops(4, sizes=(16, 16, 8), seed=s) for s in range(4)], max_epochs=2)
    assert losses[-1] < losses[0] / 2  # it learns: 5.16 to 2.01 in 8 steps
    assert all(math.isfinite(v) for v in losses)
    assert not torch.equal(model.prototypes.weight, start)
    norms = torch.linalg.vector_norm(F.normalize(model.prototypes.weight.detach(), dim=1), dim=1)
    assert torch.allclose(norms, torch.ones(HEADS * K))


def test_bad_heads_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"heads of different widths \[3000, 1000\]"):
        SwAVPrototypes(128, [3000, 1000])
    with pytest.raises(ValueError, match="at least one head, got an empty list"):
        SwAVPrototypes(128, [])
    with pytest.raises(ValueError, match=r"num_prototypes\[1\] must be an integer >= 1, got 0"):
        SwAVPrototypes(128, [10, 0])
    prototypes, embeddings = heads_and_crops()
    scores = [z @ prototypes.reshape(-1, DIM).t() for z in embeddings]
    with pytest.raises(ValueError, match=r"prototypes have 12 rows \(shape \(2, 6, 8\)\), but the scores have 18"):
        SwAVLoss()(scores=scores, embeddings=embeddings, prototypes=prototypes[:2])
    with pytest.raises(ValueError, match=r"prototypes must be a \(K, D\) tensor, or \(H, K, D\)"):
        SwAVLoss()(scores=scores, embeddings=embeddings, prototypes=prototypes[None])


def _two_ranks_with_heads(rank: int) -> None:
    # each rank its own 2 images: the heads' Sinkhorns run over both ranks; a NaN on rank 1 alone stops both ranks
    import ignite.distributed as idist

    prototypes, embeddings = heads_and_crops(seed=0)
    mine = [z[2 * rank : 2 * rank + 2] for z in embeddings]
    scores = [z @ prototypes.reshape(-1, DIM).t() for z in mine]
    loss_fn = SwAVLoss()
    loss = loss_fn(scores=scores, embeddings=mine, prototypes=prototypes)
    assert torch.isfinite(idist.all_gather(loss.detach().reshape(1))).all()
    codes = loss_fn.last_step.codes
    assert codes.shape == (2 * HEADS, 2, K) and torch.allclose(codes.sum(dim=2), torch.ones(2 * HEADS, 2))
    bad = [s.clone() for s in scores]
    if rank == 1:
        bad[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in scores\[0\]"):
        SwAVLoss()(scores=bad, embeddings=mine, prototypes=prototypes)


@pytest.mark.distributed
def test_on_two_processes_the_heads_share_one_equipartition_and_one_rank_s_nan_stops_both():
    from spawned import run_group

    run_group(_two_ranks_with_heads, timeout=90)
