"""No process ever waits for one that failed or stopped alone: every public piece that runs a collective agrees on
its errors on every rank, handles a rank with nothing to do, and a stop decided by one rank is carried out by
all of them at the same iteration. Each scenario runs on real gloo processes in a group of its own under a hard
timeout (tests/spawned.py): a hang fails its test within a minute.

Each worker records, per scenario, the error it raised or what it computed, in ``rank<r>.json``; the tests compare
the ranks' records."""

from __future__ import annotations

import json
from pathlib import Path

import ignite.distributed as idist
import pytest
import torch
from helpers import random_crops, tiny_swav_model
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from spawned import run_group
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from ignite_swav import (
    OnlineLinearProbe,
    SwAVEvents,
    SwAVHealthMonitor,
    SwAVLoss,
    SwAVLossStep,
    SwAVQueueHandler,
    assign_clusters,
    create_knn_evaluator,
    create_swav_trainer,
    load_objects,
    recalibrate_batchnorm,
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def outcome(function, *args) -> str:
    """What ``function(*args)`` gave: its value, or the error it raised (type and message)."""
    try:
        return repr(function(*args))
    except (ValueError, RuntimeError, TypeError) as error:
        return f"{type(error).__name__}: {error}"


def scenario(name: str) -> None:
    """Say which scenario a process enters: the output of a group that hangs names where."""
    print(f"rank {idist.get_rank()}: {name}", flush=True)


def record(out: str, results: dict) -> None:
    (Path(out) / f"rank{idist.get_rank()}.json").write_text(json.dumps(results))


def records(out: Path, ranks: int = 2) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def small_trainer(rank: int, queue_length: int = 16, attach: bool = True, **kwargs):
    model = idist.auto_model(tiny_swav_model(seed=0))
    optimizer = idist.auto_optim(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, optimizer, loss_fn, **kwargs)
    handler = SwAVQueueHandler(loss_fn, queue_length=queue_length, epoch_queue_starts=1)
    if attach:
        handler.attach(trainer)
    return trainer, model, optimizer, handler


def crops_of(rank: int, count: int, labels: bool = False) -> list:
    batches = [random_crops(4, sizes=(16, 16, 8, 8), seed=100 * rank + i) for i in range(count)]
    return [(c, torch.tensor([0, 1, 2, 0])) for c in batches] if labels else batches


def _library_pieces_worker(rank: int, out: str) -> None:
    results = {}

    scenario("probe label")
    # a bad label in the third batch of rank 1 only: one error, on both ranks, at the epoch's end
    trainer, model, *_ = small_trainer(rank)
    probe = OnlineLinearProbe(model.module.backbone, num_classes=3)
    probe.attach(trainer)
    data = crops_of(rank, 4, labels=True)
    if rank == 1:
        data[2] = (data[2][0], torch.tensor([0, 9, 1, 2]))
    results["probe"] = outcome(trainer.run, data, 1)
    results["probe_iteration"] = trainer.state.iteration

    scenario("health monitor without a step")
    # the health monitor on a rank that saw no step of the epoch: both ranks combine the other's figures
    loss_fn = SwAVLoss()
    monitor = SwAVHealthMonitor(loss_fn)
    engine = Engine(lambda e, b: None)
    engine.state.epoch = 1
    if rank == 0:
        g = torch.Generator().manual_seed(0)
        codes = torch.softmax(torch.randn(2, 8, 5, generator=g), dim=2)
        loss_fn.last_step = SwAVLossStep(torch.tensor(1.5), codes, torch.randn(2, 8, 5, generator=g))
        monitor.iteration_completed(engine)
    monitor.completed(engine)
    results["health"] = sorted((k, round(v, 6)) for k, v in engine.state.metrics.items())

    scenario("clusters of padding")
    # clusters with one image in all: rank 1's shard is the DistributedSampler's padding only
    model = tiny_swav_model(seed=1)
    images = TensorDataset(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)), torch.zeros(1))
    loader = DataLoader(images, batch_size=2, sampler=DistributedSampler(images, shuffle=False))
    results["balanced_padding"] = outcome(lambda: assign_clusters(model, loader, balanced=True).tolist())
    results["argmax_padding"] = outcome(lambda: assign_clusters(model, loader).tolist())
    nan_images = torch.randn(4, 3, 16, 16)
    if rank == 1:
        nan_images[2, 0, 0, 0] = float("nan")
    results["nan_image"] = outcome(assign_clusters, model, [nan_images], None, True)

    scenario("k-NN empty shard")
    # k-NN whose reference shard is empty on rank 1
    torch.manual_seed(0)
    backbone = torch.nn.Linear(4, 6)
    g = torch.Generator().manual_seed(3)
    reference = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]
    heldout = [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    evaluator = create_knn_evaluator(backbone, reference if rank == 0 else [], k=5)
    results["knn_empty_shard"] = outcome(lambda: evaluator.run(heldout[rank : rank + 1]).metrics["knn_top1"])
    results["knn_nothing"] = outcome(lambda: create_knn_evaluator(backbone, [], k=5).run(heldout).metrics)

    scenario("BatchNorm on uneven shards")
    # BatchNorm statistics on uneven shards (3 batches and 1): the average over all batches, as on one process
    bn = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    torch.manual_seed(11)
    batches = [(torch.randn(4, 2) + i, torch.zeros(4)) for i in range(4)]
    mine = batches[:3] if rank == 0 else batches[3:]
    recalibrated = recalibrate_batchnorm(bn, mine)
    one_process = recalibrate_batchnorm(bn, batches)
    results["batchnorm"] = [
        torch.allclose(recalibrated[0].running_mean, one_process[0].running_mean, atol=1e-6),
        torch.allclose(recalibrated[0].running_var, one_process[0].running_var, atol=1e-6),
    ]

    scenario("uneven epochs")
    # epochs of another length on each rank: refused when the run starts, on both ranks
    trainer, *_ = small_trainer(rank)
    results["uneven_epochs"] = outcome(trainer.run, crops_of(rank, 3 if rank == 0 else 2), 1)
    record(out, results)


def test_every_library_piece_agrees_on_its_errors_and_works_on_a_rank_with_nothing(tmp_path: Path):
    run_group(_library_pieces_worker, tmp_path, timeout=60)
    rank0, rank1 = records(tmp_path)
    for key in rank0:
        assert rank0[key] == rank1[key], f"{key}: rank 0 {rank0[key]!r}, rank 1 {rank1[key]!r}"
    assert "OnlineLinearProbe(num_classes=3) got 1 label(s) outside 0..2 in epoch 1" in rank0["probe"]
    assert rank0["probe_iteration"] == 4  # the whole epoch ran (the label was not trained on): no device assert
    assert dict(rank0["health"])["prototype_usage"] > 0
    assert len(json.loads(rank0["balanced_padding"])) == len(json.loads(rank0["argmax_padding"])) == 1  # one image
    assert "NaN or infinite embeddings (on this rank or another one)" in rank0["nan_image"]
    assert 0 <= float(rank0["knn_empty_shard"]) <= 1
    assert "the loader gave no batch (on any process)" in rank0["knn_nothing"]
    assert rank0["batchnorm"] == [True, True]
    assert "the epoch length differs between processes ([3, 2], by rank)" in rank0["uneven_epochs"]


def _stop_worker(rank: int, out: str) -> None:
    results = {}
    trainer, model, optimizer, handler = small_trainer(rank, attach=False)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": handler}
    # Checkpoints on rank 0 only, attached before the queue handler: the order of the attach calls does not matter
    if rank == 0:
        saver = Checkpoint(to_save, DiskSaver(out, require_empty=False), filename_prefix="stopped", n_saved=None)
        trainer.add_event_handler(Events.TERMINATE, saver)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(out, require_empty=False)))
    handler.attach(trainer)
    if rank == 1:  # a rank-local condition (a clock, as Ignite's TimeLimit): only rank 1 asks to stop
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=6), lambda e: e.terminate())
    first_use = []
    trainer.add_event_handler(SwAVEvents.QUEUE_FIRST_USED, lambda e: first_use.append(e.state.iteration))
    trainer.run(crops_of(rank, 4), max_epochs=5)
    results["stopped_at"] = trainer.state.iteration
    results["first_use"] = first_use
    stopped_queue = handler.queue.rows.clone()

    scenario("resume of the stop")
    # the resume, into new objects, from the file rank 0 wrote: the queue of the stop back on its rank
    idist.barrier()  # rank 0 has written it
    trainer, model, optimizer, handler = small_trainer(rank)
    to_load = {"model": model.module, "optimizer": optimizer, "trainer": trainer, "queue_handler": handler}
    (saved,) = sorted(Path(out).glob("stopped_*.pt"))
    load_objects(to_load, saved)
    results["queue_restored"] = torch.equal(handler.queue.rows, stopped_queue)
    trainer.run(crops_of(rank, 4), max_epochs=3)
    results["resumed_to"] = trainer.state.iteration

    scenario("max_iters and COMPLETED")
    # run(max_iters=...) ending mid-epoch, a Checkpoint on COMPLETED on rank 0 only: the queue of that iteration
    trainer, model, optimizer, handler = small_trainer(rank)
    if rank == 0:
        to_save = {"trainer": trainer, "queue_handler": handler}
        saver = DiskSaver(Path(out) / "max_iters", require_empty=False)
        trainer.add_event_handler(Events.COMPLETED, Checkpoint(to_save, saver, filename_prefix="completed"))
    trainer.run(crops_of(rank, 4), max_iters=7)
    full = idist.all_gather(handler.queue.rows.unsqueeze(0))
    if rank == 0:
        (saved,) = (Path(out) / "max_iters").glob("completed_*.pt")
        queue = torch.load(saved, weights_only=True)["queue_handler"]["queue"]
        results["max_iters_queue_saved"] = [torch.equal(queue[:, r::2], full[r]) for r in range(2)]
    record(out, results)


def test_a_stop_decided_by_one_rank_is_carried_out_by_every_rank_at_the_same_iteration_and_keeps_the_queue(
    tmp_path: Path,
):
    run_group(_stop_worker, tmp_path)
    rank0, rank1 = records(tmp_path)
    assert rank0["stopped_at"] == rank1["stopped_at"]
    assert 6 < rank0["stopped_at"] <= 8  # agreed through the next steps' verdicts
    assert rank0["first_use"] == rank1["first_use"] == [7]  # queue from epoch 2, full after 2 pushes of 8 rows
    assert rank0["max_iters_queue_saved"] == [True, True]  # run(max_iters=7): the queue of iteration 7, whole
    assert (tmp_path / "checkpoint_4.pt").exists()  # the per-epoch checkpoint, beside the stop's
    assert rank0["queue_restored"] and rank1["queue_restored"]  # each rank's rows back from rank 0's file
    assert rank0["resumed_to"] == rank1["resumed_to"] == 12


def _reshard_save_worker(rank: int, out: str) -> None:
    # 2 processes of batch 2, 24 rows (12 each), 4 pushes: global rows 0-15 written, 16-23 empty
    trainer, model, optimizer, handler = small_trainer(rank, queue_length=24)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": handler}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(out, require_empty=False)))
    trainer.run([[c[:2] for c in crops] for crops in crops_of(rank, 4)], max_epochs=2)


def _reshard_resume_worker(rank: int, out: str) -> None:
    # on 3 processes (8 rows each) rank 0 gets 6 written rows, ranks 1 and 2 get 5: one push fills rank 0, two
    # the others; the queue comes into use when every rank's is full
    trainer, model, optimizer, handler = small_trainer(rank, queue_length=24)
    to_load = {"model": model.module, "optimizer": optimizer, "trainer": trainer, "queue_handler": handler}
    load_objects(to_load, Path(out) / "checkpoint_8.pt")
    uses, used = [], []
    trainer.add_event_handler(SwAVEvents.QUEUE_FIRST_USED, lambda e: uses.append(e.state.iteration))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: used.append(e.state.queue_in_use))
    trainer.run([[c[:2] for c in crops] for crops in crops_of(rank, 4)], max_epochs=3)
    record(out, {"first_use": uses, "used": used, "local_rows": handler.queue.rows.shape[1]})


@pytest.mark.soak
def test_a_queue_resharded_from_2_processes_to_3_comes_into_use_at_the_same_iteration_on_each(tmp_path: Path):
    run_group(_reshard_save_worker, tmp_path)
    run_group(_reshard_resume_worker, tmp_path, nproc=3)
    rank0, rank1, rank2 = records(tmp_path, 3)
    assert rank0 == rank1 == rank2, (rank0, rank1, rank2)
    assert rank0["local_rows"] == 8
    assert rank0["first_use"] == [11] and rank0["used"] == [False, False, True, True]  # iterations 9-12
