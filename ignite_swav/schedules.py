"""SwAV's learning-rate schedule as one Ignite parameter scheduler: a linear warm-up, then a cosine to a final rate,
set every iteration."""

from __future__ import annotations

from ignite.handlers import ConcatScheduler, CosineAnnealingScheduler, ParamScheduler, PiecewiseLinear
from torch.optim import Optimizer

from ignite_swav._validation import check_int, check_nonnegative_float

__all__ = ["create_swav_lr_scheduler"]


def create_swav_lr_scheduler(
    optimizer: Optimizer,
    lr: float,
    num_epochs: int,
    epoch_length: int,
    final_lr: float = 0.0,
    warmup_epochs: float = 0.0,
    warmup_start_lr: float = 0.0,
    param_name: str = "lr",
) -> ParamScheduler:
    """The SwAV recipes' learning rate (facebookresearch/swav's ``main_swav.py``) as an Ignite scheduler, to
    attach to ``Events.ITERATION_STARTED``: ``warmup_epochs`` of a linear warm-up from ``warmup_start_lr`` to
    ``lr``, then a cosine from ``lr`` to ``final_lr`` over the remaining iterations, one value per iteration.

    It is Ignite's ``PiecewiseLinear`` and ``CosineAnnealingScheduler`` in a ``ConcatScheduler`` (only the cosine
    without a warm-up): one object with a ``state_dict`` for the ``Checkpoint``, which
    :func:`~ignite_swav.load_objects` steps to the same point of the run when a run resumes with another epoch
    length. Iteration ``i`` (0-based) of a warm-up of ``W`` iterations gets ``warmup_start_lr + (lr -
    warmup_start_lr) * i / (W - 1)``, then iteration ``W + t`` of the ``T`` left gets ``final_lr + (lr - final_lr)
    * (1 + cos(pi * t / T)) / 2``, as the reference's two arrays do.

    Args:
        optimizer: the optimizer whose ``param_name`` is set in every parameter group.
        lr: the rate at the end of the warm-up (the reference's ``base_lr``: 4.8 at batch 4096, 0.6 at 256).
        num_epochs: the run's epochs (``max_epochs``).
        epoch_length: iterations per epoch (``len(loader)``, or the trainer's ``epoch_length``).
        final_lr: the rate of the last iteration's cosine end (the reference's ``final_lr``; 0.0048 at 4096).
        warmup_epochs: epochs of warm-up, fractions allowed (``round(warmup_epochs * epoch_length)`` iterations;
            0: no warm-up). As in the reference, a warm-up as long as the run or longer leaves no cosine (a short
            trial run of a long recipe).
        warmup_start_lr: the rate of the first iteration (the reference's ``start_warmup``: 0.3 at 4096).
        param_name: the parameter-group entry set (``"lr"``).

    Returns:
        An Ignite ``ParamScheduler``.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range (the message names it).

    Example:
        >>> import torch
        >>> from ignite.engine import Engine, Events
        >>> from ignite_swav import create_swav_lr_scheduler
        >>> optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        >>> scheduler = create_swav_lr_scheduler(optimizer, lr=1.0, num_epochs=3, epoch_length=2, final_lr=0.0,
        ...                                      warmup_epochs=1, warmup_start_lr=0.5)
        >>> trainer = Engine(lambda engine, batch: optimizer.param_groups[0]["lr"])
        >>> _ = trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
        >>> rates = []
        >>> _ = trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: rates.append(e.state.output))
        >>> _ = trainer.run([0, 0], max_epochs=3)
        >>> [round(r, 4) for r in rates]
        [0.5, 1.0, 1.0, 0.8536, 0.5, 0.1464]
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    lr, final_lr, warmup_start_lr = (
        check_nonnegative_float(name, value)
        for name, value in (("lr", lr), ("final_lr", final_lr), ("warmup_start_lr", warmup_start_lr))
    )
    num_epochs = check_int("num_epochs", num_epochs, 1)
    epoch_length = check_int("epoch_length", epoch_length, 1)
    warmup_iters = round(check_nonnegative_float("warmup_epochs", warmup_epochs) * epoch_length)
    total = num_epochs * epoch_length
    # Ignite's cosine needs a cycle of 2 events at least; a cycle longer than the run would never reach its end
    cosine = CosineAnnealingScheduler(optimizer, param_name, lr, final_lr, cycle_size=max(2, total - warmup_iters))
    if warmup_iters == 0:
        return cosine
    # one warm-up iteration is the start value alone; the milestones must still differ
    linear = PiecewiseLinear(optimizer, param_name, [(0, warmup_start_lr), (max(warmup_iters - 1, 1), lr)])
    if warmup_iters >= total:  # the reference's arrays: a warm-up as long as the run (or longer) and no cosine
        return linear
    return ConcatScheduler([linear, cosine], durations=[warmup_iters])
