"""SwAVQueue on its own: the loss fills and scores it, nothing else touches it; its rows, push, fill count, scores,
gather and state (the Ignite handler that drives it from events: test_queue.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import queue_of
from ignite import distributed as idist

from ignite_swav import SwAVLoss, SwAVQueue, SwAVQueueHandler, sinkhorn

DIM, K = 8, 12


def crops(batch: int = 4, seed: int = 0, num_crops: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(batch, DIM, generator=g), dim=1) for _ in range(num_crops)], prototypes()


def prototypes(heads: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    shape = (heads, K, DIM) if heads else (K, DIM)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def call(loss_fn: SwAVLoss, embeddings: list[torch.Tensor], weights: torch.Tensor, **kwargs) -> torch.Tensor:
    return loss_fn(embeddings, [z @ weights.reshape(-1, DIM).t() for z in embeddings], weights, **kwargs)


def test_a_started_queue_is_made_from_the_first_batch_filled_newest_first_and_scored_once_full():
    queue = SwAVQueue(length=8)
    loss_fn = SwAVLoss(queue=queue)
    assert loss_fn.queue is queue and queue.rows is None and not queue.started
    call(loss_fn, *crops(seed=0))
    assert queue.rows is None  # not started: the loss leaves it alone
    queue.start()
    assert queue.rows is None  # the batch size and width are learned from the next batch
    pushed = []
    for step in range(3):
        embeddings, weights = crops(seed=step + 1)
        call(loss_fn, embeddings, weights)
        pushed.append(torch.stack(embeddings[:2]))
        assert queue.in_use is (step == 2) and loss_fn.queue_in_use is queue.in_use  # full after two batches of 4
    assert (queue.batch_size, queue.feat_dim, queue.rows.shape) == (4, DIM, (2, 8, DIM))
    torch.testing.assert_close(queue.rows, torch.cat([pushed[2], pushed[1]], dim=1))  # newest first


def test_the_queue_scored_by_the_loss_is_the_one_read_before_the_push():
    rows = F.normalize(torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(3)), dim=2)
    embeddings, weights = crops(seed=4)
    with_queue = SwAVLoss(queue=queue_of(rows.clone()))
    call(with_queue, embeddings, weights)
    # the public Sinkhorn with the queue's scores as they were before this call's push joining the equipartition
    for crop in range(2):
        expected = sinkhorn(embeddings[crop] @ weights.t(), rows[crop] @ weights.t())
        torch.testing.assert_close(with_queue.last_step.codes[crop], expected)
    # after the call: the batch on top, the four oldest rows gone
    torch.testing.assert_close(with_queue.queue.rows, torch.cat([torch.stack(embeddings[:2]), rows[:, :4]], dim=1))


def test_scores_are_laid_out_as_the_loss_s_problems_crop_by_crop_and_head_by_head():
    queue = queue_of(F.normalize(torch.randn(2, 8, DIM), dim=2))
    one = prototypes()
    torch.testing.assert_close(queue.scores(one), queue.rows @ one.t())
    three = prototypes(heads=3)
    scores = queue.scores(three)
    assert scores.shape == (6, 8, K)
    for crop in range(2):
        for head in range(3):
            torch.testing.assert_close(scores[crop * 3 + head], queue.rows[crop] @ three[head].t())
    out = torch.empty(6, 8, K, dtype=torch.float64)
    assert queue.scores(three, torch.float64, out=out) is out and out.dtype == torch.float64


def test_a_push_refused_on_the_device_changes_no_row_and_its_count_is_given_back():
    queue = SwAVQueue(length=8, num_crops=1, batch_size=4, feat_dim=DIM)
    queue.start(torch.device("cpu"))
    assert queue.prepare(4, DIM, torch.device("cpu")) is None  # empty; the fill read once: 8 rows missing
    first, second = (F.normalize(torch.randn(1, 4, DIM), dim=2) for _ in range(2))
    assert queue.push(first, torch.tensor(True)) == 4
    before = queue.rows.clone()
    counted = queue.push(second, torch.tensor(False))  # the host counts it before it knows the verdict
    assert counted == 4 and torch.equal(queue.rows, before)
    queue.uncount(counted)
    assert queue.prepare(4, DIM, torch.device("cpu")) is None  # still 4 rows to write
    queue.push(second)
    assert queue.prepare(4, DIM, torch.device("cpu")) is queue.rows and queue.in_use
    assert torch.equal(queue.rows[0], torch.cat([second[0], first[0]]))


def test_the_length_is_trimmed_to_the_global_batch_once_known_and_said_once(caplog):
    queue = SwAVQueue(length=18, batch_size=4, feat_dim=DIM)
    with caplog.at_level(logging.WARNING):
        queue.start(torch.device("cpu"))
        assert queue.length == 16 and queue.rows.shape == (2, 16, DIM)
        queue.reset()
        queue.start(torch.device("cpu"))
    assert caplog.text.count("queue_length=18 is used as 16") == 1
    queue.reset(32)
    assert (queue.rows, queue.started, queue.length, queue.requested_length) == (None, False, 32, 32)


def test_state_dict_round_trip_keeps_the_rows_and_a_bad_state_changes_nothing():
    queue = queue_of(F.normalize(torch.randn(2, 8, DIM), dim=2))
    state = queue.state_dict()
    assert (state["queue_length"], state["feat_dim"], state["num_crops"]) == (8, DIM, 2)
    restored = SwAVQueue(length=8)
    restored.load_state_dict(state)
    assert torch.equal(restored.rows, queue.rows) and restored.rows is not state["queue"] and restored.started
    kept = restored.rows
    for bad, message in [
        ({**state, "queue": state["queue"][:, :, :4]}, "width 4, but this queue has feat_dim=8"),
        ({**state, "queue": state["queue"][:1]}, r"1 crop slot\(s\), but this queue has num_crops=2"),
        ({**state, "queue": torch.full((2, 8, DIM), float("inf"))}, "NaN or infinite"),
        ({**state, "version": 7}, "format version 7"),
    ]:
        with pytest.raises(ValueError, match=message):
            restored.load_state_dict(bad)
        assert restored.rows is kept
    restored.load_state_dict({**state, "queue": None})
    assert restored.rows is None and not restored.started


def test_bad_rows_arguments_and_queues_are_refused_in_one_line():
    queue = SwAVQueue(length=8, feat_dim=DIM)
    with pytest.raises(ValueError, match=r"SwAVQueue.rows must be a float tensor \(num_crops, rows, feat_dim\), got"):
        queue.rows = torch.zeros(8, DIM)
    with pytest.raises(ValueError, match=r"has 3 crop slot\(s\), but the queue has num_crops=2"):
        queue.rows = torch.zeros(3, 8, DIM)
    with pytest.raises(ValueError, match="holds embeddings of width 4, but the queue has feat_dim=8"):
        queue.rows = torch.zeros(2, 8, 4)
    for kwargs, message in [
        ({"length": -1}, "length must be an integer >= 0, got -1"),
        ({"length": 8, "num_crops": 0}, "num_crops must be an integer >= 1, got 0"),
        ({"length": 8, "batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"length": 8, "feat_dim": "8"}, "feat_dim must be an integer >= 1"),
    ]:
        with pytest.raises((TypeError, ValueError), match=message):
            SwAVQueue(**kwargs)
    with pytest.raises(ValueError, match=r"the queue has num_crops=2, but the loss assigns 3 crops"):
        SwAVLoss(crops_for_assign=(0, 1, 2), queue=SwAVQueue(8))
    with pytest.raises(TypeError, match="queue must be an ignite_swav.SwAVQueue or None, got list"):
        SwAVLoss(queue=[])
    with pytest.raises(ValueError, match="loss_fn already has a SwAVQueue of its own"):
        SwAVQueueHandler(SwAVLoss(queue=SwAVQueue(8)), queue_length=8)
    given = SwAVQueue(length=8, batch_size=8, feat_dim=DIM)
    with pytest.raises(ValueError, match="the queue has batch_size=8, but the first batch of the run holds 4"):
        given.check_batch(4, DIM)
    with pytest.raises(ValueError, match="the queue has feat_dim=8, but the loss gets embeddings of width 4"):
        given.check_batch(8, 4)


def test_a_queue_that_does_not_fit_in_memory_says_how_large_it_is(monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    queue = SwAVQueue(length=1 << 20, batch_size=4, feat_dim=DIM)
    monkeypatch.setattr(torch, "zeros", no_memory)
    with pytest.raises(ValueError, match=r"queue_length=1048576 needs a queue of \(2, 1048576, 8\) float32 values"):
        queue.start(torch.device("cpu"))
    assert queue.rows is None


def test_the_handler_drives_the_loss_s_queue_through_the_queue_s_methods_only():
    loss_fn = SwAVLoss()
    handler = SwAVQueueHandler(loss_fn, queue_length=8, epoch_queue_starts=0)
    assert loss_fn.queue is handler.queue and handler.queue.handler is handler and loss_fn.queue_handler is handler
    with pytest.raises(AttributeError):
        handler.queue = SwAVQueue(8)  # type: ignore[misc]  # the handler's queue is its own, not swapped from outside


def _two_ranks_alone(rank: int, out: str) -> None:
    # rank 0's queue full, rank 1's half: neither scores it before both are full, at the same step; then a NaN on
    # rank 1 alone stops both ranks and no rank's rows change; the gathered state interleaves the ranks by age
    g = torch.Generator().manual_seed(rank)
    rows = F.normalize(torch.randn(2, 4, DIM, generator=g), dim=2)
    if rank == 1:
        rows[:, 2:] = 0
    queue = queue_of(rows)
    loss_fn = SwAVLoss(queue=queue)
    used = []
    for step in range(2):
        embeddings, weights = crops(batch=2, seed=10 * step + rank)
        call(loss_fn, embeddings, weights)
        used.append(queue.in_use)
    assert used == [False, True], used  # rank 1 full after its first push: both use it from the second step
    before = queue.rows.clone()
    embeddings, weights = crops(batch=2, seed=50 + rank)
    if rank == 1:
        embeddings[0] = embeddings[0].clone()
        embeddings[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        call(loss_fn, embeddings, weights)
    assert torch.equal(queue.rows, before)
    queue.gather()
    state = queue.state_dict()
    gathered = idist.all_gather(queue.rows.unsqueeze(0))
    assert torch.equal(state["queue"][:, rank::2], queue.rows) and torch.equal(
        state["queue"][:, 1 - rank :: 2], gathered[1 - rank]
    )
    if rank == 0:
        torch.save(state, Path(out) / "state.pt")


@pytest.mark.distributed
def test_on_two_processes_the_queue_is_used_at_the_same_step_and_one_rank_s_nan_stops_both(tmp_path: Path):
    from spawned import run_group

    run_group(_two_ranks_alone, tmp_path, timeout=90)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    alone = SwAVQueue(length=8)
    alone.load_state_dict(state)  # 2 processes -> 1: every row kept, in age order
    assert torch.equal(alone.rows, state["queue"]) and state["queue_length"] == 8
