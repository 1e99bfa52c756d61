import logging
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from ignite_swav import SwAVLoss, SwAVQueueHandler, load_checkpoint_file

FEAT_DIM = 8
NUM_PROTOTYPES = 6


def make_step(loss_fn: SwAVLoss, batch_size: int, num_crops: int = 3, seed: int = 0, feat_dim: int = FEAT_DIM):
    """An engine step that feeds the loss random unit embeddings; records whether the queue was used."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(NUM_PROTOTYPES, feat_dim, generator=g), dim=1)

    def step(engine: Engine, batch) -> dict:
        embeddings = [F.normalize(torch.randn(batch_size, feat_dim, generator=g), dim=1) for _ in range(num_crops)]
        scores = [z @ prototypes.t() for z in embeddings]
        loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
        return {"loss": loss.item(), "use_queue": loss_fn.queue_in_use}

    return step


def make_trainer(batch_size=4, queue_length=16, epoch_queue_starts=1, dirname=None, save_event=Events.EPOCH_COMPLETED):
    loss_fn = SwAVLoss()
    handler = SwAVQueueHandler(
        loss_fn,
        queue_length=queue_length,
        epoch_queue_starts=epoch_queue_starts,
        batch_size=batch_size,
        feat_dim=FEAT_DIM,
        dirname=dirname,
        save_event=save_event,
    )
    trainer = Engine(make_step(loss_fn, batch_size))
    handler.attach(trainer)
    return trainer, handler, loss_fn


def test_started_trims_the_queue_length_to_the_global_batch_and_says_so_once(caplog):
    trainer, handler, _ = make_trainer(batch_size=4, queue_length=18)
    with caplog.at_level(logging.WARNING):
        trainer.run([0], max_epochs=1)
        trainer.run([0], max_epochs=1)
    assert handler.queue_length == 16
    messages = [r.getMessage() for r in caplog.records if "queue_length" in r.getMessage()]
    assert (
        len(messages) == 1
        and "queue_length=18 is used as 16" in messages[0]
        and "(batch_size=4 x world_size=1" in messages[0]
    )


def test_queue_is_created_after_epoch_queue_starts_epochs_and_never_recreated():
    trainer, handler, loss_fn = make_trainer(batch_size=4, queue_length=8, epoch_queue_starts=2)
    seen = {}

    @trainer.on(Events.EPOCH_STARTED)
    def record(engine):
        seen[engine.state.epoch] = handler.queue.rows

    trainer.run(range(3), max_epochs=4)
    assert seen[1] is None and seen[2] is None  # two epochs without a queue
    queue = seen[3]
    assert queue is not None and queue.shape == (2, 8, FEAT_DIM) and queue.dtype == torch.float32
    assert seen[4] is queue  # kept, not re-created
    assert loss_fn.queue.rows is queue
    assert queue.abs().sum() > 0  # filled during epochs 3 and 4


def test_epoch_queue_starts_zero_creates_the_queue_before_the_first_epoch():
    trainer, handler, loss_fn = make_trainer(epoch_queue_starts=0)
    out = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: out.append(e.state.queue_in_use))
    trainer.run(range(6), max_epochs=1)
    # queue of 16 rows, batch of 4: full after 4 steps, used from the 5th
    assert out == [False, False, False, False, True, True]


def test_a_full_queue_stays_in_use_from_one_epoch_to_the_next():
    trainer, handler, loss_fn = make_trainer(epoch_queue_starts=0)
    flags = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: flags.append(loss_fn.queue_in_use))
    trainer.run(range(6), max_epochs=3)
    # 16 rows, batches of 4: full after 4 steps of the first epoch, then in use (the reference resets its flag at
    # every epoch and sets it again at the first step, the queue being full: the same steps use the queue)
    assert flags == [False, True, True] and loss_fn.queue_in_use


def test_a_queue_length_smaller_than_the_global_batch_warns_and_uses_no_queue(caplog):
    trainer, handler, loss_fn = make_trainer(batch_size=4, queue_length=3, epoch_queue_starts=0)
    with caplog.at_level(logging.WARNING):
        trainer.run(range(2), max_epochs=2)
    assert "queue_length=3 is used as 0" in caplog.text and "no queue will be used" in caplog.text
    assert handler.queue.rows is None and loss_fn.queue.rows is None


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
        ({"batch_size": -3}, ValueError, "batch_size must be an integer >= 1, got -3"),
        ({"queue_length": -1}, ValueError, "queue_length must be an integer >= 0, got -1"),
        ({"epoch_queue_starts": -1}, ValueError, "epoch_queue_starts must be an integer >= 0"),
        ({"save_event": 2}, TypeError, "save_event must be an Ignite event such as Events.EPOCH_COMPLETED"),
        ({"feat_dim": 0}, ValueError, "feat_dim must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, message):
    args = {"batch_size": 4} | kwargs
    with pytest.raises(error, match=message):
        SwAVQueueHandler(SwAVLoss(), **args)


def test_the_loss_must_be_a_swav_loss():
    with pytest.raises(TypeError, match="loss_fn must be an ignite_swav.SwAVLoss, got CrossEntropyLoss"):
        SwAVQueueHandler(torch.nn.CrossEntropyLoss(), batch_size=4)


def test_attaching_twice_is_refused():
    trainer, handler, _ = make_trainer()
    with pytest.raises(ValueError, match="already attached to this engine"):
        handler.attach(trainer)


def test_state_dict_round_trip_through_a_weights_only_file(tmp_path: Path):
    trainer, handler, _ = make_trainer(epoch_queue_starts=0)
    trainer.run(range(3), max_epochs=1)
    torch.save({"queue_handler": handler.state_dict()}, tmp_path / "c.pt")

    _, restored, loss_fn = make_trainer(epoch_queue_starts=0)
    Checkpoint.load_objects({"queue_handler": restored}, tmp_path / "c.pt")  # weights_only=True inside
    assert torch.equal(restored.queue.rows, handler.queue.rows)
    assert loss_fn.queue is restored.queue


def test_a_resumed_run_keeps_the_restored_queue(tmp_path: Path):
    trainer, handler, _ = make_trainer(epoch_queue_starts=1)
    to_save = {"trainer": trainer, "queue_handler": handler}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False), n_saved=None)
    )
    trainer.run(range(5), max_epochs=3)
    saved_queue = handler.queue.rows.clone()

    resumed, restored, loss_fn = make_trainer(epoch_queue_starts=1)
    used = []
    resumed.add_event_handler(Events.ITERATION_COMPLETED, lambda e: used.append(e.state.queue_in_use))
    seen_at_start = []
    resumed.add_event_handler(Events.EPOCH_STARTED, lambda e: seen_at_start.append(restored.queue.rows.clone()))
    Checkpoint.load_objects({"trainer": resumed, "queue_handler": restored}, tmp_path / "checkpoint_15.pt")
    resumed.run(range(5), max_epochs=4)
    assert torch.equal(seen_at_start[0], saved_queue)  # STARTED and EPOCH_STARTED did not wipe it
    assert used[0]  # full when saved, so used at once


def test_load_refuses_another_feat_dim_or_crop_count():
    trainer, handler, _ = make_trainer(epoch_queue_starts=0)
    trainer.run(range(2), max_epochs=1)
    state = handler.state_dict()
    other = SwAVQueueHandler(SwAVLoss(), batch_size=4, feat_dim=16, queue_length=16)
    with pytest.raises(ValueError, match="embeddings of width 8, but this queue has feat_dim=16"):
        other.load_state_dict(state)
    three = SwAVQueueHandler(SwAVLoss((0, 1, 2)), batch_size=4, feat_dim=FEAT_DIM)
    with pytest.raises(ValueError, match=r"2 crop slot\(s\), but this queue has num_crops=3"):
        three.load_state_dict(state)


@pytest.mark.parametrize(
    "state,message",
    [
        ({}, "Required state attribute 'queue' is absent"),
        ([1, 2], "state_dict should be a dictionary"),
        ({"queue": torch.zeros(2, 4)}, r"a 'queue' of \(2, 4\), expected a float tensor"),
        ({"queue": "x"}, "a 'queue' of str"),
        ({"queue": None, "feat_dim": "8"}, "entry 'feat_dim' must be an integer, got str"),
        ({"queue": torch.full((2, 16, FEAT_DIM), float("nan"))}, "NaN or infinite"),
    ],
)
def test_load_refuses_malformed_states(state, message):
    handler = SwAVQueueHandler(SwAVLoss(), batch_size=4, feat_dim=FEAT_DIM, queue_length=16)
    with pytest.raises((ValueError, TypeError), match=message):
        handler.load_state_dict(state)


def test_load_keeps_the_newest_rows_when_the_length_changes():
    queue = F.normalize(torch.randn(2, 16, FEAT_DIM), dim=2)
    shorter = SwAVQueueHandler(SwAVLoss(), batch_size=4, feat_dim=FEAT_DIM, queue_length=8)
    shorter.load_state_dict({"queue": queue})
    assert torch.equal(shorter.queue.rows, queue[:, :8])
    longer = SwAVQueueHandler(SwAVLoss(), batch_size=4, feat_dim=FEAT_DIM, queue_length=24)
    longer.load_state_dict({"queue": queue})
    assert torch.equal(longer.queue.rows[:, :16], queue)
    assert torch.equal(longer.queue.rows[:, 16:], torch.zeros(2, 8, FEAT_DIM))  # not full: refilled before use


def test_dirname_saves_on_its_event_filter_and_a_resumed_run_loads_the_matching_file(tmp_path: Path):
    trainer, handler, _ = make_trainer(
        epoch_queue_starts=0, dirname=tmp_path, save_event=Events.EPOCH_COMPLETED(every=2)
    )
    trainer.run(range(3), max_epochs=6)
    # every 2 epochs of 3 iterations; the last 2 files are kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swav_queue_12.pt", "swav_queue_18.pt"]
    stored = load_checkpoint_file(tmp_path / "swav_queue_18.pt")
    assert torch.equal(stored["queue"], handler.queue.rows)

    resumed, restored, _ = make_trainer(epoch_queue_starts=0, dirname=tmp_path)
    resumed.state.iteration, resumed.state.epoch = 18, 6  # as Checkpoint.load_objects(trainer) would set
    resumed.run(range(3), max_epochs=7)
    assert restored.queue.rows is not None


def test_dirname_queue_from_another_moment_is_not_loaded(tmp_path: Path, caplog):
    trainer, handler, _ = make_trainer(epoch_queue_starts=0, dirname=tmp_path)
    trainer.run(range(3), max_epochs=2)
    fresh, restored, loss_fn = make_trainer(epoch_queue_starts=5, dirname=tmp_path)
    with caplog.at_level(logging.WARNING):
        fresh.run(range(3), max_epochs=1)
    assert "engine starts at iteration 0" in caplog.text
    assert restored.queue.rows is None


def _write_queue_file(tmp_path: Path, payload: bytes) -> None:
    (tmp_path / "swav_queue_0.pt").write_bytes(payload)


@pytest.mark.parametrize(
    "corrupt,message",
    [
        (lambda b: b[: len(b) // 2], "truncated or corrupted"),
        (lambda b: b[:100] + bytes(200) + b[300:], "is corrupted: the data of .* does not match its checksum"),
        (lambda b: b"", "is empty"),
        (lambda b: b"not a checkpoint at all", "truncated or corrupted"),
    ],
)
def test_a_damaged_queue_file_is_refused(tmp_path: Path, corrupt, message):
    trainer, handler, _ = make_trainer(epoch_queue_starts=0)
    trainer.run(range(2), max_epochs=1)
    torch.save(handler.state_dict(), tmp_path / "good.pt")
    _write_queue_file(tmp_path, corrupt((tmp_path / "good.pt").read_bytes()))
    fresh, restored, _ = make_trainer(dirname=tmp_path)
    with pytest.raises(ValueError, match=message):
        fresh.run(range(2), max_epochs=1)


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_queue_file_that_would_run_code_is_refused_without_running_it(tmp_path: Path):
    marker = tmp_path / "code_ran"
    torch.save({"queue": _RunsCode(str(marker))}, tmp_path / "swav_queue_0.pt")
    fresh, _, _ = make_trainer(dirname=tmp_path)
    with pytest.raises(
        ValueError,
        match="refers to 'posix.mkdir', which is not a tensor or a number: the file was refused without running",
    ):
        fresh.run(range(2), max_epochs=1)
    assert not marker.exists()


def test_missing_checkpoint_file_is_named(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.pt' does not exist"):
        load_checkpoint_file(tmp_path / "nope.pt")


def test_no_warning_for_a_valid_queue_length():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer, _, _ = make_trainer(batch_size=4, queue_length=16)
        trainer.run(range(2), max_epochs=1)


def test_a_handler_without_feat_dim_and_batch_size_takes_them_from_the_first_batch():
    for epoch_queue_starts in (0, 1):
        loss_fn = SwAVLoss()
        handler = SwAVQueueHandler(loss_fn, queue_length=18, epoch_queue_starts=epoch_queue_starts)
        trainer = Engine(make_step(loss_fn, batch_size=4))
        handler.attach(trainer)
        used = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e, u=used: u.append(e.state.queue_in_use))
        trainer.run(range(5), max_epochs=2)
        assert (handler.batch_size, handler.feat_dim, handler.queue_length) == (4, FEAT_DIM, 16)
        assert handler.queue.rows.shape == (2, 16, FEAT_DIM) and loss_fn.queue is handler.queue
        # the queue holds 16 rows: full after 4 pushes of 4, used from the 5th batch that reaches it
        assert used == ([False] * 4 + [True] * 6 if epoch_queue_starts == 0 else [False] * 9 + [True])
        assert handler.state_dict()["feat_dim"] == FEAT_DIM


def test_a_wrong_feat_dim_or_batch_size_is_reported_in_the_first_iteration():
    loss_fn = SwAVLoss()
    handler = SwAVQueueHandler(loss_fn, queue_length=16, epoch_queue_starts=15, feat_dim=128)
    trainer = Engine(make_step(loss_fn, batch_size=4))
    handler.attach(trainer)
    with pytest.raises(ValueError, match=r"the queue has feat_dim=128, but the loss gets embeddings of width 8"):
        trainer.run(range(5), max_epochs=20)
    assert trainer.state.iteration == 1

    loss_fn = SwAVLoss()
    handler = SwAVQueueHandler(loss_fn, queue_length=16, batch_size=64)
    trainer = Engine(make_step(loss_fn, batch_size=4))
    handler.attach(trainer)
    with pytest.raises(ValueError, match=r"the queue has batch_size=64, but the first batch of the run holds 4"):
        trainer.run(range(5), max_epochs=2)
    assert trainer.state.iteration == 1

    # a queue created before the first batch with the wrong width: the loss names the handler's setting
    loss_fn = SwAVLoss()
    SwAVQueueHandler(loss_fn, queue_length=16, epoch_queue_starts=0, batch_size=4, feat_dim=16).attach(
        trainer := Engine(make_step(loss_fn, batch_size=4))
    )
    with pytest.raises(ValueError, match="SwAVQueueHandler's feat_dim must be the width of the embeddings"):
        trainer.run(range(5), max_epochs=2)


def test_the_handler_is_an_ignite_serializable_and_never_aliases_a_loaded_state():
    from ignite.base import Serializable

    trainer, handler, loss_fn = make_trainer(epoch_queue_starts=0)
    assert isinstance(handler, Serializable)
    queue = F.normalize(torch.randn(2, 16, FEAT_DIM), dim=2)
    state = {"queue": queue}
    handler.load_state_dict(state)
    before = queue.clone()
    trainer.run(range(3), max_epochs=1)
    assert torch.equal(state["queue"], before)  # training wrote into the handler's own copy
    assert not torch.equal(handler.queue.rows, before)


def test_a_queue_too_long_to_allocate_is_the_librarys_error_not_the_allocators():
    loss_fn = SwAVLoss()
    handler = SwAVQueueHandler(loss_fn, queue_length=10**12, epoch_queue_starts=0, batch_size=4, feat_dim=16)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    with pytest.raises(ValueError, match=r"queue_length=1000000000000 needs a queue of \(2, 1000000000000, 16\).*GB"):
        engine.run([0], max_epochs=1)


def test_state_dict_after_an_ungathered_iteration_on_several_processes_fails_fast(monkeypatch):
    import ignite.distributed as idist

    loss_fn = SwAVLoss()
    handler = SwAVQueueHandler(loss_fn, queue_length=16, epoch_queue_starts=0, batch_size=4, feat_dim=16)
    handler.queue.rows = torch.zeros(2, 8, 16)
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    with pytest.raises(RuntimeError, match=r"after its rows changed \(a step\) since its last gather.*gather_event="):
        handler.state_dict()
    with pytest.raises(TypeError, match="gather_event must be an Ignite event"):
        SwAVQueueHandler(SwAVLoss(), queue_length=8, gather_event="epoch")
