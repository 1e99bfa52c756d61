"""Real 2-process runs on gloo (idist.spawn): the Sinkhorn, the loss and the queue across ranks."""

from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
import torch.nn.functional as F
from helpers import spawn_gloo
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from reference import classic_sinkhorn, classic_swav_loss

from ignite_swav import SwAVLoss, SwAVQueueHandler, sinkhorn

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
FEAT_DIM = 8


def spawn(fn, *args):
    spawn_gloo(fn, *args, nproc=WORLD)


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _sinkhorn_and_loss_worker(rank: int) -> None:
    assert idist.get_world_size() == WORLD
    prototypes = unit(12, FEAT_DIM, seed=0)
    full = unit(2 * 16, FEAT_DIM, seed=1) @ prototypes.t()
    mine = full.chunk(WORLD)[rank]

    # 2 ranks with half the rows each give what one process gives on all rows
    expected = classic_sinkhorn(full).chunk(WORLD)[rank]
    assert torch.allclose(sinkhorn(mine).double(), expected, atol=1e-6), "2-rank sinkhorn != 1-process sinkhorn"

    # with queue rows (of different counts per rank): equipartition over batch + queue of every rank
    queues = [unit(40, FEAT_DIM, seed=2) @ prototypes.t(), unit(24, FEAT_DIM, seed=3) @ prototypes.t()]
    everything = torch.cat([full.chunk(WORLD)[0], queues[0], full.chunk(WORLD)[1], queues[1]])
    expected = classic_sinkhorn(everything)
    start = 0 if rank == 0 else 16 + 40
    got = sinkhorn(mine, queues[rank])
    assert torch.allclose(got.double(), expected[start : start + 16], atol=1e-6)

    # a wide spread of scores (the log-domain path): still one equipartition over the rows of both ranks, and
    # the path is chosen from the spread over both ranks (rank 1 alone would take the float32 kernel)
    wide = torch.cat([full.chunk(WORLD)[0] * 30, full.chunk(WORLD)[1]])
    expected = classic_sinkhorn(wide, 3, 0.05).chunk(WORLD)[rank]
    assert torch.allclose(sinkhorn(wide.chunk(WORLD)[rank]).double(), expected, atol=1e-5)

    # rank 0's rows all prefer prototype 0, rank 1's prototype 1: balancing each rank on its own (as a
    # per-rank Sinkhorn would) spreads each rank over all prototypes; the global equipartition does not.
    skewed = torch.full((16, 4), -1.0)
    skewed[:, rank] = 1.0
    skewed += 0.01 * torch.randn(16, 4, generator=torch.Generator().manual_seed(rank))
    ours = sinkhorn(skewed)
    per_rank = classic_sinkhorn(skewed).float()
    all_skewed = torch.cat([idist.all_gather(skewed.unsqueeze(0))[r] for r in range(WORLD)])
    assert torch.allclose(ours.double(), classic_sinkhorn(all_skewed).chunk(WORLD)[rank], atol=1e-6)
    assert (ours - per_rank).abs().max() > 0.1, "the codes look balanced per rank, not over all ranks"

    # the loss: the mean over ranks equals the loss of one process on the whole batch
    crops = [unit(2 * 8, FEAT_DIM, seed=10 + v) for v in range(3)]
    scores = [z @ prototypes.t() for z in crops]
    local = SwAVLoss()(
        scores=[s.chunk(WORLD)[rank] for s in scores],
        embeddings=[z.chunk(WORLD)[rank] for z in crops],
        prototypes=prototypes,
    )
    mean = idist.all_reduce(local.detach().clone()) / WORLD
    assert torch.allclose(mean.double(), classic_swav_loss(scores, (0, 1)), atol=1e-6)

    # a NaN on one rank stops both ranks (no rank is left waiting in a collective)
    bad = [s.chunk(WORLD)[rank].clone() for s in scores]
    if rank == 1:
        bad[1][0, 0] = float("nan")
    with pytest.raises(
        ValueError, match=r"in scores\[1\]: the model.s output diverged \(on this rank or another one\)"
    ):
        SwAVLoss()(scores=bad, embeddings=[z.chunk(WORLD)[rank] for z in crops], prototypes=prototypes)


def test_sinkhorn_and_loss_on_two_ranks():
    spawn(_sinkhorn_and_loss_worker)


def _make_run(rank: int, epoch_queue_starts: int, dirname=None):
    loss_fn = SwAVLoss()
    handler = SwAVQueueHandler(
        loss_fn,
        queue_length=18,
        epoch_queue_starts=epoch_queue_starts,
        batch_size=4,
        feat_dim=FEAT_DIM,
        dirname=dirname,
    )
    prototypes = unit(6, FEAT_DIM, seed=0)
    g = torch.Generator().manual_seed(100 + rank)

    def step(engine, batch):
        crops = [F.normalize(torch.randn(4, FEAT_DIM, generator=g), dim=1) for _ in range(3)]
        loss = loss_fn(scores=[z @ prototypes.t() for z in crops], embeddings=crops, prototypes=prototypes)
        return {"loss": loss.item(), "use_queue": loss_fn.queue_in_use}

    trainer = Engine(step)
    handler.attach(trainer)
    used = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: used.append((e.state.epoch, e.state.output)))
    return trainer, handler, used


def _save_worker(rank: int, tmp: str) -> None:
    trainer, handler, used = _make_run(rank, epoch_queue_starts=1, dirname=Path(tmp) / "queue_files")
    to_save = {"trainer": trainer, "queue_handler": handler}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(tmp, require_empty=False)))
    trainer.run(range(3), max_epochs=4)
    # 18 trimmed to a multiple of the global batch 8: 16 rows in all, 8 per rank (and 16 on 1 process)
    assert handler.queue_length == 16
    assert handler.queue.rows.shape == (2, 8, FEAT_DIM)
    # created at epoch 2; full after 2 steps of 4 rows; used from then on in that epoch
    assert [u["use_queue"] for e, u in used if e == 1] == [False] * 3
    assert [u["use_queue"] for e, u in used if e == 2] == [False, False, True]
    assert all(u["use_queue"] for e, u in used if e > 2)
    torch.save(handler.queue.rows.clone(), Path(tmp) / f"rank{rank}.pt")


def _load_worker(rank: int, tmp: str) -> None:
    trainer, handler, used = _make_run(rank, epoch_queue_starts=1)
    Checkpoint.load_objects({"trainer": trainer, "queue_handler": handler}, Path(tmp) / "one_process.pt")
    saved = torch.load(Path(tmp) / "one_process.pt", weights_only=True)["queue_handler"]["queue"]
    # rank r gets global rows r, r + 2, r + 4, ...: every row on exactly one rank
    assert torch.equal(handler.queue.rows, saved[:, rank::WORLD])
    trainer.run(range(3), max_epochs=trainer.state.epoch + 1)
    assert used and all(u["use_queue"] for _, u in used), "a full restored queue is used at once"


def test_queue_per_rank_shape_save_on_two_and_resume_on_one_and_back(tmp_path: Path):
    spawn(_save_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # the Checkpoint file written on 2 ranks, resumed on 1 process: every row of both ranks, none doubled
    trainer, handler, used = _make_run(0, epoch_queue_starts=1)
    checkpoint = tmp_path / "checkpoint_12.pt"
    Checkpoint.load_objects({"trainer": trainer, "queue_handler": handler}, checkpoint)
    assert handler.queue.rows.shape == (2, 16, FEAT_DIM)
    for r in range(WORLD):
        assert torch.equal(handler.queue.rows[:, r::WORLD], ranks[r])
    # the handler's own file holds the same rows
    own = torch.load(tmp_path / "queue_files" / "swav_queue_12.pt", weights_only=True)
    assert torch.equal(own["queue"], handler.queue.rows)
    trainer.run(range(3), max_epochs=5)
    assert all(u["use_queue"] for _, u in used)

    # and saved on 1 process, resumed on 2
    torch.save({"trainer": trainer.state_dict(), "queue_handler": handler.state_dict()}, tmp_path / "one_process.pt")
    spawn(_load_worker, str(tmp_path))


def _ddp_and_knn_worker(rank: int, expected_knn: float) -> None:
    from helpers import random_crops, tiny_swav_model

    from ignite_swav import create_knn_evaluator, create_swav_trainer

    model = idist.auto_model(tiny_swav_model(seed=rank))  # different inits: DDP broadcasts rank 0's
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    optimizer = idist.auto_optim(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9))
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, optimizer, loss_fn, freeze_prototypes_iters=1)
    SwAVQueueHandler(loss_fn, queue_length=16, epoch_queue_starts=0).attach(trainer)
    start = model.module.prototypes.weight.detach().clone()
    data = [random_crops(4, sizes=(16, 16, 8, 8), seed=10 * rank + i) for i in range(4)]  # other data per rank
    trainer.run(data, max_epochs=1)
    assert (model.module.prototypes.weight - start).abs().max() > 1e-3  # trained after the frozen iteration
    for name, parameter in model.module.named_parameters():
        both = idist.all_gather(parameter.detach().unsqueeze(0))
        assert torch.equal(both[0], both[1]), f"{name} differs between the ranks"

    # kNN with half of the reference and half of the held-out set on each rank = one process with all of it
    reference, heldout = _knn_data()
    backbone = _knn_backbone()
    # uneven shards (3 and 2 images of the last reference batch) are gathered whole
    reference = reference[:-1] + [(reference[-1][0][:5], reference[-1][1][:5])]
    evaluator = create_knn_evaluator(backbone, [(x[rank::WORLD], y[rank::WORLD]) for x, y in reference], k=5)
    evaluator.run([(x[rank::WORLD], y[rank::WORLD]) for x, y in heldout])
    assert abs(evaluator.state.metrics["knn_top1"] - expected_knn) < 1e-12


def _knn_data():
    g = torch.Generator().manual_seed(3)
    make = lambda n: [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]  # noqa: E731
    return make(6), make(4)


def _knn_backbone():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 6)


def test_ddp_step_keeps_ranks_identical_and_knn_is_correct_on_two_ranks():
    from ignite_swav import create_knn_evaluator

    reference, heldout = _knn_data()
    reference = reference[:-1] + [(reference[-1][0][:5], reference[-1][1][:5])]
    evaluator = create_knn_evaluator(_knn_backbone(), reference, k=5)
    evaluator.run(heldout)
    expected = evaluator.state.metrics["knn_top1"]
    assert 0 < expected < 1  # not a trivial case
    spawn(_ddp_and_knn_worker, expected)


def _different_batch_sizes_worker(rank: int) -> None:
    loss_fn = SwAVLoss()
    handler = SwAVQueueHandler(loss_fn, queue_length=16, epoch_queue_starts=0, batch_size=4 + 4 * rank, feat_dim=8)
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer)
    with pytest.raises(ValueError, match=r"the batch_size differs between processes \(\[4, 8\], by rank\)"):
        trainer.run([0], max_epochs=1)


def test_per_rank_batch_sizes_that_differ_are_one_clear_error_on_every_rank():
    spawn(_different_batch_sizes_worker)


def _different_prototypes_worker(rank: int) -> None:
    prototypes = unit(6 + rank, FEAT_DIM, seed=0)  # rank 1 has one prototype more
    crops = [unit(4, FEAT_DIM, seed=v) for v in range(3)]
    with pytest.raises(ValueError, match=r"by rank: \[\(4, 8, 6\), \(4, 8, 7\)\]"):
        SwAVLoss()(scores=[z @ prototypes.t() for z in crops], embeddings=crops, prototypes=prototypes)


def test_processes_with_other_shapes_are_told_so_instead_of_aborting_in_a_collective():
    spawn(_different_prototypes_worker)


def _checkpoint_on_rank_zero_only_worker(rank: int, dirname: str) -> None:
    # A common Ignite habit: the Checkpoint on rank 0 only. Its state_dict runs no collective any more, so this
    # no longer waits for the other rank until the process group's timeout.
    trainer, handler, _ = _make_run(rank, epoch_queue_starts=0)
    if rank == 0:
        saver = Checkpoint({"queue": handler}, DiskSaver(dirname, require_empty=False), n_saved=None)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, saver)
    trainer.run(range(3), max_epochs=3)
    local = handler.queue.rows.clone()
    every_rank = idist.all_gather(local.unsqueeze(0))
    if rank == 0:
        saved = torch.load(Path(dirname) / "queue_9.pt", weights_only=True)["queue"]
        # the saved queue holds the rows of both ranks, interleaved
        assert torch.equal(saved[:, 0::2], every_rank[0]) and torch.equal(saved[:, 1::2], every_rank[1])


def test_a_checkpoint_attached_on_rank_zero_only_saves_the_whole_queue_without_hanging(tmp_path: Path):
    spawn(_checkpoint_on_rank_zero_only_worker, str(tmp_path))


def _padded_sampler_worker(rank: int) -> None:
    from ignite_swav import create_knn_evaluator, extract_features

    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(11, 4, generator=g), torch.arange(11) % 3  # 11 samples on 2 ranks: 1 padded
    dataset = torch.utils.data.TensorDataset(features, labels)
    loader = idist.auto_dataloader(dataset, batch_size=4, shuffle=False)  # a padded DistributedSampler
    assert len(loader.sampler) * WORLD == 12
    bank, bank_labels = extract_features(torch.nn.Identity(), loader)
    assert bank.shape == (11, 4) and sorted(bank_labels.tolist()) == sorted(labels.tolist())
    evaluator = create_knn_evaluator(torch.nn.Identity(), loader, k=1)
    state = evaluator.run(loader)
    metric = state.metrics["knn_top1"]
    assert metric == 1.0  # each sample is its own nearest neighbour; counted once over the ranks
    counted = idist.all_reduce(torch.tensor(float(state.iteration)))
    assert counted > 0


def test_a_padded_distributed_sampler_counts_every_sample_once():
    spawn(_padded_sampler_worker)
