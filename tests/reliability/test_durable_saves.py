"""Ignite's ``Checkpoint`` removes its oldest file before it writes the new one: with its default ``n_saved=1`` a
process killed between the two leaves no checkpoint at all. ``DurableDiskSaver`` removes only once the next file
is on disk. Proven by killing a loop of saves at random moments: 200 kills, never without a loadable checkpoint;
and the same loop with Ignite's ``DiskSaver`` loses them (so that the kills do land in the window)."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from ignite.handlers import Checkpoint, DiskSaver

from ignite_swav import DurableDiskSaver, load_checkpoint_file

pytestmark = [pytest.mark.slow, pytest.mark.soak]


def save_forever(dirname: Path, durable: bool) -> None:
    """A run that checkpoints as fast as it can, as the README's loop does (Ignite's default n_saved=1)."""
    torch.set_num_threads(1)
    saver = DurableDiskSaver(dirname, require_empty=False) if durable else DiskSaver(dirname, require_empty=False)
    model = torch.nn.Linear(512, 512)  # 1 MB: a write takes a few milliseconds
    engine = Engine(lambda engine, batch: None)
    checkpoint = Checkpoint({"model": model}, saver)
    while True:
        engine.state.iteration += 1
        checkpoint(engine)


def loadable(dirname: Path) -> bool:
    for path in dirname.glob("*.pt"):
        try:
            load_checkpoint_file(path)
            return True
        except ValueError:
            continue
    return False


def kills_without_a_checkpoint(tmp_path: Path, kills: int, durable: bool, seed: int = 0) -> int:
    """How many of ``kills`` runs killed (SIGKILL) at a random moment after their first checkpoint left none that
    loads."""
    chance = random.Random(seed)
    lost = 0
    for kill in range(kills):
        dirname = tmp_path / f"run{kill}"
        dirname.mkdir()
        pid = os.fork()
        if pid == 0:  # the child: a run that saves until it is killed
            try:
                save_forever(dirname, durable)
            finally:
                os._exit(1)
        deadline = time.monotonic() + 30
        while not any(dirname.glob("*.pt")):  # the run has written its first checkpoint
            assert time.monotonic() < deadline, "the saving process wrote nothing"
            time.sleep(0.001)
        time.sleep(chance.uniform(0, 0.015))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        lost += not loadable(dirname)
    return lost


def test_200_kills_at_random_moments_always_leave_a_loadable_checkpoint(tmp_path: Path):
    assert kills_without_a_checkpoint(tmp_path, kills=200, durable=True) == 0


def test_the_same_kills_with_ignites_disk_saver_lose_every_checkpoint_some_of_the_time(tmp_path: Path):
    assert kills_without_a_checkpoint(tmp_path, kills=30, durable=False) >= 3
