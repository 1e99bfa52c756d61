"""ignite_swav.load_objects: a verified file, and every object loaded or none."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import random_crops, spawn_gloo, tiny_swav_model
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver

from ignite_swav import SwAVLoss, SwAVQueueHandler, create_swav_trainer, load_objects


def trained(tmp_path: Path) -> tuple[dict, Path]:
    model = tiny_swav_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, optimizer, loss_fn)
    handler = SwAVQueueHandler(loss_fn, queue_length=8, epoch_queue_starts=0)
    handler.attach(trainer)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": handler}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False)))
    trainer.run([random_crops(4, sizes=(16, 16, 8, 8), seed=i) for i in range(3)], max_epochs=2)
    return to_save, tmp_path / "checkpoint_6.pt"


def fresh() -> dict:
    model = tiny_swav_model(seed=5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, optimizer, loss_fn)
    handler = SwAVQueueHandler(loss_fn, queue_length=8, epoch_queue_starts=0)
    return {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": handler}


def snapshot(objects: dict) -> dict:
    return {
        "model": {k: v.clone() for k, v in objects["model"].state_dict().items()},
        "optimizer": str(objects["optimizer"].state_dict()),
        "iteration": objects["trainer"].state.iteration,
        "queue": objects["queue_handler"].queue.rows,
    }


def test_a_good_checkpoint_loads_every_object(tmp_path: Path):
    saved, path = trained(tmp_path)
    objects = fresh()
    load_objects(objects, path)
    for a, b in zip(objects["model"].state_dict().values(), saved["model"].state_dict().values()):
        assert torch.equal(a, b)
    assert objects["trainer"].state.iteration == 6
    assert torch.equal(objects["queue_handler"].queue.rows, saved["queue_handler"].queue.rows)


@pytest.mark.parametrize(
    "entry,bad,message",
    [
        ("queue_handler", lambda s: {**s, "queue": torch.full_like(s["queue"], float("nan"))}, "NaN or infinite"),
        ("queue_handler", lambda s: {**s, "queue": s["queue"].int()}, "expected a float tensor"),
        ("model", lambda s: {**s, "prototypes.weight": torch.full_like(s["prototypes.weight"], float("inf"))}, "NaN"),
        ("model", lambda s: {k: v for k, v in s.items() if k != "backbone.conv.bias"}, "holds another model"),
        ("model", lambda s: {**s, "backbone.conv.weight": torch.zeros(3)}, r"is \(3,\), the model has"),
        ("optimizer", lambda s: {**s, "param_groups": []}, "another number of parameter groups"),
        (
            "optimizer",
            lambda s: {**s, "param_groups": [{**s["param_groups"][0], "lr": -0.1}]},
            "the setting 'lr' is -0.1, it must be >= 0",
        ),
        ("queue_handler", lambda s: {**s, "queue": s["queue"].requires_grad_()}, "requires a gradient"),
        ("trainer", lambda s: {**s, "iteration": "six"}, "'iteration' must be an integer >= 0"),
        ("trainer", lambda s: {"nothing": 1}, "Required state attribute"),
    ],
)
def test_a_bad_entry_is_named_and_nothing_is_loaded(tmp_path: Path, entry, bad, message):
    _, path = trained(tmp_path)
    state = torch.load(path, weights_only=True)
    state[entry] = bad(state[entry])
    objects = fresh()
    before = snapshot(objects)
    with pytest.raises(ValueError, match=message) as info:
        load_objects(objects, state)
    assert f"'{entry}'" in str(info.value) or entry == "trainer"
    after = snapshot(objects)
    assert all(torch.equal(a, b) for a, b in zip(before["model"].values(), after["model"].values()))
    assert before["optimizer"] == after["optimizer"] and before["iteration"] == after["iteration"]
    assert after["queue"] is None


def test_a_flipped_byte_that_ignites_own_loader_accepts_is_refused(tmp_path: Path):
    saved, path = trained(tmp_path)
    data = bytearray(path.read_bytes())
    # a byte in the middle of the largest record (tensor data): torch.load does not notice
    middle = len(data) // 2
    data[middle] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_objects(fresh(), path)


def test_a_missing_entry_is_named(tmp_path: Path):
    _, path = trained(tmp_path)
    with pytest.raises(ValueError, match=r"the checkpoint has no entry \['scheduler'\]"):
        load_objects({**fresh(), "scheduler": torch.optim.lr_scheduler.StepLR(fresh()["optimizer"], 1)}, path)


def _cosine_run(epochs: int, epoch_length: int):
    """A trainer whose learning rate follows one cosine over the whole run, and its optimizer and scheduler."""
    from ignite.engine import Engine, Events
    from ignite.handlers import CosineAnnealingScheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    trainer = Engine(lambda engine, batch: optimizer.param_groups[0]["lr"])
    scheduler = CosineAnnealingScheduler(optimizer, "lr", 1.0, 0.0, cycle_size=epochs * epoch_length)
    trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
    return trainer, optimizer, scheduler


def _resumed_on_two_processes_worker(rank: int, path: str) -> None:
    import ignite.distributed as idist
    from ignite.engine import Events

    loader = idist.auto_dataloader(list(range(16)), batch_size=8, drop_last=True)  # 4 a rank: 2 batches an epoch
    trainer, optimizer, scheduler = _cosine_run(epochs=4, epoch_length=len(loader))
    load_objects({"trainer": trainer, "optimizer": optimizer, "lr": scheduler}, path, epoch_length=len(loader))
    assert trainer.state.epoch_length == 2 and trainer.state.iteration == 2 * 2
    rates = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: rates.append(optimizer.param_groups[0]["lr"]))
    trainer.run(loader, max_epochs=4)
    # the second half of the same cosine: iteration 8 of 16 on one process is iteration 4 of 8 on two
    expected = [0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(4, 8)]
    assert rates == pytest.approx(expected, rel=1e-9)


@pytest.mark.distributed
def test_a_run_saved_on_one_process_resumes_on_two_at_the_same_point_of_its_schedule(tmp_path):

    # 2 of 4 epochs on one process, 4 iterations an epoch
    trainer, optimizer, scheduler = _cosine_run(epochs=4, epoch_length=4)
    trainer.run(range(4), max_epochs=2)
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {"trainer": trainer.state_dict(), "optimizer": optimizer.state_dict(), "lr": scheduler.state_dict()}, path
    )
    spawn_gloo(_resumed_on_two_processes_worker, str(path))


def test_another_epoch_length_from_the_middle_of_an_epoch_or_with_a_used_scheduler_is_refused(tmp_path):
    trainer, optimizer, scheduler = _cosine_run(epochs=4, epoch_length=3)
    trainer.run(range(3), max_epochs=1)
    state = {"trainer": {**trainer.state_dict(), "iteration": 2}, "lr": scheduler.state_dict()}  # mid-epoch
    fresh, _, fresh_scheduler = _cosine_run(epochs=4, epoch_length=2)
    with pytest.raises(ValueError, match="from iteration 2, in the middle of an epoch of 3 iterations"):
        load_objects({"trainer": fresh, "lr": fresh_scheduler}, state, epoch_length=2)
    state["trainer"]["iteration"] = 3
    with pytest.raises(ValueError, match="'lr' has already run 3 steps"):
        load_objects({"trainer": fresh, "lr": scheduler}, state, epoch_length=2)
