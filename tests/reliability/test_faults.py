"""Numerical faults stop training with a message that says where they came from and never reach the queue;
disk faults surface as errors and keep the previous checkpoint whole."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from tiny_run import build, images

from ignite_swav import SwAVLoss, SwAVQueueHandler, load_checkpoint_file, sinkhorn

pytestmark = pytest.mark.slow


def _poison_backbone(to_save):
    with torch.no_grad():
        to_save["model"].backbone.conv.weight[0, 0, 0, 0] = float("nan")


def _poison_prototypes(to_save):
    with torch.no_grad():
        to_save["model"].prototypes.weight[3, 0] = float("inf")


@pytest.mark.parametrize(
    "poison,where",
    [
        (_poison_backbone, r"in scores\[0\], scores\[1\].*the model's output diverged"),
        (_poison_prototypes, r"in scores\[0\].*the model's output diverged"),
    ],
)
def test_a_non_finite_model_stops_training_and_the_queue_stays_finite(poison, where):
    torch.manual_seed(0)
    trainer, to_save, loss_fn = build(epoch_queue_starts=0)
    before = {}

    @trainer.on(Events.ITERATION_STARTED(once=9))
    def inject(engine):
        before["queue"] = loss_fn.queue.rows.clone()
        poison(to_save)

    with pytest.raises(ValueError, match=where) as error:
        trainer.run(images(), max_epochs=3)
    assert "the queue was left unchanged" in str(error.value)
    assert trainer.state.iteration == 9
    assert torch.equal(loss_fn.queue.rows, before["queue"]) and bool(torch.isfinite(loss_fn.queue.rows).all())


def test_a_temperature_that_would_overflow_the_loss_is_refused_before_training():
    # scores / 1e-38 overflow float32: refused when the loss is built, not found as a NaN in the first step
    with pytest.raises(ValueError, match="temperature must be a positive finite number >= 1e-30, got 1e-38"):
        SwAVLoss(temperature=1e-38)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 1e3, 1e30])
def test_sinkhorn_gives_finite_codes_whatever_the_finite_score_range(scale):
    torch.manual_seed(0)
    codes = sinkhorn(torch.randn(16, 10) * scale, epsilon=0.05)
    assert bool(torch.isfinite(codes).all())
    assert torch.allclose(codes.sum(dim=1), torch.ones(16), atol=1e-5)


class FailingSave:
    """torch.save that writes a few bytes then fails like a full disk on its ``fail_on``-th call."""

    def __init__(self, fail_on: int) -> None:
        self.calls, self.fail_on, self.real = 0, fail_on, torch.save

    def __call__(self, obj, file, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            file.write(b"PK\x03\x04 partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(obj, file, *args, **kwargs)


def test_a_failing_checkpoint_write_surfaces_and_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    torch.manual_seed(0)
    trainer, to_save, _ = build()
    checkpoint = Checkpoint(to_save, DiskSaver(tmp_path, atomic=True, require_empty=False), n_saved=2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    copies = {}
    trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda e: copies.update({p.name: p.read_bytes() for p in tmp_path.glob("*.pt")})
    )
    monkeypatch.setattr(torch, "save", FailingSave(fail_on=3))

    with pytest.raises(OSError, match="No space left on device"):
        trainer.run(images(), max_epochs=5)

    # Ignite removed the oldest file (epoch 1) before writing epoch 3; epoch 2's file is whole and loads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_10.pt"]
    assert (tmp_path / "checkpoint_10.pt").read_bytes() == copies["checkpoint_10.pt"]
    fresh_trainer, fresh, _ = build()
    Checkpoint.load_objects(fresh, load_checkpoint_file(tmp_path / "checkpoint_10.pt"))
    assert fresh_trainer.state.iteration == 10


def test_a_failing_queue_file_write_surfaces_and_keeps_the_previous_queue_file(tmp_path: Path, monkeypatch):
    loss_fn = SwAVLoss()
    handler = SwAVQueueHandler(
        loss_fn, batch_size=4, epoch_queue_starts=0, feat_dim=8, queue_length=8, dirname=tmp_path
    )
    trainer = Engine(lambda engine, batch: None)
    handler.attach(trainer)

    @trainer.on(Events.ITERATION_COMPLETED)
    def fill(engine):
        handler.queue.rows.normal_()

    monkeypatch.setattr(torch, "save", FailingSave(fail_on=3))
    with pytest.raises(OSError, match="No space left on device"):
        trainer.run(range(2), max_epochs=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["swav_queue_4.pt"]
    state = load_checkpoint_file(tmp_path / "swav_queue_4.pt")
    assert state["queue"].shape == (2, 8, 8) and math.isfinite(float(state["queue"].sum()))
