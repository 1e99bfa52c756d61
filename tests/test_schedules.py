"""create_swav_lr_scheduler: the reference's two arrays (a linear warm-up, then a cosine) one value per iteration,
resumable, and its bad arguments refused."""

import math

import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ParamScheduler

from ignite_swav import create_swav_lr_scheduler, load_objects


def reference_rates(lr, final_lr, epochs, epoch_length, warmup_epochs, start_warmup):
    # facebookresearch/swav's main_swav.py builds the schedule as two arrays: np.linspace over the warm-up's
    # iterations, then final + (base - final) * (1 + cos(pi * t / T)) / 2 over the T iterations left
    warmup, total = round(warmup_epochs * epoch_length), epochs * epoch_length
    rates = [start_warmup + (lr - start_warmup) * i / (warmup - 1) for i in range(warmup)] if warmup > 1 else []
    rates += [start_warmup] * (warmup == 1)
    left = total - warmup
    rates += [final_lr + (lr - final_lr) * (1 + math.cos(math.pi * t / left)) / 2 for t in range(left)]
    return rates[:total]


def optimizer_of(lr=1.0, groups=1):
    params = [{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def rates_of(scheduler, optimizer, epochs, epoch_length):
    trainer = Engine(lambda engine, batch: [g["lr"] for g in optimizer.param_groups])
    trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output))
    trainer.run(range(epoch_length), max_epochs=epochs)
    return seen


@pytest.mark.parametrize(
    "lr,final_lr,epochs,epoch_length,warmup_epochs,start",
    [(4.8, 0.0048, 5, 7, 2, 0.3), (0.6, 0.0006, 4, 5, 0, 0.0), (0.1, 0.0, 3, 10, 0.5, 0.01), (1.0, 0.5, 2, 1, 1, 0.2)]
    + [(1.0, 0.0, 2, 4, 2, 0.1), (1.0, 0.0, 2, 4, 3, 0.1)],  # warm-ups as long as the run, and longer: no cosine
)
def test_every_iteration_gets_the_reference_rate_in_every_group(
    lr, final_lr, epochs, epoch_length, warmup_epochs, start
):
    optimizer = optimizer_of(groups=2)
    scheduler = create_swav_lr_scheduler(
        optimizer, lr, epochs, epoch_length, final_lr=final_lr, warmup_epochs=warmup_epochs, warmup_start_lr=start
    )
    assert isinstance(scheduler, ParamScheduler)
    seen = rates_of(scheduler, optimizer, epochs, epoch_length)
    expected = reference_rates(lr, final_lr, epochs, epoch_length, warmup_epochs, start)
    assert len(seen) == len(expected) == epochs * epoch_length
    for groups, rate in zip(seen, expected):
        assert groups == pytest.approx([rate, rate], rel=1e-12, abs=1e-15)


def test_a_resumed_schedule_goes_on_where_it_stopped_also_on_another_epoch_length():
    def build(epoch_length):
        optimizer = optimizer_of()
        return optimizer, create_swav_lr_scheduler(optimizer, 1.0, 4, epoch_length, final_lr=0.01, warmup_epochs=1)

    optimizer, scheduler = build(6)
    trainer = Engine(lambda engine, batch: None)
    trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
    trainer.run(range(6), max_epochs=2)
    saved = {"trainer": trainer.state_dict(), "lr_scheduler": scheduler.state_dict()}

    def resumed_rates(epoch_length):
        optimizer, resumed = build(epoch_length)
        trainer = Engine(lambda engine, batch: [optimizer.param_groups[0]["lr"]])
        trainer.add_event_handler(Events.ITERATION_STARTED, resumed)
        load_objects({"trainer": trainer, "lr_scheduler": resumed}, saved, epoch_length=epoch_length)
        rates = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: rates.append(e.state.output[0]))
        trainer.run(range(epoch_length), max_epochs=4)
        return rates

    # the same epoch length: the state as saved; half the epoch length (twice the processes): the same point
    for epoch_length in (6, 3):
        expected = reference_rates(1.0, 0.01, 4, epoch_length, 1, 0.0)[2 * epoch_length :]
        assert resumed_rates(epoch_length) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"optimizer": "sgd"}, TypeError, "optimizer must be a torch.optim.Optimizer, got str"),
        ({"lr": -0.1}, ValueError, "lr must be a finite number >= 0, got -0.1"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number >= 0, got nan"),
        ({"final_lr": "0"}, TypeError, "final_lr must be a finite number >= 0, got '0'"),
        ({"warmup_start_lr": float("inf")}, ValueError, "warmup_start_lr must be a finite number >= 0, got inf"),
        ({"num_epochs": 0}, ValueError, "num_epochs must be an integer >= 1, got 0"),
        ({"epoch_length": 2.5}, TypeError, "epoch_length must be an integer >= 1, got 2.5"),
        ({"warmup_epochs": -1}, ValueError, "warmup_epochs must be a finite number >= 0, got -1"),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(kwargs, error, message):
    arguments = {"optimizer": optimizer_of(), "lr": 1.0, "num_epochs": 3, "epoch_length": 10, **kwargs}
    with pytest.raises(error, match=message):
        create_swav_lr_scheduler(**arguments)
