"""SwAV's queue driven by Ignite's events: start it after some epochs, gather it, save it, restore it."""

from __future__ import annotations

import logging
import re
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.base import Serializable
from ignite.engine import Engine, Events
from ignite.engine.events import CallableEventWithFilter
from ignite.handlers import Checkpoint, DiskSaver
from torch import Tensor

from ignite_swav._deprecation import renamed_method, warn_renamed
from ignite_swav._distributed import check_same_on_every_rank
from ignite_swav._validation import check_int
from ignite_swav.checkpoint import load_checkpoint_file
from ignite_swav.loss import SwAVLoss
from ignite_swav.queue import SwAVQueue

__all__ = ["SwAVQueueHandler"]

_FILE_PREFIX = "swav"
_FILE_PATTERN = re.compile(rf"^{_FILE_PREFIX}_queue_(\d+)\.pt$")


def _is_last_iteration(engine: Engine) -> bool:
    """Whether the iteration that just completed ends its epoch or the run (a stop was decided, or max_iters)."""
    state = engine.state
    if state.epoch_length and state.iteration % state.epoch_length == 0:
        return True
    max_iters = getattr(state, "max_iters", None)  # Ignite 0.5.1 has no max_iters
    return bool(engine.should_terminate) or (max_iters is not None and state.iteration >= max_iters)


class SwAVQueueHandler(Serializable):
    """Drives SwAV's queue (a :class:`~ignite_swav.SwAVQueue` it makes and gives to the loss) from Ignite's events.

    The queue holds, for each crop the loss assigns, the embeddings of the last ``queue_length // world_size``
    samples of this rank; the loss adds them to the Sinkhorn equipartition once the queue is full. The handler
    only decides when: ``attach(engine)`` registers

    - :meth:`started` on ``Events.STARTED``: checks that every rank has the same ``batch_size``; when ``dirname``
      holds a queue file saved at the engine's current iteration (a resumed run), loads it. A queue restored
      before the run (``load_state_dict``) is kept. ``queue_length`` is trimmed to a multiple of the global batch
      ``batch_size * world_size`` (logged once when that changes it).
    - :meth:`epoch_started` on ``Events.EPOCH_STARTED``: starts the queue (:meth:`SwAVQueue.start
      <ignite_swav.SwAVQueue.start>`: zeros, float32, ``(len(loss_fn.crops_for_assign), queue_length //
      world_size, feat_dim)`` on ``idist.device()``) the first time ``engine.state.epoch - 1 >=
      epoch_queue_starts``, i.e. once ``epoch_queue_starts`` epochs are done (Ignite epochs are 1-based;
      ``epoch_queue_starts=0`` starts it before the first epoch). When ``batch_size`` or ``feat_dim`` was not
      given and no batch has been seen yet, the queue's rows are made from the loss's next batch, before anything
      is pushed.
    - :meth:`iteration_completed` on ``Events.ITERATION_COMPLETED``: sets ``engine.state.queue_in_use``
      (for loggers); in the first iteration of a run, learns ``batch_size`` and ``feat_dim`` from the loss's
      batch, or checks the given ones against it; at the last iteration of every epoch and of the run (a stop
      every process agreed on, ``max_iters``), gathers the queues of all ranks into one ``(crops, queue_length,
      feat_dim)`` tensor on the CPU for :meth:`state_dict` (a collective, on every rank).
    - :meth:`gather` also on ``gather_event`` when it is an iteration event (``Events.ITERATION_COMPLETED(every=
      1000)``, for a ``Checkpoint`` in the middle of epochs).
    - :meth:`save_queue_file` on ``save_event`` when ``dirname`` is set: writes the queue of all ranks to one
      file through Ignite's ``Checkpoint`` and an atomic ``DiskSaver`` (rank 0 writes; the last 2 files are
      kept, so one is always complete).

    :meth:`state_dict` returns the queue as last gathered: it runs no collective, so a ``Checkpoint`` holding the
    handler may be attached on every rank or, as is a common Ignite habit, on rank 0 only, on
    ``EPOCH_COMPLETED``, ``COMPLETED`` or ``TERMINATE`` (a run ended by ``terminate()``, ``TimeLimit`` or
    ``max_iters`` keeps its queue), attached before or after this handler. On several processes, a
    ``state_dict()`` after an iteration that followed the last gather (a ``Checkpoint`` in the middle of an epoch
    without ``gather_event``) raises at once, naming the fix. On one process it is the queue as it is.
    :meth:`load_state_dict` reshards it onto the current world size, so a run saved on 2 processes resumes on 1
    or 4; it runs no collective either. Only tensors and numbers are stored, so ``Checkpoint.load_objects``
    (``weights_only=True``) loads it.

    Args:
        loss_fn: the :class:`~ignite_swav.SwAVLoss` to give the queue to (one queue slot per crop in its
            ``crops_for_assign``); a loss given a queue of its own is refused. ``loss=`` is its name before 1.0,
            deprecated.
        queue_length: global queue length (all ranks together); 0 means no queue.
        epoch_queue_starts: number of epochs trained without a queue.
        batch_size: batch size per process; ``None`` takes it from the first batch. When given, a first batch of
            another size is an error.
        feat_dim: width of the embeddings; ``None`` takes it from the first batch. When given, embeddings of
            another width are an error in the first iteration.
        dirname: directory of the queue file; ``None`` to keep the queue only in the user's own ``Checkpoint``.
        save_event: when to write the queue file (an Ignite event, filters allowed:
            ``Events.EPOCH_COMPLETED(every=5)``); only with ``dirname``.
        gather_event: an iteration event at which to gather the queue of all ranks for :meth:`state_dict` too
            (filters allowed), for a ``Checkpoint`` in the middle of epochs; the ends of epochs and of the run are
            always gathered (the default, ``Events.EPOCH_COMPLETED``, adds nothing to them).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from ignite.engine import Engine
        >>> from ignite_swav import SwAVLoss, SwAVQueueHandler
        >>> loss_fn = SwAVLoss()
        >>> prototypes = F.normalize(torch.randn(10, 4), dim=1)
        >>> def step(engine, batch):
        ...     embeddings = [F.normalize(torch.randn(8, 4), dim=1) for _ in range(4)]
        ...     scores = [z @ prototypes.t() for z in embeddings]
        ...     return loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes).item()
        >>> trainer = Engine(step)
        >>> handler = SwAVQueueHandler(loss_fn, queue_length=16, epoch_queue_starts=1)
        >>> handler.attach(trainer)
        >>> state = trainer.run(range(3), max_epochs=3)
        >>> handler.queue.rows.shape, trainer.state.queue_in_use, loss_fn.queue is handler.queue
        (torch.Size([2, 16, 4]), True, True)

        With a ``Checkpoint`` of model, optimizer and queue in one file, attached after the handler so that the
        queue's end-of-epoch work runs first:

        .. code-block:: python

            to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": handler}
            trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver("runs")))
    """

    _state_dict_all_req_keys = ("queue",)

    def __init__(
        self,
        loss_fn: SwAVLoss | None = None,
        queue_length: int = 0,
        epoch_queue_starts: int = 15,
        batch_size: int | None = None,
        feat_dim: int | None = None,
        dirname: str | Path | None = None,
        save_event: CallableEventWithFilter = Events.EPOCH_COMPLETED,
        gather_event: CallableEventWithFilter = Events.EPOCH_COMPLETED,
        *,
        loss: SwAVLoss | None = None,
    ) -> None:
        if loss is not None:
            warn_renamed("SwAVQueueHandler(loss=...)", "SwAVQueueHandler(loss_fn=...)")
            if loss_fn is not None:
                raise TypeError("give loss_fn (loss is its deprecated name), not both")
            loss_fn = loss
        if not isinstance(loss_fn, SwAVLoss):
            raise TypeError(f"loss_fn must be an ignite_swav.SwAVLoss, got {type(loss_fn).__name__}")
        if loss_fn.queue is not None and loss_fn.queue.handler is None:
            raise ValueError(
                "loss_fn already has a SwAVQueue of its own: give its length to SwAVQueueHandler(queue_length=...) "
                "and leave the loss without one (the handler makes the queue it drives)"
            )
        self.loss_fn = loss_fn
        self.epoch_queue_starts = check_int("epoch_queue_starts", epoch_queue_starts, 0)
        self._queue = SwAVQueue(
            check_int("queue_length", queue_length, 0),
            num_crops=len(loss_fn.crops_for_assign),
            batch_size=None if batch_size is None else check_int("batch_size", batch_size, 1),
            feat_dim=None if feat_dim is None else check_int("feat_dim", feat_dim, 1),
        )
        self.dirname = Path(dirname) if dirname is not None else None
        if self.dirname is not None and self.dirname.exists() and not self.dirname.is_dir():
            raise ValueError(
                f"dirname='{self.dirname}' is a file, not a directory: give a directory for the queue file"
            )
        if not isinstance(save_event, CallableEventWithFilter):
            raise TypeError(
                "save_event must be an Ignite event such as Events.EPOCH_COMPLETED or "
                f"Events.EPOCH_COMPLETED(every=5), got {save_event!r}"
            )
        self.save_event = save_event
        if not isinstance(gather_event, CallableEventWithFilter):
            raise TypeError(
                "gather_event must be an Ignite event such as Events.EPOCH_COMPLETED or "
                f"Events.ITERATION_COMPLETED(every=1000), got {gather_event!r}"
            )
        self.gather_event = gather_event
        self._engines: list[weakref.ReferenceType[Engine]] = []
        self._queue._handler = self  # the queue's back reference, which only its maker sets
        loss_fn.queue = self._queue
        self._saver: Checkpoint | None = None
        self._first_iteration_checked = False
        #: ``(queue_length, epoch_queue_starts)`` set by :meth:`reschedule` (kept in :meth:`state_dict`), or None
        self.rescheduled: tuple[int, int] | None = None

    on_started = renamed_method("on_started", "started")
    on_epoch_started = renamed_method("on_epoch_started", "epoch_started")
    on_iteration_completed = renamed_method("on_iteration_completed", "iteration_completed")

    @property
    def loss(self) -> SwAVLoss:
        """Deprecated name of ``loss_fn`` (removed in 1.1)."""
        warn_renamed("SwAVQueueHandler.loss", "SwAVQueueHandler.loss_fn")
        return self.loss_fn

    @property
    def queue(self) -> SwAVQueue:
        """The :class:`~ignite_swav.SwAVQueue` this handler made and drives: the loss's ``queue``."""
        return self._queue

    @property
    def crops_for_assign(self) -> tuple[int, ...]:
        """The loss's assigned crops: one queue slot each."""
        return self.loss_fn.crops_for_assign

    @property
    def requested_queue_length(self) -> int:
        """The global queue length asked for (the queue's ``requested_length``)."""
        return self.queue.requested_length

    @property
    def queue_length(self) -> int:
        """The global queue length in use, trimmed to the global batch (the queue's ``length``)."""
        return self.queue.length

    @property
    def batch_size(self) -> int | None:
        """The batch size per process, given or learned from the first batch."""
        return self.queue.batch_size

    @property
    def feat_dim(self) -> int | None:
        """The width of the embeddings, given or learned from the first batch."""
        return self.queue.feat_dim

    def attach(self, engine: Engine) -> None:
        """Register the handlers on ``engine`` (see the class description).

        Attach it before a ``Checkpoint`` on ``EPOCH_COMPLETED``: handlers of one event run in the order of
        registration.
        """
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an ignite Engine, got {type(engine).__name__}")
        if engine.has_event_handler(self.started, Events.STARTED):
            raise ValueError("this SwAVQueueHandler is already attached to this engine; attach it only once")
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        if self.gather_event.name.startswith("ITERATION"):  # epoch and run ends are gathered at their last iteration
            engine.add_event_handler(self.gather_event, self.gather)
        for event in (Events.EPOCH_COMPLETED, Events.TERMINATE, Events.COMPLETED):
            engine.add_event_handler(event, self._gather_if_stale)  # an epoch whose length was not known
        self._engines.append(weakref.ref(engine))
        if self.dirname is not None:
            engine.add_event_handler(self.save_event, self.save_queue_file)
        engine.state.queue_in_use = False  # type: ignore[attr-defined]  # Ignite's State takes attributes

    def started(self, engine: Engine) -> None:
        """Check that every rank has the same ``batch_size``; load the queue file of a resumed run from
        ``dirname``."""
        if self.batch_size is not None:
            # local queues of different lengths would make the gather of state_dict abort (gloo) or hang
            check_same_on_every_rank(
                "batch_size",
                [self.batch_size],
                "every process needs the same batch_size for the queue to be split evenly",
            )
        self._first_iteration_checked = False
        self.queue.length  # noqa: B018  # trimmed to the global batch here, where the user expects to hear of it
        if self.queue.rows is None and self.dirname is not None:
            self._load_from_dirname(engine)
        engine.state.queue_in_use = self.queue.in_use  # type: ignore[attr-defined]

    def epoch_started(self, engine: Engine) -> None:
        """Start the queue once ``epoch_queue_starts`` epochs are done (its rows are made now when the shapes are
        known, else from the loss's next batch)."""
        queue = self.queue
        if queue.rows is None and queue.length > 0 and engine.state.epoch - 1 >= self.epoch_queue_starts:
            queue.start()

    def is_attached(self, engine: Engine) -> bool:
        """Whether :meth:`attach` registered this handler on ``engine``."""
        return any(ref() is engine for ref in self._engines)

    def iteration_completed(self, engine: Engine) -> None:
        """Publish ``engine.state.queue_in_use``; in a run's first iteration, learn or check the batch shapes; at
        the last iteration of an epoch or of the run, gather the queue of every rank for :meth:`state_dict`."""
        engine.state.queue_in_use = self.queue.in_use  # type: ignore[attr-defined]
        if not self._first_iteration_checked and self.loss_fn.last_batch_shape is not None:
            self._first_iteration_checked = True
            self.queue.check_batch(*self.loss_fn.last_batch_shape)
        if _is_last_iteration(engine):
            # here rather than at EPOCH_COMPLETED or COMPLETED: a Checkpoint there then sees the gathered queue
            # whatever the order in which the two were attached, and a run that stops mid-epoch keeps its queue
            self.gather(engine)

    def _gather_if_stale(self, engine: Engine) -> None:
        if not self.queue.gathered:
            self.gather(engine)

    def reschedule(self, queue_length: int, epoch_queue_starts: int) -> None:
        """Drop the queue; a new one of ``queue_length`` rows (0: none) comes in once ``epoch_queue_starts`` epochs
        are done, and is filled anew. The new settings are kept in :meth:`state_dict`, so that a resumed run keeps
        them rather than the ones the handler was created with (:class:`~ignite_swav.SwAVQueueGuard` calls it).

        Example:
            >>> from ignite_swav import SwAVLoss, SwAVQueueHandler
            >>> handler = SwAVQueueHandler(SwAVLoss(), queue_length=1024, epoch_queue_starts=5)
            >>> handler.reschedule(512, 7)
            >>> handler.requested_queue_length, handler.epoch_queue_starts, handler.state_dict()["rescheduled_length"]
            (512, 7, 512)
        """
        queue_length = check_int("queue_length", queue_length, 0)
        self.epoch_queue_starts = check_int("epoch_queue_starts", epoch_queue_starts, 0)
        self.rescheduled = (queue_length, self.epoch_queue_starts)
        self.queue.reset(queue_length)
        for ref in self._engines:
            engine = ref()
            if engine is not None:
                engine.state.queue_in_use = False  # type: ignore[attr-defined]

    def save_queue_file(self, engine: Engine) -> None:
        """Write the queue of all ranks to ``dirname`` (a collective), keeping the last 2 files."""
        if self.dirname is None:
            return
        self.gather(engine)
        if self._saver is None:
            self._saver = Checkpoint(
                {"queue": self},
                DiskSaver(self.dirname, atomic=True, create_dir=True, require_empty=False),
                filename_prefix=_FILE_PREFIX,
                n_saved=2,
                global_step_transform=lambda e, _: e.state.iteration,
            )
        self._saver(engine)

    def gather(self, engine: Engine | None = None) -> None:
        """Gather the queue of all ranks for :meth:`state_dict` (a collective: every rank calls it, at
        ``gather_event``): :meth:`SwAVQueue.gather <ignite_swav.SwAVQueue.gather>`."""
        self.queue.gather()

    def state_dict(self) -> OrderedDict[str, Any]:
        """The queue of all ranks in one tensor (as gathered at ``gather_event``: no collective), with its settings
        and the settings of a :meth:`reschedule`.

        Raises:
            RuntimeError: on several processes, when an iteration ran since the last gather (a ``Checkpoint`` at
                another event than ``gather_event``): its queue would not be the model's.
        """
        state = self.queue.state_dict()
        if self.rescheduled is not None:
            state["rescheduled_length"], state["rescheduled_start"] = self.rescheduled
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the queue from :meth:`state_dict`, resharded onto the current world size
        (:meth:`SwAVQueue.load_state_dict <ignite_swav.SwAVQueue.load_state_dict>`), and the settings of a
        :meth:`reschedule`.

        Raises:
            ValueError: the state is not a queue state, or its feature width or crop count differ from this
                handler's (the message names both), or it holds non-finite values; nothing is changed then.
        """
        self.validate_state_dict(state_dict)
        if "rescheduled_length" in state_dict:  # a run whose queue was rescheduled resumes with the new settings
            self.rescheduled = (int(state_dict["rescheduled_length"]), int(state_dict["rescheduled_start"]))
            self.queue.reset(self.rescheduled[0])
            self.epoch_queue_starts = self.rescheduled[1]
        self.queue.load_state_dict(state_dict)

    def validate_state_dict(self, state_dict: Mapping[str, Any]) -> Tensor | None:
        """Check ``state_dict`` as :meth:`load_state_dict` would, changing nothing; returns its queue.

        Raises:
            TypeError, ValueError: as :meth:`load_state_dict`.
        """
        queue = self.queue.validate_state_dict(state_dict)
        rescheduled = [state_dict.get(key) for key in ("rescheduled_length", "rescheduled_start")]
        if (rescheduled[0] is None) != (rescheduled[1] is None) or any(v is not None and v < 0 for v in rescheduled):
            raise ValueError(
                f"queue state entries rescheduled_length={rescheduled[0]} and rescheduled_start={rescheduled[1]} "
                "must be given together, as integers >= 0"
            )
        return queue

    def _load_from_dirname(self, engine: Engine) -> None:
        assert self.dirname is not None
        if not self.dirname.is_dir():
            return
        files = {int(m.group(1)): p for p in self.dirname.iterdir() if (m := _FILE_PATTERN.match(p.name))}
        if not files:
            return
        iteration = engine.state.iteration
        if iteration not in files:
            logging.getLogger(__name__).warning(
                "%s holds queue files of iterations %s but the engine starts at iteration %d: a queue from "
                "another moment than the model is not loaded, the queue will be refilled",
                self.dirname,
                sorted(files),
                iteration,
            )
            return
        self.load_state_dict(load_checkpoint_file(files[iteration]))
