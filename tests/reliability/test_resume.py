"""Resume: exactly, at an epoch boundary; mid-epoch, with the queue as saved; and on another number of
processes, end to end through the example's functions."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_EXAMPLE_ARGS
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver
from tiny_run import ITERATIONS_PER_EPOCH, build, images

from ignite_swav import load_checkpoint_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import train_swav  # noqa: E402

pytestmark = pytest.mark.slow


def record(trainer, log: list) -> None:
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: log.append((e.state.iteration, e.state.output["loss"]))
    )


def test_an_interrupted_run_resumed_from_its_checkpoint_is_the_uninterrupted_run_step_for_step(tmp_path: Path):
    # Uninterrupted: 4 epochs; the queue is created after epoch 1 and is full from epoch 2 on.
    torch.manual_seed(0)
    trainer, to_save, loss_fn = build()
    uninterrupted: list = []
    record(trainer, uninterrupted)
    trainer.run(images(), max_epochs=4)
    final_queue = loss_fn.queue.rows.clone()

    # Interrupted after epoch 2 (the process ends), resumed in fresh objects from the checkpoint file.
    torch.manual_seed(0)
    trainer, to_save, _ = build()
    first_part: list = []
    record(trainer, first_part)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False)))
    trainer.run(images(), max_epochs=2)
    torch.manual_seed(1234)  # whatever the new process's generator holds: the checkpoint's RNG state wins
    trainer, to_save, loss_fn = build(seed=99)
    Checkpoint.load_objects(to_save, load_checkpoint_file(tmp_path / f"checkpoint_{2 * ITERATIONS_PER_EPOCH}.pt"))
    second_part: list = []
    record(trainer, second_part)
    trainer.run(images(), max_epochs=4)

    assert first_part + second_part == uninterrupted  # the same loss values, bit for bit, at every step
    assert torch.equal(loss_fn.queue.rows, final_queue)


def test_resumed_mid_epoch_the_queue_is_as_saved_and_the_trainer_at_the_saved_iteration(tmp_path: Path):
    torch.manual_seed(0)
    trainer, to_save, loss_fn = build()
    saved_queues = {}

    @trainer.on(Events.ITERATION_COMPLETED(every=3))
    def keep(engine):
        saved_queues[engine.state.iteration] = loss_fn.queue.rows.clone() if loss_fn.queue.rows is not None else None

    checkpoint = Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False), n_saved=None)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(every=3), checkpoint)
    trainer.run(images(), max_epochs=3)

    for iteration in (9, 12):  # mid-epoch: epochs have 5 iterations
        trainer, to_save, loss_fn = build()
        Checkpoint.load_objects(to_save, load_checkpoint_file(tmp_path / f"checkpoint_{iteration}.pt"))
        assert trainer.state.iteration == iteration
        assert torch.equal(loss_fn.queue.rows, saved_queues[iteration])
        first = []

        @trainer.on(Events.ITERATION_STARTED(once=iteration + 1))
        def look(engine, first=first, loss_fn=loss_fn):
            first.append((engine.state.iteration, loss_fn.queue.rows.clone()))

        uses: list = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e, u=uses: u.append(e.state.output["use_queue"]))
        trainer.run(images(), max_epochs=4)
        assert first[0][0] == iteration + 1 and torch.equal(first[0][1], saved_queues[iteration])
        assert uses[0]  # the queue was full when saved: used from the first step after the resume
        assert trainer.state.iteration == 4 * ITERATIONS_PER_EPOCH


TINY = [*TINY_EXAMPLE_ARGS, "--max-iters-per-epoch", "2", "--queue-length", "32", "--epoch-queue-starts", "0"]
TINY += ["--freeze-prototypes-iters", "1"]


def run_example(output: Path, *extra: str) -> tuple[int, str]:
    captured = io.StringIO()
    handler = train_swav.logging.StreamHandler(captured)
    train_swav.logging.getLogger().addHandler(handler)
    try:
        status = train_swav.main([*TINY, "--output-dir", str(output), *extra])
    finally:
        train_swav.logging.getLogger().removeHandler(handler)
    return status, captured.getvalue()


def newest(output: Path) -> Path:
    return max(output.glob("swav_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def first_queue_use(printed: str) -> int:
    return int(re.search(r"the queue is full and used from iteration (\d+)", printed).group(1))


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_saved_on_one_process_resumed_on_two_and_back_with_the_queue_used_at_once(tmp_path: Path, capfd):
    output = tmp_path / "run"
    # 1 process: 16 per step, queue of 32 global rows full after 2 steps (epoch 1)
    assert run_example(output, "--epochs", "2")[0] == 0
    on_one = newest(output)
    saved_queue = load_checkpoint_file(on_one)["queue_handler"]["queue"]
    assert bool(saved_queue[:, -1].ne(0).any(dim=1).all())  # full

    capfd.readouterr()
    status, _ = run_example(output, "--epochs", "3", "--resume-from", str(on_one), "--nproc-per-node", "2")
    assert status == 0
    printed = capfd.readouterr().out
    assert first_queue_use(printed) == 5  # the first step after iteration 4: the resharded queue is full
    on_two = newest(output)
    saved_on_two = load_checkpoint_file(on_two)
    assert saved_on_two["trainer"]["iteration"] == 6
    assert saved_on_two["queue_handler"]["queue"].shape == (2, 32, 16)  # both ranks' 16 rows, gathered
    assert train_swav.json.loads((output / "results.json").read_text())["world_size"] == 2

    status, _ = run_example(output, "--epochs", "4", "--resume-from", str(on_two))
    assert status == 0
    assert first_queue_use(capfd.readouterr().out) == 7
    final = train_swav.json.loads((output / "results.json").read_text())
    assert final["epochs"] == 4 and final["world_size"] == 1
    assert [record["epoch"] for record in final["history"]] == [1, 2, 3, 4]
