"""Crash at any point: a process killed with SIGKILL while training or while writing a checkpoint leaves its
newest checkpoint loadable, and resuming from it restores exactly the state it had when it was saved."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from ignite.handlers import Checkpoint
from tiny_run import ITERATIONS_PER_EPOCH, build, digest, images

from ignite_swav import load_checkpoint_file

pytestmark = pytest.mark.slow

CHILD = Path(__file__).with_name("crash_child.py")


def recorded_digests(output: Path) -> dict[int, str]:
    lines = (output / "digests.txt").read_text().splitlines()
    return {int(iteration): value for iteration, value in (line.split() for line in lines if len(line.split()) == 2)}


def checkpoint_files(output: Path) -> list[Path]:
    return sorted(output.glob("checkpoint_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


def resume_and_check(output: Path) -> int:
    """Load the newest checkpoint into fresh objects, check them against the digest recorded when it was saved,
    then finish the run; returns the iteration it resumed from."""
    files = checkpoint_files(output)
    assert files, "no checkpoint survived"
    for path in files:  # every file that bears a checkpoint name is whole
        load_checkpoint_file(path)
    newest = files[-1]
    iteration = int(newest.stem.split("_")[1])
    trainer, to_save, loss_fn = build()
    Checkpoint.load_objects(to_save, load_checkpoint_file(newest))
    assert digest(to_save) == recorded_digests(output)[iteration], "resumed state differs from the saved one"
    assert trainer.state.iteration == iteration
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    epochs = iteration // ITERATIONS_PER_EPOCH + 1
    trainer.run(images(), max_epochs=epochs)
    assert trainer.state.iteration == epochs * ITERATIONS_PER_EPOCH
    assert losses and all(math.isfinite(v) for v in losses)
    if loss_fn.queue.rows is not None:
        assert bool(torch.isfinite(loss_fn.queue.rows).all())
    return iteration


@pytest.mark.parametrize("kill_after_records", [3, 9, 14])
def test_killed_during_training_the_newest_checkpoint_restores_the_saved_state(tmp_path: Path, kill_after_records):
    process = subprocess.Popen([sys.executable, str(CHILD), str(tmp_path), "100"], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            log = tmp_path / "digests.txt"
            if log.exists() and len(log.read_text().splitlines()) >= kill_after_records:
                break
            time.sleep(0.01)
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        process.send_signal(signal.SIGKILL)  # wherever it is: a step, a digest, a checkpoint write
    finally:
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert resume_and_check(tmp_path) >= kill_after_records - 1


def test_killed_while_writing_a_checkpoint_the_previous_one_is_whole(tmp_path: Path):
    # the 7th save dies with half of its file written; Ignite has already removed the oldest file (5) by then
    result = subprocess.run([sys.executable, str(CHILD), str(tmp_path), "3", "7"], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert [p.name for p in checkpoint_files(tmp_path)] == ["checkpoint_6.pt"]
    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("checkpoint_6.pt", "digests.txt")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith("tmp")  # the half-written temporary file
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_checkpoint_file(leftovers[0])
    assert resume_and_check(tmp_path) == 6
