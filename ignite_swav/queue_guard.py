"""A queue that heals itself: when the health monitor blames the queue, the run goes back to just before the queue
came in and lets it come in again later and shorter."""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch
from ignite import distributed as idist
from ignite.base import Serializable
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from torch import Tensor

from ignite_swav._distributed import values_by_rank
from ignite_swav._validation import check_int
from ignite_swav.checkpoint import check_entries
from ignite_swav.events import SwAVEvents
from ignite_swav.health import SwAVHealthMonitor
from ignite_swav.queue_handler import SwAVQueueHandler

__all__ = ["QueueRetreat", "SwAVQueueGuard"]

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class QueueRetreat:
    """What :class:`SwAVQueueGuard` did (``trainer.state.queue_retreat`` during the ``QUEUE_RETREATED`` event).

    Example:
        >>> from ignite_swav import QueueRetreat
        >>> print(QueueRetreat(1, 7, 756, 5, 540, 512, 7).message())
        SwAV queue guard: the queue broke the run at epoch 7 (iteration 756); back to the end of epoch 5 \
(iteration 540), the queue comes in again with 512 rows once 7 epochs are done (retreat 1).
    """

    #: 1 for the first retreat of the run
    number: int
    #: the epoch and iteration at whose end the monitor blamed the queue
    at_epoch: int
    at_iteration: int
    #: where the run went back to: the end of this epoch, just before the queue came in
    back_to_epoch: int
    back_to_iteration: int
    #: the queue from now on: its global length (0: no queue for the rest of the run) and its start
    queue_length: int
    epoch_queue_starts: int

    def message(self) -> str:
        """The log line of the retreat."""
        then = (
            "training goes on without a queue (no retreat left)"
            if self.queue_length == 0
            else f"the queue comes in again with {self.queue_length} rows once {self.epoch_queue_starts} epochs "
            "are done"
        )
        return (
            f"SwAV queue guard: the queue broke the run at epoch {self.at_epoch} (iteration {self.at_iteration}); "
            f"back to the end of epoch {self.back_to_epoch} (iteration {self.back_to_iteration}), {then} "
            f"(retreat {self.number})."
        )


class SwAVQueueGuard(Serializable):
    """Takes a run back to just before its queue came in when :class:`~ignite_swav.SwAVHealthMonitor` blames the
    queue, and lets the queue come in again later and shorter.

    A queue that comes in too early or too long can break a SwAV run: the loss climbs back to ln K and the network
    may not recover (``docs/main-job.md``, runs C and D). The guard keeps a copy of the training state at the end
    of the epoch before the queue comes in: the state of every object of ``to_save`` (model, optimizer,
    schedulers, probe: the objects of the ``Checkpoint``), the monitor's history, the engine's epoch and
    iteration, and the random state, on the CPU. When the monitor fires ``COLLAPSE_SUSPECTED`` with the queue as
    the likely cause (``report.queue_is_likely_cause``), at the end of that epoch the guard:

    1. restores that copy (every object is checked, on every rank, before any is loaded) and rewinds the engine,
       whose next epoch starts a new pass over the data as a resumed run does;
    2. reschedules the queue (:meth:`SwAVQueueHandler.reschedule`) by this rule: retreat ``n`` (1, 2, ...) of
       ``max_retreats`` makes the queue come in ``delay_epochs`` epochs later than the epoch it went back to,
       ``shrink`` times as long (rounded down to a multiple of the global batch); retreat ``max_retreats + 1``
       goes back once more and trains on without a queue. A length below one global batch also means no queue;
    3. logs a warning (rank 0), sets ``engine.state.queue_retreat`` to a :class:`QueueRetreat` and fires
       ``SwAVEvents.QUEUE_RETREATED``.

    The copy is dropped once ``queue_window`` epochs (the monitor's) have used the queue without an alarm: the
    monitor no longer blames the queue after them. Until then it is part of :meth:`state_dict` (checkpoints grow by
    one copy of the training state during those epochs), so that a run preempted then can still go back. Every
    rank takes the same decision at the same iteration: the monitor's figures are those of all ranks. Without an
    alarm the guard changes nothing: the run is bit-equal to one without it.

    Attach it after the health monitor and after the handlers whose state it restores, before the ``Checkpoint``
    (handlers of one event run in the order of registration), and give the ``Checkpoint``
    ``global_step_transform=guard.global_step_transform``, so that the first checkpoint after a retreat replaces the
    last one before it (it counts the iterations run, discarded ones too). The queue handler, the monitor, the engine
    and the guard itself may be in ``to_save`` (so that one dict serves both); the guard handles them itself.

    Args:
        queue_handler: the run's :class:`~ignite_swav.SwAVQueueHandler`, with a queue (``queue_length > 0``).
        health_monitor: the run's :class:`~ignite_swav.SwAVHealthMonitor`, looking every epoch, on the same loss.
        to_save: the objects whose state goes back (objects with ``state_dict`` and ``load_state_dict``).
        max_retreats: retreats after which the queue comes in again (>= 0); one more turns it off.
        delay_epochs: epochs by which each retreat delays the queue, counted from the epoch gone back to (>= 1).
        shrink: factor of the queue's length at each retreat (> 0 and <= 1).
        logger: where the warnings go; default ``logging.getLogger("ignite_swav.queue_guard")``.

    Example:
        >>> import torch
        >>> from ignite_swav import SwAVHealthMonitor, SwAVLoss, SwAVModel, SwAVProjectionHead, SwAVPrototypes
        >>> from ignite_swav import SwAVQueueGuard, SwAVQueueHandler, create_swav_trainer
        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
        >>> model = SwAVModel(backbone, SwAVProjectionHead(8, 16, 4), SwAVPrototypes(4, 10))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> loss_fn = SwAVLoss()
        >>> trainer = create_swav_trainer(model, optimizer, loss_fn)
        >>> queue_handler = SwAVQueueHandler(loss_fn, queue_length=8, epoch_queue_starts=1)
        >>> queue_handler.attach(trainer)
        >>> monitor = SwAVHealthMonitor(loss_fn)
        >>> monitor.attach(trainer)
        >>> guard = SwAVQueueGuard(queue_handler, monitor, {"model": model, "optimizer": optimizer})
        >>> guard.attach(trainer)
        >>> crops = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
        >>> trainer.run([crops] * 3, max_epochs=2).epoch, guard.retreats
        (2, [])
    """

    _state_dict_all_req_keys = ("version", "retreats", "snapshot", "discarded_iterations")

    def __init__(
        self,
        queue_handler: SwAVQueueHandler,
        health_monitor: SwAVHealthMonitor,
        to_save: Mapping[str, Any],
        max_retreats: int = 2,
        delay_epochs: int = 2,
        shrink: float = 0.5,
        logger: logging.Logger | None = None,
    ) -> None:
        if not isinstance(queue_handler, SwAVQueueHandler):
            raise TypeError(
                f"queue_handler must be an ignite_swav.SwAVQueueHandler, got {type(queue_handler).__name__}"
            )
        if not isinstance(health_monitor, SwAVHealthMonitor):
            raise TypeError(
                f"health_monitor must be an ignite_swav.SwAVHealthMonitor, got {type(health_monitor).__name__}"
            )
        if health_monitor.loss_fn is not queue_handler.loss_fn:
            raise ValueError(
                "health_monitor watches another SwAVLoss than the one of queue_handler: give the run's own"
            )
        if not health_monitor._per_epoch:
            raise ValueError(
                f"health_monitor looks at event={health_monitor.event}: the guard goes back at the end of an epoch and "
                "needs a monitor that looks every epoch (event=Events.EPOCH_COMPLETED)"
            )
        if queue_handler.requested_queue_length == 0:
            raise ValueError("queue_handler has queue_length=0: there is no queue to guard; leave the guard out")
        if not isinstance(to_save, Mapping):
            raise TypeError(f"to_save must be a mapping of names to objects, got {type(to_save).__name__}")
        for name, obj in to_save.items():
            if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(
                    f"to_save['{name}'] ({type(obj).__name__}) has no state_dict/load_state_dict: the guard could not "
                    "put it back"
                )
        self.queue_handler = queue_handler
        self.health_monitor = health_monitor
        skipped = (queue_handler, health_monitor, self)
        # the engine's counters, the queue and the monitor are handled here; the rest goes back through its state
        kept = {k: v for k, v in to_save.items() if not isinstance(v, Engine)}
        self.to_save = {k: v for k, v in kept.items() if all(v is not s for s in skipped)}
        self.max_retreats = check_int("max_retreats", max_retreats, 0)
        self.delay_epochs = check_int("delay_epochs", delay_epochs, 1)
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 < shrink <= 1:
            raise ValueError(
                f"shrink must be a number > 0 and <= 1 (the queue's length factor per retreat), got {shrink!r}"
            )
        self.shrink = float(shrink)
        if logger is not None and not isinstance(logger, logging.Logger):
            raise TypeError(f"logger must be a logging.Logger, got {type(logger).__name__}")
        self.logger = logger or logging.getLogger("ignite_swav.queue_guard")
        #: the retreats taken so far, oldest first
        self.retreats: list[QueueRetreat] = []
        #: iterations run and then discarded by retreats (see :meth:`global_step_transform`)
        self.discarded_iterations = 0
        self.snapshot: dict[str, Any] | None = None
        self._retreat_due = False
        self._attached = False  # not the engine itself: it holds this guard's methods (a reference cycle)

    def attach(self, engine: Engine) -> None:
        """Register the handlers on ``engine``, the trainer the queue handler and the monitor are attached to."""
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an ignite Engine, got {type(engine).__name__}")
        if self._attached:
            raise ValueError("this SwAVQueueGuard is already attached; attach it once, to the trainer")
        if not self.queue_handler.is_attached(engine):
            raise ValueError("attach the queue handler to this engine before the guard (queue_handler.attach(trainer))")
        if not self.health_monitor._attached_to(engine):
            raise ValueError(
                "attach the health monitor to this engine before the guard (health_monitor.attach(trainer))"
            )
        self._attached = True
        engine.state.queue_retreat = None  # type: ignore[attr-defined]  # Ignite's State takes attributes
        engine.add_event_handler(Events.STARTED, self._keep_if_due)
        engine.add_event_handler(Events.EPOCH_STARTED, self._forget_last_retreat)
        engine.add_event_handler(SwAVEvents.COLLAPSE_SUSPECTED, self._on_alarm)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def global_step_transform(self, engine: Engine, event_name: Any = None) -> int:
        """The iterations run so far, discarded ones included: a ``Checkpoint``'s ``global_step_transform`` that
        keeps growing across a retreat."""
        return engine.state.iteration + self.discarded_iterations

    def _queue_due_next_epoch(self, engine: Engine) -> bool:
        handler = self.queue_handler
        return (
            handler.queue_length > 0 and handler.queue.rows is None and engine.state.epoch >= handler.epoch_queue_starts
        )

    def _keep_if_due(self, engine: Engine) -> None:
        if self.snapshot is None and self._queue_due_next_epoch(engine):
            self.snapshot = self._take_snapshot(engine)

    def _forget_last_retreat(self, engine: Engine) -> None:
        engine.state.queue_retreat = None  # type: ignore[attr-defined]

    def _on_alarm(self, engine: Engine) -> None:
        report = getattr(engine.state, "collapse_report", None)
        if self.snapshot is not None and report is not None and report.queue_is_likely_cause:
            self._retreat_due = True

    def epoch_completed(self, engine: Engine) -> None:
        """``EPOCH_COMPLETED``: go back if the monitor blamed the queue; else keep a copy of the state if the queue
        comes in at the next epoch, or drop it once the queue has been used for the monitor's window."""
        if self._retreat_due:
            self._retreat_due = False
            self.retreat(engine)
            return
        if self.snapshot is None:
            self._keep_if_due(engine)
            return
        since = [r for r in self.health_monitor.history if r["epoch"] > self.snapshot["epoch"]]
        if sum(bool(r.get("queue_used")) for r in since) >= self.health_monitor.queue_window:
            self.snapshot = None  # the monitor no longer blames the queue: nothing to go back for

    def _take_snapshot(self, engine: Engine) -> dict[str, Any]:
        return {
            "epoch": int(engine.state.epoch),
            "iteration": int(engine.state.iteration),
            "objects": {name: _copy_to_cpu(obj.state_dict()) for name, obj in self.to_save.items()},
            "health_monitor": _copy_to_cpu(self.health_monitor.state_dict()),
            "rng": _random_states(),
        }

    def retreat(self, engine: Engine) -> QueueRetreat:
        """Go back to the copy of the state and reschedule the queue (what happens on the alarm; see the class).

        Raises:
            RuntimeError: no copy is held (the queue did not come in, or its window is over).
            ValueError: the copy cannot be loaded on this rank or another one (the message names the ranks); nothing
                was loaded on any rank.
        """
        snapshot = self.snapshot
        if snapshot is None:
            raise RuntimeError("SwAVQueueGuard holds no state from before the queue: there is nothing to go back to")
        self._check_copy_on_every_rank(snapshot)
        Checkpoint.load_objects(self.to_save, dict(snapshot["objects"]))  # checked above, on every rank
        self.health_monitor.load_state_dict(snapshot["health_monitor"])
        _set_random_states(snapshot["rng"])
        at_epoch, at_iteration = int(engine.state.epoch), int(engine.state.iteration)
        # a run resumed on another number of processes has another epoch length: the same epoch, in its iterations
        epoch_length = engine.state.epoch_length
        back_to_iteration = snapshot["epoch"] * epoch_length if epoch_length else snapshot["iteration"]
        self.discarded_iterations += at_iteration - back_to_iteration
        engine.state.epoch, engine.state.iteration = snapshot["epoch"], back_to_iteration
        # the next epoch starts a new pass over the data, seeded as in a run resumed at this point
        engine._dataloader_iter = None
        length, start = self._next_queue(snapshot["epoch"])
        self.queue_handler.reschedule(length, start)
        self.snapshot = None
        retreat = QueueRetreat(
            len(self.retreats) + 1,
            at_epoch,
            at_iteration,
            snapshot["epoch"],
            back_to_iteration,
            self.queue_handler.queue_length if length else 0,
            start,
        )
        self.retreats.append(retreat)
        if idist.get_rank() == 0:
            self.logger.warning(retreat.message())
        engine.state.queue_retreat = retreat  # type: ignore[attr-defined]
        engine.fire_event(SwAVEvents.QUEUE_RETREATED)
        return retreat

    def _check_copy_on_every_rank(self, snapshot: Mapping[str, Any]) -> None:
        """Every object of the copy checked on every rank before any rank loads one: a copy bad on one rank stops
        every rank with the same error, where one rank going back alone would leave the others waiting in its
        collectives."""
        problem = ""
        try:
            check_entries(self.to_save, snapshot["objects"])
            self.health_monitor.validate_state_dict(snapshot["health_monitor"])
        except ValueError as error:
            problem = str(error)
        bad_ranks = [rank for rank, (bad,) in enumerate(values_by_rank([int(bool(problem))])) if bad]
        if bad_ranks:
            raise ValueError(
                f"SwAVQueueGuard cannot go back: its copy of the state is bad on rank {bad_ranks} "
                f"({problem or 'see that rank'}); no rank went back. Resume from the last checkpoint without the guard"
            )

    def _next_queue(self, back_to_epoch: int) -> tuple[int, int]:
        handler = self.queue_handler
        start = back_to_epoch + self.delay_epochs
        if len(self.retreats) >= self.max_retreats:
            return 0, handler.epoch_queue_starts
        length = int(handler.requested_queue_length * self.shrink)
        global_batch = (handler.batch_size or 1) * idist.get_world_size()
        length -= length % global_batch
        return length, start

    def state_dict(self) -> OrderedDict[str, Any]:
        """The retreats taken, the iterations they discarded and the copy of the state (``None`` outside the
        queue's first epochs)."""
        return OrderedDict(
            version=_FORMAT_VERSION,
            retreats=[asdict(r) for r in self.retreats],
            snapshot=self.snapshot,
            discarded_iterations=self.discarded_iterations,
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`: a resumed run keeps its retreats and can still go back."""
        self.retreats, self.snapshot, self.discarded_iterations = self.validate_state_dict(state_dict)
        self._retreat_due = False

    def validate_state_dict(self, state_dict: Mapping[str, Any]) -> tuple[list[QueueRetreat], Any, int]:
        """Check ``state_dict`` as :meth:`load_state_dict` would, changing nothing.

        Raises:
            ValueError: another format, bad retreats or counters, or a copy of the state that does not fit
                ``to_save`` (the message names what).
        """
        Serializable.load_state_dict(self, state_dict)  # Ignite's checks: a mapping with the required keys
        if state_dict["version"] != _FORMAT_VERSION:
            raise ValueError(
                f"the queue guard's state has format version {state_dict['version']!r}; this ignite-swav reads "
                f"version {_FORMAT_VERSION}"
            )
        discarded = state_dict["discarded_iterations"]
        if isinstance(discarded, bool) or not isinstance(discarded, int) or discarded < 0:
            raise ValueError(f"the queue guard's discarded_iterations must be an integer >= 0, got {discarded!r}")
        try:
            retreats = [QueueRetreat(**r) for r in state_dict["retreats"]]
        except TypeError as error:
            raise ValueError(f"the queue guard's retreats are not retreat records ({error})") from None
        for r in retreats:
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in asdict(r).values()):
                raise ValueError(f"the queue guard's retreat records must hold integers >= 0, got {asdict(r)}")
        snapshot = state_dict["snapshot"]
        if snapshot is not None:
            keys = {"epoch", "iteration", "objects", "health_monitor", "rng"}
            if not isinstance(snapshot, Mapping) or set(snapshot) != keys:
                raise ValueError(f"the queue guard's copy of the state must be a mapping with the keys {sorted(keys)}")
            objects = snapshot["objects"]
            if not isinstance(objects, Mapping) or set(objects) != set(self.to_save):
                found = sorted(objects) if isinstance(objects, Mapping) else type(objects).__name__
                raise ValueError(
                    f"the queue guard's copy of the state holds {found}, this guard restores {sorted(self.to_save)}"
                )
            for key in ("epoch", "iteration"):
                if isinstance(snapshot[key], bool) or not isinstance(snapshot[key], int) or snapshot[key] < 0:
                    raise ValueError(f"the queue guard's copy of the state has {key}={snapshot[key]!r}")
            self.health_monitor.validate_state_dict(snapshot["health_monitor"])
            _check_random_states(snapshot["rng"])
        return retreats, snapshot, discarded


def _copy_to_cpu(value: Any) -> Any:
    """``value`` with every tensor copied to the CPU, so that training on never changes it."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        kind = type(value) if isinstance(value, dict) else dict
        return kind((k, _copy_to_cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to_cpu(v) for v in value)
    return value


def _random_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": list(random.getstate()), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:  # torch does not require numpy
        return states
    name, keys, position, has_gauss, cached = cast(tuple[Any, ...], numpy.random.get_state(legacy=True))
    # a tensor rather than numpy's array: a checkpoint holding it loads with torch.load(weights_only=True)
    states["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(position), int(has_gauss), float(cached)]
    return states


def _set_random_states(states: Mapping[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy

        name, keys, position, has_gauss, cached = states["numpy"]
        numpy.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, cached))


def _check_random_states(states: Any) -> None:
    ok = isinstance(states, Mapping) and isinstance(states.get("torch"), Tensor) and "python" in states
    ok = ok and isinstance(states["python"], (list, tuple)) and len(states["python"]) == 3
    if not ok:
        raise ValueError("the queue guard's copy of the random state is not one the guard wrote")
