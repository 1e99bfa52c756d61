"""The training step's verdict, decided on the device: a refused step changes nothing (weights, optimizer state,
BatchNorm statistics, queue), non-finite gradients are refused before the optimizer and named, an optimizer that
skips on the device makes a step that never waits, and the error of a refused step is never lost."""

import copy
import math

import pytest
import torch
from helpers import DispatchCounter, random_crops, tiny_swav_model
from ignite.engine import Engine, Events

from ignite_swav import SwAVHealthMonitor, SwAVLoss, SwAVQueueHandler, create_swav_trainer, swav_training_step


def batches(count: int, bad: tuple[int, ...] = (), seed: int = 0) -> list[list[torch.Tensor]]:
    """``count`` batches of 4 images (2 x 16 px + 2 x 8 px crops); those at the indices in ``bad`` hold a NaN."""
    out = []
    for i in range(count):
        crops = random_crops(4, sizes=(16, 16, 8, 8), seed=seed + i)
        if i in bad:
            crops[2][0, 0, 0, 0] = float("nan")
        out.append(crops)
    return out


def optimizer_of(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "fused":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def trainer_of(kind: str = "fused", queue: bool = True, unused_parameter: bool = False, **kwargs):
    model = tiny_swav_model(seed=0)
    if unused_parameter:  # listed before every other, never given a gradient
        model.backbone.register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))
    optimizer = optimizer_of(model, kind)
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, optimizer, loss_fn, **kwargs)
    handler = SwAVQueueHandler(loss_fn, queue_length=8 if queue else 0, epoch_queue_starts=0)
    handler.attach(trainer)
    return trainer, model, optimizer, handler


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer, handler: SwAVQueueHandler) -> dict:
    return copy.deepcopy(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()["state"], "queue": handler.queue.rows}
    )


def assert_same_tensors(before, after, path="") -> None:
    if isinstance(before, torch.Tensor):
        assert torch.equal(before, after), f"{path} changed"
    elif isinstance(before, dict):
        assert before.keys() == after.keys(), path
        for key in before:
            assert_same_tensors(before[key], after[key], f"{path}/{key}")
    else:
        assert before == after, path


@pytest.mark.parametrize("kind", ["fused", "plain", "adam"])
def test_a_refused_step_changes_no_weight_no_optimizer_state_no_batchnorm_statistic_and_no_queue_row(kind):
    trainer, model, optimizer, handler = trainer_of(kind)
    before = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=4), lambda _: before.update(snapshot(model, optimizer, handler))
    )
    # step 5 is bad; step 6 runs its forward pass (BatchNorm statistics move) before the verdict of step 5 is read
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in scores\[0\]"):
        trainer.run(batches(7, bad=(4,)), max_epochs=1)
    assert trainer.state.iteration == (6 if kind != "plain" else 5)  # read one step later, or at once
    assert_same_tensors(before, snapshot(model, optimizer, handler))
    # the statistics really were updated by steps 1-4 (the backbone runs once per crop size: twice a step)
    assert model.backbone.bn.num_batches_tracked.item() == 8


def test_the_last_steps_refusal_is_raised_at_the_end_of_the_epoch():
    trainer, model, optimizer, handler = trainer_of("fused")
    seen = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(e.state.epoch))
    before = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=3), lambda _: before.update(snapshot(model, optimizer, handler))
    )
    with pytest.raises(ValueError, match=r"in scores\[0\]"):
        trainer.run(batches(4, bad=(3,)), max_epochs=2)
    assert seen == []  # raised before any handler of the epoch's end (a checkpoint) saw the model
    assert_same_tensors(before, snapshot(model, optimizer, handler))


def test_a_refused_step_in_a_gradient_accumulation_window_skips_the_whole_window():
    trainer, model, optimizer, handler = trainer_of("fused", gradient_accumulation_steps=2)
    before = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=2), lambda _: before.update(snapshot(model, optimizer, handler))
    )
    with pytest.raises(ValueError, match=r"in scores\[0\]"):
        trainer.run(batches(6, bad=(2,)), max_epochs=1)
    # step 3 (bad) and step 4 (its window's second half) changed nothing; the good micro-batch 4 pushed its rows
    after = snapshot(model, optimizer, handler)
    assert_same_tensors(before["model"], after["model"])
    assert_same_tensors(before["optimizer"], after["optimizer"])


class InfiniteGradientOnce:
    """A gradient hook that makes the gradient of a parameter infinite in one chosen step (the loss stays finite)."""

    def __init__(self, parameter: torch.nn.Parameter) -> None:
        self.armed = False
        parameter.register_hook(self)

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.armed:
            self.armed = False
            return grad * float("inf")
        return grad


@pytest.mark.parametrize("kind", ["fused", "plain"])
def test_non_finite_gradients_are_refused_before_the_optimizer_and_named(kind):
    trainer, model, optimizer, handler = trainer_of(kind, unused_parameter=True)
    hook = InfiniteGradientOnce(model.backbone.conv.weight)
    before = {}

    @trainer.on(Events.ITERATION_COMPLETED(once=3))
    def arm(_):
        before.update(snapshot(model, optimizer, handler))
        hook.armed = True

    with pytest.raises(ValueError, match=r"non-finite gradients \(NaN or inf\) in backbone\.conv\.weight: the step"):
        trainer.run(batches(6), max_epochs=1)
    assert_same_tensors(before, snapshot(model, optimizer, handler))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def synchronisations_per_step(kind: str, output_transform=None, epochs: int = 3) -> list[int]:
    """Host synchronisations of each step of a run whose queue fills in epoch 1, the health monitor attached."""
    kwargs = {} if output_transform is None else {"output_transform": output_transform}
    trainer, model, optimizer, handler = trainer_of(kind, **kwargs)
    SwAVHealthMonitor(handler.loss_fn).attach(trainer)
    counted, counter = [], {}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: counter.update(mode=DispatchCounter().__enter__()))

    @trainer.on(Events.ITERATION_COMPLETED)
    def stop(_):
        counter["mode"].__exit__(None, None, None)
        counted.append(counter["mode"].synchronisations)

    trainer.run(batches(4), max_epochs=epochs)
    assert handler.loss_fn.queue_in_use
    return counted


def test_a_steady_step_with_an_optimizer_that_skips_on_the_device_never_waits_for_it():
    counted = synchronisations_per_step("fused", output_transform=lambda x, y, y_pred, loss: None)
    # step 1 reads the new queue's fill (and on several processes compares their shapes); then never
    assert counted[0] == 1 and counted[1:] == [0] * (len(counted) - 1), counted


def test_with_another_optimizer_a_step_waits_once_and_ignites_default_output_adds_its_loss_item():
    quiet = synchronisations_per_step("plain", output_transform=lambda x, y, y_pred, loss: None)
    assert quiet[1:] == [1] * (len(quiet) - 1), quiet
    assert synchronisations_per_step("fused")[1:] == [1] * 11  # loss.item(), Ignite's default output
    assert synchronisations_per_step("plain")[1:] == [2] * 11


def test_float16_autocast_without_a_grad_scaler_is_refused_with_the_fix():
    model = tiny_swav_model()
    with pytest.raises(ValueError, match="float16 autocast needs a GradScaler.*pass scaler=True"):
        create_swav_trainer(model, optimizer_of(model, "plain"), SwAVLoss(), amp_mode="amp", amp_dtype=torch.float16)
    with pytest.raises(ValueError, match="float16 autocast needs a GradScaler"):
        swav_training_step(model, optimizer_of(model, "plain"), SwAVLoss(), autocast_dtype=torch.float16)


@pytest.mark.parametrize("kind", ["fused", "plain"])
def test_float16_with_a_grad_scaler_trains_and_skips_a_refused_step_through_the_scaler(kind):
    trainer, model, optimizer, handler = trainer_of(kind, amp_mode="amp", amp_dtype=torch.float16, scaler=True)
    scaler = trainer.state.scaler
    assert isinstance(scaler, torch.amp.GradScaler)
    trainer.run(batches(3), max_epochs=1)
    assert math.isfinite(trainer.state.output)
    before = snapshot(model, optimizer, handler)
    with pytest.raises(ValueError, match=r"in scores\[0\]"):
        trainer.run(batches(2, bad=(0,)), max_epochs=2)
    assert_same_tensors(before, snapshot(model, optimizer, handler))


def test_an_engine_of_the_users_own_reads_the_last_verdict_at_the_end_of_the_epoch():
    model = tiny_swav_model()
    engine = Engine(swav_training_step(model, optimizer_of(model, "fused"), SwAVLoss()))
    with pytest.raises(ValueError, match=r"in scores\[0\]"):
        engine.run(batches(3, bad=(2,)), max_epochs=1)


def test_float16_with_grad_scaler_steady_steps_wait_0_times_with_a_fused_optimizer_and_once_otherwise():
    quiet = {"amp_mode": "amp", "amp_dtype": torch.float16, "scaler": True}
    counts = {}
    for kind in ("fused", "plain"):
        trainer, model, optimizer, handler = trainer_of(kind, output_transform=lambda *args: None, **quiet)
        counted, counter = [], {}
        trainer.add_event_handler(
            Events.ITERATION_STARTED, lambda _, counter=counter: counter.update(mode=DispatchCounter().__enter__())
        )

        def stop(_, counter=counter, counted=counted):
            counter["mode"].__exit__(None, None, None)
            counted.append(counter["mode"].synchronisations)

        trainer.add_event_handler(Events.ITERATION_COMPLETED, stop)
        trainer.run(batches(4), max_epochs=2)
        counts[kind] = counted[1:]
    assert counts == {"fused": [0] * 7, "plain": [1] * 7}  # GradScaler reads its found_inf for other optimizers
