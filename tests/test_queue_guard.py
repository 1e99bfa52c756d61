"""SwAVQueueGuard: a run goes back to just before its queue came in when the queue is blamed, exactly as a resume
from that point with the rescheduled queue would run; without an alarm it changes nothing."""

import copy
import logging

import ignite.distributed as idist
import pytest
import torch
from helpers import queue_breaking_step, tiny_swav_model
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from spawned import run_group
from torch.utils.data import DataLoader, TensorDataset

from ignite_swav import (
    CollapseReport,
    SwAVEvents,
    SwAVHealthMonitor,
    SwAVLoss,
    SwAVQueueGuard,
    SwAVQueueHandler,
    create_swav_trainer,
    load_objects,
)

NUM_IMAGES, BATCH = 24, 4
CROPS = [torch.randn(NUM_IMAGES, 3, s, s, generator=torch.Generator().manual_seed(s)) for s in (16, 16, 8)]


def crops_of(samples: list[tuple[torch.Tensor]]) -> list[torch.Tensor]:
    indices = torch.stack([index for (index,) in samples])
    return [crops[indices] for crops in CROPS]


def loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(NUM_IMAGES)), batch_size=BATCH, shuffle=True, collate_fn=crops_of)


def build(queue_length=8, epoch_queue_starts=1, guard=True, alarms_at=(), **guard_kwargs):
    """A deterministic trainer with a queue, the monitor and (with ``guard``) the guard; ``alarms_at``: epochs at
    whose end the queue is blamed (a forced alarm, fired between the monitor and the guard)."""
    torch.manual_seed(0)
    model = tiny_swav_model(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, optimizer, loss_fn, deterministic=True, output_transform=lambda *a: 0.0)
    queue_handler = SwAVQueueHandler(loss_fn, queue_length=queue_length, epoch_queue_starts=epoch_queue_starts)
    queue_handler.attach(trainer)
    monitor = SwAVHealthMonitor(loss_fn)
    monitor.attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def blame_the_queue(engine: Engine) -> None:
        if engine.state.epoch in alarms_at and queue_handler.queue.rows is not None and not guard_fired(engine):
            engine.state.collapse_report = CollapseReport(engine.state.epoch, "queue", "forced", True, ())
            engine.fire_event(SwAVEvents.COLLAPSE_SUSPECTED)

    fired = set()

    def guard_fired(engine: Engine) -> bool:  # one forced alarm per epoch number
        seen = engine.state.epoch in fired
        fired.add(engine.state.epoch)
        return seen

    objects = {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": queue_handler}
    objects["health"] = monitor
    queue_guard = None
    if guard:
        queue_guard = SwAVQueueGuard(queue_handler, monitor, objects, **guard_kwargs)
        queue_guard.attach(trainer)
        objects["queue_guard"] = queue_guard
    return trainer, objects, queue_guard


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


def test_without_an_alarm_the_run_is_bit_equal_to_one_without_the_guard():
    trainer, objects, guard = build()
    trainer.run(loader(), max_epochs=5)
    plain, plain_objects, _ = build(guard=False)
    plain.run(loader(), max_epochs=5)
    assert guard.retreats == [] and guard.discarded_iterations == 0
    assert_same_weights(weights(objects["model"]), weights(plain_objects["model"]))
    assert guard.snapshot is None  # dropped once the queue was used for the monitor's window (2 epochs)


def test_a_retreat_goes_back_to_just_before_the_queue_and_runs_as_a_run_with_the_new_queue(caplog):
    trainer, objects, guard = build(alarms_at=(3,))
    before_queue, at_retreat = {}, {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED(once=1), lambda e: before_queue.update(weights(objects["model"]), it=e.state.iteration)
    )
    trainer.add_event_handler(
        SwAVEvents.QUEUE_RETREATED,
        lambda e: at_retreat.update(weights(objects["model"]), it=e.state.iteration, epoch=e.state.epoch),
    )
    with caplog.at_level(logging.WARNING, logger="ignite_swav.queue_guard"):
        trainer.run(loader(), max_epochs=6)
    # back to the end of epoch 1, the queue halved (8 -> 4 rows) and 2 epochs later than that epoch
    (retreat,) = guard.retreats
    assert (retreat.at_epoch, retreat.back_to_epoch, retreat.back_to_iteration) == (3, 1, 6)
    assert (retreat.queue_length, retreat.epoch_queue_starts) == (4, 3)
    assert at_retreat.pop("it") == before_queue.pop("it") == 6 and at_retreat.pop("epoch") == 1
    assert_same_weights(at_retreat, before_queue)
    assert guard.discarded_iterations == 12 and trainer.state.epoch == 6 and trainer.state.iteration == 36
    assert "back to the end of epoch 1" in caplog.records[0].getMessage()
    # what follows is the run that would have had that queue from the start: same data order, same state
    plain, plain_objects, _ = build(queue_length=4, epoch_queue_starts=3, guard=False)
    plain.run(loader(), max_epochs=6)
    assert_same_weights(weights(objects["model"]), weights(plain_objects["model"]))
    assert objects["health"].history == plain_objects["health"].history


def test_after_max_retreats_the_run_goes_back_once_more_and_trains_without_a_queue(caplog):
    trainer, objects, guard = build(queue_length=16, alarms_at=(2, 4, 5), max_retreats=2, delay_epochs=1)
    with caplog.at_level(logging.WARNING, logger="ignite_swav.queue_guard"):
        trainer.run(loader(), max_epochs=8)
    lengths = [(r.at_epoch, r.back_to_epoch, r.queue_length) for r in guard.retreats]
    assert lengths == [(2, 1, 8), (4, 2, 4), (5, 3, 0)]
    assert objects["queue_handler"].queue.rows is None and not objects["health"].history[-1]["queue_used"]
    assert "without a queue" in caplog.records[-1].getMessage()


def test_the_monitor_blaming_the_queue_makes_the_guard_go_back_until_the_queue_is_off():
    # The constructed run of test_health: two views agree until the queue is in use, then they are unrelated, so
    # the loss climbs each time the queue comes in; the real monitor blames it, the guard goes back.
    loss_fn = SwAVLoss()
    trainer = Engine(queue_breaking_step(loss_fn, seed=1))
    queue_handler = SwAVQueueHandler(loss_fn, queue_length=16, epoch_queue_starts=3)
    queue_handler.attach(trainer)
    monitor = SwAVHealthMonitor(loss_fn)
    monitor.attach(trainer)
    guard = SwAVQueueGuard(queue_handler, monitor, {}, max_retreats=1)
    guard.attach(trainer)
    trainer.run(range(6), max_epochs=12)
    assert [(r.at_epoch, r.back_to_epoch, r.queue_length) for r in guard.retreats] == [(4, 3, 8), (6, 5, 0)]
    assert not any(r["queue_used"] for r in monitor.history) and len(monitor.history) == 12


def test_a_checkpoint_after_a_retreat_replaces_the_one_before_and_resumes_with_the_new_queue(tmp_path):
    trainer, objects, guard = build(alarms_at=(3,))
    saver = DiskSaver(tmp_path, require_empty=False)
    checkpoint = Checkpoint(objects, saver, n_saved=1, global_step_transform=guard.global_step_transform)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=4), lambda e: e.terminate())
    trainer.run(loader(), max_epochs=6)
    (path,) = tmp_path.iterdir()
    # the saves: 6, 12, then 18 at the retreat (back to iteration 6, 12 discarded), 24, 30, 36: each replaced the last
    assert path.name == "checkpoint_36.pt"
    resumed, resumed_objects, resumed_guard = build()  # created with the original queue (8 rows from epoch 1)
    load_objects(resumed_objects, path)
    assert resumed.state.iteration == 24 and len(resumed_guard.retreats) == 1
    queue_handler = resumed_objects["queue_handler"]
    assert (queue_handler.requested_queue_length, queue_handler.epoch_queue_starts) == (4, 3)


def test_a_run_resumed_in_the_queue_window_can_still_go_back(tmp_path):
    trainer, objects, _ = build()
    before_queue = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: before_queue.update(weights(objects["model"])))
    trainer.run(loader(), max_epochs=2)  # the queue came in at epoch 2: the guard holds the state of epoch 1
    torch.save({k: v.state_dict() for k, v in objects.items()}, tmp_path / "checkpoint.pt")
    resumed, resumed_objects, guard = build(alarms_at=(3,))
    load_objects(resumed_objects, tmp_path / "checkpoint.pt")
    assert guard.snapshot is not None and guard.snapshot["epoch"] == 1
    at_retreat = {}
    resumed.add_event_handler(
        SwAVEvents.QUEUE_RETREATED, lambda e: at_retreat.update(weights(resumed_objects["model"]))
    )
    resumed.run(loader(), max_epochs=4)
    assert_same_weights(at_retreat, before_queue)


def test_bad_settings_and_attachments_are_refused():
    trainer, objects, _ = build(guard=False)
    queue_handler, monitor = objects["queue_handler"], objects["health"]
    cases = [
        ({"max_retreats": -1}, ValueError, "max_retreats must be an integer >= 0, got -1"),
        ({"delay_epochs": 0}, ValueError, "delay_epochs must be an integer >= 1, got 0"),
        ({"shrink": 0}, ValueError, "shrink must be a number > 0 and <= 1"),
        ({"shrink": 1.5}, ValueError, r"shrink must be a number > 0 and <= 1 .*got 1.5"),
        ({"shrink": "half"}, ValueError, "shrink must be a number"),
        ({"to_save": [1]}, TypeError, "to_save must be a mapping of names to objects, got list"),
        ({"to_save": {"x": object()}}, TypeError, r"to_save\['x'\] \(object\) has no state_dict"),
    ]
    for kwargs, error, message in cases:
        arguments = {"to_save": {}, **kwargs}
        with pytest.raises(error, match=message):
            SwAVQueueGuard(queue_handler, monitor, **arguments)
    with pytest.raises(ValueError, match="queue_length=0: there is no queue to guard"):
        SwAVQueueGuard(SwAVQueueHandler(queue_handler.loss_fn, queue_length=0), monitor, {})
    with pytest.raises(ValueError, match="watches another SwAVLoss"):
        SwAVQueueGuard(SwAVQueueHandler(SwAVLoss(), queue_length=8), monitor, {})
    with pytest.raises(ValueError, match="needs a monitor that looks every epoch"):
        SwAVQueueGuard(queue_handler, SwAVHealthMonitor(queue_handler.loss_fn, event=Events.ITERATION_COMPLETED), {})
    with pytest.raises(TypeError, match="queue_handler must be an ignite_swav.SwAVQueueHandler, got SwAVLoss"):
        SwAVQueueGuard(queue_handler.loss_fn, monitor, {})
    guard = SwAVQueueGuard(queue_handler, monitor, {})
    with pytest.raises(ValueError, match="attach the queue handler to this engine before the guard"):
        guard.attach(Engine(lambda e, b: None))
    other = Engine(lambda e, b: None)
    queue_handler_other = SwAVQueueHandler(queue_handler.loss_fn, queue_length=8)
    queue_handler_other.attach(other)
    with pytest.raises(ValueError, match="attach the health monitor to this engine before the guard"):
        SwAVQueueGuard(queue_handler_other, monitor, {}).attach(other)
    guard.attach(trainer)
    with pytest.raises(ValueError, match="already attached"):
        guard.attach(trainer)
    with pytest.raises(RuntimeError, match="holds no state from before the queue"):
        guard.retreat(trainer)


def test_a_bad_saved_state_is_refused_naming_what_is_wrong():
    trainer, objects, guard = build()
    trainer.run(loader(), max_epochs=2)
    good = guard.state_dict()
    assert good["snapshot"] is not None
    bad_cases = [
        ({"version": 9}, "format version 9"),
        ({"discarded_iterations": -3}, "discarded_iterations must be an integer >= 0, got -3"),
        ({"retreats": [{"number": 1}]}, "retreats are not retreat records"),
        ({"snapshot": {"epoch": 1}}, "must be a mapping with the keys"),
        ({"snapshot": {**good["snapshot"], "objects": {"model": {}}}}, r"holds \['model'\], this guard restores"),
        ({"snapshot": {**good["snapshot"], "rng": {"python": 1}}}, "random state is not one the guard wrote"),
    ]
    for change, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            guard.load_state_dict({**copy.deepcopy(good), **change})
    nan_model = copy.deepcopy(good)
    nan_model["snapshot"]["objects"]["model"]["prototypes.weight"].fill_(float("nan"))
    guard.load_state_dict(nan_model)  # checked in full when it is used: every object before any is loaded
    model_before = weights(objects["model"])
    with pytest.raises(ValueError, match=r"bad on rank \[0\] \(.*NaN or infinite.*no rank went back"):
        guard.retreat(trainer)
    assert_same_weights(weights(objects["model"]), model_before)


def _two_rank_retreat(rank: int) -> None:
    # the constructed run above on two ranks, each with its own views: the monitor's figures are those of both
    # ranks, so both go back at the same iteration
    loss_fn = SwAVLoss()
    trainer = Engine(queue_breaking_step(loss_fn, seed=1 + rank))
    queue_handler = SwAVQueueHandler(loss_fn, queue_length=32, epoch_queue_starts=3)
    queue_handler.attach(trainer)
    monitor = SwAVHealthMonitor(loss_fn)
    monitor.attach(trainer)
    guard = SwAVQueueGuard(queue_handler, monitor, {}, max_retreats=1)
    guard.attach(trainer)
    trainer.run(range(6), max_epochs=12)
    mine = [[r.at_iteration, r.back_to_iteration, r.queue_length] for r in guard.retreats]
    both = idist.all_gather(torch.tensor(mine).flatten().unsqueeze(0))
    assert len(mine) == 2 and torch.equal(both[0], both[1]), both
    assert mine[0][2] == 16 and mine[1][2] == 0  # 32 -> 16 rows (a multiple of 8 x 2), then none


@pytest.mark.distributed
def test_on_two_processes_every_rank_goes_back_at_the_same_iteration():
    run_group(_two_rank_retreat, timeout=120)


def _copy_bad_on_rank_1(rank: int) -> None:
    # rank 1's copy of the state turns bad before the retreat: both ranks stop at the same point with the same
    # error naming rank 1, and neither has gone back (rank 0 alone loading would leave rank 1 in its collectives)
    trainer, objects, guard = build(alarms_at=(3,))

    @trainer.on(Events.EPOCH_STARTED(once=3))
    def spoil_the_copy(engine: Engine) -> None:
        if rank == 1:
            guard.snapshot["objects"]["model"]["prototypes.weight"].fill_(float("nan"))

    at_the_alarm = {}
    last_step = Events.ITERATION_COMPLETED(once=3 * NUM_IMAGES // BATCH)  # before the epoch's end and the alarm
    trainer.add_event_handler(last_step, lambda e: at_the_alarm.update(weights(objects["model"])))
    with pytest.raises(ValueError, match=r"bad on rank \[1\] \(.*NaN or infinite|bad on rank \[1\] \(see that rank"):
        trainer.run(loader(), max_epochs=6)
    assert trainer.state.epoch == 3 and guard.retreats == []
    assert_same_weights(weights(objects["model"]), at_the_alarm)
    ended_at = idist.all_gather(torch.tensor([[trainer.state.iteration]]))
    assert ended_at.flatten().tolist() == [18, 18]


@pytest.mark.distributed
def test_on_two_processes_a_copy_bad_on_one_rank_stops_every_rank_and_none_goes_back():
    output = run_group(_copy_bad_on_rank_1, timeout=120)
    assert output.count("Traceback") == 0, output
