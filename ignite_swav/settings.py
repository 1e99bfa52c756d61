"""Settings known to fail, named before the first step: a SwAV run's settings checked against each other and
against its data. The evidence for each threshold is in docs/troubleshooting.md ("Settings the library warns
about")."""

from __future__ import annotations

from ignite import distributed as idist

from ignite_swav._validation import check_int
from ignite_swav.loss import SwAVLoss

__all__ = ["check_settings"]

# The published recipes use epsilon 0.03-0.05 and temperature 0.1; beyond these ranges the codes turn hard (a
# tiny epsilon) or uniform (a large one), and the predictions flat or spiky.
EPSILON_RANGE = (0.01, 0.1)
TEMPERATURE_RANGE = (0.05, 0.5)


def check_settings(
    loss_fn: SwAVLoss,
    *,
    batch_size: int,
    num_prototypes: int,
    world_size: int | None = None,
    data_length: int | None = None,
    epochs: int | None = None,
    queue_length: int | None = None,
    epoch_queue_starts: int | None = None,
    freeze_prototypes_iters: int | None = None,
) -> list[str]:
    """The known-bad settings of a SwAV run, one sentence each (the number that is wrong and the fix); an empty
    list when all is well. :func:`~ignite_swav.create_swav_trainer`'s engine logs them when a run starts.

    The queue's settings default to those of the loss's :class:`~ignite_swav.SwAVQueueHandler`.

    Args:
        loss_fn: the run's :class:`~ignite_swav.SwAVLoss` (epsilon, temperature, its queue handler).
        batch_size: images per step on each process.
        num_prototypes: K.
        world_size: the number of processes (default: this run's).
        data_length: images in the data set (all processes together), when known.
        epochs: the run's number of epochs, when known.
        queue_length: the global queue length (default: that of the loss's queue, 0 without one).
        epoch_queue_starts: epochs trained before the queue (default: the queue handler's, 0 without one).
        freeze_prototypes_iters: iterations with frozen prototypes, when known.

    Raises:
        ValueError: a setting that cannot work: a batch of 1 on each process, a queue the run can never fill.

    Example:
        >>> from ignite_swav import SwAVLoss, check_settings
        >>> check_settings(SwAVLoss(epsilon=0.05), batch_size=64, num_prototypes=100)
        []
        >>> print(check_settings(SwAVLoss(), batch_size=8, num_prototypes=300)[0])  # doctest: +ELLIPSIS
        num_prototypes=300: each step's equipartition spreads 8 rows (batch 8 x 1 process(es) + queue 0) over ...
    """
    handler = loss_fn.queue_handler
    batch_size = check_int("batch_size", batch_size, 1)
    num_prototypes = check_int("num_prototypes", num_prototypes, 1)
    world_size = check_int("world_size", world_size if world_size is not None else idist.get_world_size(), 1)
    if queue_length is None:
        queue_length = loss_fn.queue.requested_length if loss_fn.queue is not None else 0
    if epoch_queue_starts is None:
        epoch_queue_starts = handler.epoch_queue_starts if handler is not None else 0
    global_batch = batch_size * world_size
    queue = queue_length - queue_length % global_batch  # as the queue handler trims it
    if batch_size == 1:
        raise ValueError(
            "batch_size=1 on each process: SwAV predicts the code of one crop from the other crops of the same "
            "image against the codes of the batch, and one image per process gives codes of one row; use 16 or more"
        )
    warnings = []
    rows = global_batch + queue
    if 2 * rows < num_prototypes:
        warnings.append(
            f"num_prototypes={num_prototypes}: each step's equipartition spreads {rows} rows (batch {batch_size} x "
            f"{world_size} process(es) + queue {queue}) over {num_prototypes} prototypes, so most get no sample "
            f"(empty clusters, the loss stuck near ln K); use a queue so that batch + queue >= {num_prototypes}, or "
            f"at most {2 * rows} prototypes"
        )
    if data_length is not None and queue > data_length:
        warnings.append(
            f"queue_length={queue_length}: the queue holds more rows than the data set has images ({data_length}), so "
            f"each image is in it about {queue / data_length:.1f} times, from epochs ago; use at most {data_length}"
        )
    if data_length is not None and epochs is not None and queue > 0 and epochs > epoch_queue_starts:
        room = (epochs - epoch_queue_starts) * (data_length // global_batch) * global_batch
        if queue > room:
            raise ValueError(
                f"queue_length={queue_length} can never be filled: the {epochs - epoch_queue_starts} epoch(s) after "
                f"epoch_queue_starts={epoch_queue_starts} push {room} rows; use a shorter queue or start it earlier"
            )
    low, high = EPSILON_RANGE
    if not low <= loss_fn.epsilon <= high:
        effect = "hard codes" if loss_fn.epsilon < low else "codes close to uniform, which look like collapse"
        warnings.append(
            f"epsilon={loss_fn.epsilon:g} is outside the published range {low:g}-{high:g} ({effect}); SwAV uses 0.05, "
            "0.03 for small batches or unstable runs"
        )
    low, high = TEMPERATURE_RANGE
    if not low <= loss_fn.temperature <= high:
        warnings.append(
            f"temperature={loss_fn.temperature:g} is outside {low:g}-{high:g}; SwAV uses 0.1 for every recipe"
        )
    if queue > 0 and epoch_queue_starts == 0 and freeze_prototypes_iters == 0:
        warnings.append(
            f"queue_length={queue_length} from epoch 0 with prototypes that train from the first step: the queue's "
            "embeddings come from a network at random initialisation, scored by moving prototypes (the reference "
            "starts its queue after 15 epochs and freezes the prototypes for the first one); start the queue later "
            "(epoch_queue_starts) or freeze the prototypes (freeze_prototypes_iters)"
        )
    return warnings
