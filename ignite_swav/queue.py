"""Life cycle of SwAV's per-rank embedding queue as Ignite event handlers: create, trim, save, load, reshard."""

from __future__ import annotations

import logging
import re
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from ignite import distributed as idist
from ignite.base import Serializable
from ignite.engine import Engine, Events
from ignite.engine.events import CallableEventWithFilter
from ignite.handlers import Checkpoint, DiskSaver
from torch import Tensor

from ignite_swav._deprecation import renamed_method, warn_renamed
from ignite_swav._distributed import all_gather, check_same_on_every_rank
from ignite_swav._validation import check_int
from ignite_swav.checkpoint import load_checkpoint_file
from ignite_swav.loss import SwAVLoss

__all__ = ["SwAVQueueHandler"]

_FORMAT_VERSION = 1
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
    """Manages the queue of :class:`~ignite_swav.SwAVLoss` on every rank, as Ignite event handlers.

    The queue holds, for each crop the loss assigns, the embeddings of the last ``queue_length // world_size``
    samples of this rank; the loss adds them to the Sinkhorn equipartition once the queue is full.
    ``attach(engine)`` registers:

    - :meth:`started` on ``Events.STARTED``: trims ``queue_length`` to a multiple of the global batch
      ``batch_size * world_size`` (logged once when that changes it); when ``dirname`` holds a queue file saved
      at the engine's current iteration (a resumed run), loads it. A queue restored before the run
      (``load_state_dict``) is kept.
    - :meth:`epoch_started` on ``Events.EPOCH_STARTED``: resets ``loss_fn.use_queue``; creates the queue (zeros,
      float32, ``(len(loss_fn.crops_for_assign), queue_length // world_size, feat_dim)`` on ``idist.device()``)
      the first time ``engine.state.epoch - 1 >= epoch_queue_starts``, i.e. once ``epoch_queue_starts`` epochs
      are done (Ignite epochs are 1-based; ``epoch_queue_starts=0`` creates it before the first epoch). When
      ``batch_size`` or ``feat_dim`` was not given and no batch has been seen yet, the loss creates the queue
      at its next call, from that batch, before anything is pushed.
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
        loss_fn: the :class:`~ignite_swav.SwAVLoss` whose ``queue`` and ``use_queue`` this handler manages (one
            queue slot per crop in its ``crops_for_assign``). ``loss=`` is its name before 1.0, deprecated.
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
        >>> handler.queue.shape, trainer.state.queue_in_use
        (torch.Size([2, 16, 4]), True)

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
        self.loss_fn = loss_fn
        self.requested_queue_length = check_int("queue_length", queue_length, 0)
        self.epoch_queue_starts = check_int("epoch_queue_starts", epoch_queue_starts, 0)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self.feat_dim = None if feat_dim is None else check_int("feat_dim", feat_dim, 1)
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
        # the queue of all ranks, gathered at gather_event (or restored), valid until the next iteration
        self._gathered: Tensor | None = None
        self._engines: list[weakref.ReferenceType[Engine]] = []
        loss_fn.queue_handler = self  # so that a trainer whose loss has a handler can tell when it is not attached
        # The trimmed global length; set for the current world size on STARTED (or on load_state_dict).
        self.queue_length = self.requested_queue_length
        self.queue: Tensor | None = None
        self._saver: Checkpoint | None = None
        self._reported_lengths: set[tuple[int, int]] = set()
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
    def crops_for_assign(self) -> tuple[int, ...]:
        """The loss's assigned crops: one queue slot each."""
        return self.loss_fn.crops_for_assign

    def _global_queue_length(self) -> int:
        world_size = idist.get_world_size()
        if self.batch_size is None:  # until the first batch: only equal shares per rank
            return self.requested_queue_length - self.requested_queue_length % world_size
        global_batch = self.batch_size * world_size
        length = self.requested_queue_length - self.requested_queue_length % global_batch
        reported = (self.requested_queue_length, length)
        if length != self.requested_queue_length and reported not in self._reported_lengths:
            self._reported_lengths.add(reported)
            advice = "no queue will be used; " if length == 0 else ""
            logging.getLogger(__name__).warning(
                "queue_length=%d is used as %d: a multiple of the global batch (batch_size=%d x world_size=%d = %d); "
                "%spass a multiple of it to use the length you asked for",
                self.requested_queue_length,
                length,
                self.batch_size,
                world_size,
                global_batch,
                advice,
            )
        return length

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
        """Trim ``queue_length`` to the global batch; load the queue file of a resumed run from ``dirname``."""
        if self.batch_size is not None:
            # local queues of different lengths would make the gather of state_dict abort (gloo) or hang
            check_same_on_every_rank(
                "batch_size",
                [self.batch_size],
                "every process needs the same batch_size for the queue to be split evenly",
            )
        self.queue_length = self._global_queue_length()
        self._first_iteration_checked = False
        if self.queue is None and self.dirname is not None:
            self._load_from_dirname(engine)
        self.loss_fn.queue = self.queue
        engine.state.queue_in_use = False  # type: ignore[attr-defined]

    def epoch_started(self, engine: Engine) -> None:
        """Reset ``loss.use_queue``; create the queue once ``epoch_queue_starts`` epochs are done."""
        self.loss_fn.use_queue = False
        due = self.queue is None and self.queue_length > 0 and engine.state.epoch - 1 >= self.epoch_queue_starts
        if due and self.batch_size is not None and self.feat_dim is not None:
            self._create_queue()
        elif due:
            # Shapes not known yet: the loss calls back with its first batch, before pushing it.
            self.loss_fn.queue_factory = self._create_queue_from_batch
        self.loss_fn.queue = self.queue

    def is_attached(self, engine: Engine) -> bool:
        """Whether :meth:`attach` registered this handler on ``engine``."""
        return any(ref() is engine for ref in self._engines)

    def iteration_completed(self, engine: Engine) -> None:
        """Publish ``engine.state.queue_in_use``; in a run's first iteration, learn or check the batch shapes; at
        the last iteration of an epoch or of the run, gather the queue of every rank for :meth:`state_dict`."""
        self._gathered = None  # the queue may have changed
        engine.state.queue_in_use = bool(self.loss_fn.use_queue)  # type: ignore[attr-defined]
        if not self._first_iteration_checked and self.loss_fn.last_batch_shape is not None:
            self._first_iteration_checked = True
            self._learn_or_check_shapes(*self.loss_fn.last_batch_shape)
        if _is_last_iteration(engine):
            # here rather than at EPOCH_COMPLETED or COMPLETED: a Checkpoint there then sees the gathered queue
            # whatever the order in which the two were attached, and a run that stops mid-epoch keeps its queue
            self.gather(engine)

    def _gather_if_stale(self, engine: Engine) -> None:
        if self._gathered is None:
            self.gather(engine)

    def _learn_or_check_shapes(self, batch_size: int, feat_dim: int) -> None:
        if self.feat_dim is None:
            self.feat_dim = feat_dim
        elif feat_dim != self.feat_dim:
            raise ValueError(
                f"SwAVQueueHandler(feat_dim={self.feat_dim}), but the loss gets embeddings of width {feat_dim}: "
                f"pass feat_dim={feat_dim}, or leave it out to take it from the batch"
            )
        if self.batch_size is None:
            # the loss compared the batch sizes of all processes at its first call, before this one
            self.batch_size = batch_size
            self.queue_length = self._global_queue_length() if self.queue is None else self.queue_length
        elif batch_size != self.batch_size:
            raise ValueError(
                f"SwAVQueueHandler(batch_size={self.batch_size}), but the first batch of the run holds {batch_size} "
                f"samples on this process: pass batch_size={batch_size}, or leave it out to take it from the batch"
            )

    def _create_queue(self, device: torch.device | None = None) -> None:
        assert self.feat_dim is not None
        local_length = self.queue_length // idist.get_world_size()
        if local_length == 0:
            return
        shape = (len(self.crops_for_assign), local_length, self.feat_dim)
        device = device or idist.device()
        try:
            self.queue = torch.zeros(shape, dtype=torch.float32, device=device)
        except (RuntimeError, MemoryError) as error:  # torch's allocator: "can't allocate memory", CUDA out of memory
            gigabytes = local_length * len(self.crops_for_assign) * self.feat_dim * 4 / 1e9
            raise ValueError(
                f"queue_length={self.requested_queue_length} needs a queue of {shape} float32 values per process "
                f"({gigabytes:.3g} GB), which {device} cannot allocate: use a shorter queue (SwAV's ImageNet recipe "
                f"uses 3840 rows) ({str(error).splitlines()[0][:120]})"
            ) from None
        self.loss_fn.queue = self.queue

    def _create_queue_from_batch(self, batch_size: int, feat_dim: int, device: torch.device) -> Tensor | None:
        self._learn_or_check_shapes(batch_size, feat_dim)
        self._first_iteration_checked = True
        if self.queue is None:
            self._create_queue(device)
        return self.queue

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
        self.requested_queue_length = check_int("queue_length", queue_length, 0)
        self.epoch_queue_starts = check_int("epoch_queue_starts", epoch_queue_starts, 0)
        self.rescheduled = (self.requested_queue_length, self.epoch_queue_starts)
        self.queue_length = self._global_queue_length()
        self.queue = self._gathered = None
        self.loss_fn.queue = None
        self.loss_fn.queue_factory = None
        self.loss_fn.use_queue = False
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
        ``gather_event``). Rows are ordered by age, newest first, across ranks: row ``j`` of rank ``r`` becomes
        global row ``j * world_size + r``."""
        world_size = idist.get_world_size()
        if self.queue is None or world_size == 1:
            return
        local = self.queue.detach().contiguous()
        gathered = all_gather(local)
        crops, length, dim = local.shape
        # (world, crops, length, dim) -> (crops, length, world, dim): interleave the ranks row by row.
        self._gathered = gathered.view(world_size, crops, length, dim).permute(1, 2, 0, 3).reshape(crops, -1, dim).cpu()

    def state_dict(self) -> OrderedDict[str, Any]:
        """The queue of all ranks in one tensor (as gathered at ``gather_event``: no collective), with its settings.

        Raises:
            RuntimeError: on several processes, when an iteration ran since the last gather (a ``Checkpoint`` at
                another event than ``gather_event``): its queue would not be the model's.
        """
        queue = None
        if self.queue is not None:
            if idist.get_world_size() == 1:
                queue = self.queue.detach().cpu().clone()
            elif self._gathered is not None:
                queue = self._gathered
            else:
                raise RuntimeError(
                    "SwAVQueueHandler.state_dict() was called after an iteration that followed its last gather of "
                    "the queue of every process (at the last iteration of every epoch and of the run, and at "
                    f"gather_event={self.gather_event}): to checkpoint in the middle of an epoch, pass "
                    "SwAVQueueHandler(..., gather_event=<the event of your Checkpoint>) and attach the handler "
                    "before that Checkpoint"
                )
        state = OrderedDict(
            version=_FORMAT_VERSION,
            queue=queue,
            queue_length=self.queue_length,
            feat_dim=self.feat_dim or (queue.shape[2] if queue is not None else 0),
            num_crops=len(self.crops_for_assign),
        )
        if self.rescheduled is not None:
            state["rescheduled_length"], state["rescheduled_start"] = self.rescheduled
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the queue from :meth:`state_dict`, resharded onto the current world size.

        Every stored row lands on exactly one rank. When the current global length (``queue_length`` trimmed
        to this world size and batch) differs from the stored one, the newest rows are kept and missing rows
        are zeros, so the queue counts as full again only once they are written.

        Raises:
            ValueError: the state is not a queue state, or its feature width or crop count differ from this
                handler's (the message names both), or it holds non-finite values.
        """
        queue = self.validate_state_dict(state_dict)
        if queue is not None and self.feat_dim is None:
            self.feat_dim = queue.shape[2]
        if "rescheduled_length" in state_dict:  # a run whose queue was rescheduled resumes with the new settings
            self.rescheduled = (int(state_dict["rescheduled_length"]), int(state_dict["rescheduled_start"]))
            self.requested_queue_length, self.epoch_queue_starts = self.rescheduled
        self.queue_length = self._global_queue_length()
        self._gathered = None
        if queue is None:
            self.queue = None
        else:
            world_size, rank = idist.get_world_size(), idist.get_rank()
            if queue.shape[1] != self.queue_length:
                logging.getLogger(__name__).warning(
                    "the restored queue has %d rows, this run uses %d: keeping the newest rows",
                    queue.shape[1],
                    self.queue_length,
                )
                resized = queue.new_zeros(queue.shape[0], self.queue_length, queue.shape[2])
                kept = min(self.queue_length, queue.shape[1])
                resized[:, :kept] = queue[:, :kept]
                queue = resized
            # Global row g goes to rank g % world_size, local row g // world_size: ages stay interleaved. A copy,
            # so that training never writes into the caller's state.
            self.queue = queue[:, rank::world_size].to(device=idist.device(), dtype=torch.float32, copy=True)
            self._gathered = queue.to(dtype=torch.float32, copy=True)  # what state_dict gives until training moves on
            if self.queue.shape[1] == 0:
                self.queue = self._gathered = None
        self.loss_fn.queue = self.queue
        self.loss_fn.use_queue = False

    def validate_state_dict(self, state_dict: Mapping[str, Any]) -> Tensor | None:
        """Check ``state_dict`` as :meth:`load_state_dict` would, changing nothing; returns its queue.

        Raises:
            TypeError, ValueError: as :meth:`load_state_dict`.
        """
        Serializable.load_state_dict(self, state_dict)  # Ignite's checks: a mapping with the required keys
        for key, value in state_dict.items():
            if key != "queue" and (isinstance(value, bool) or not isinstance(value, Integral)):
                raise ValueError(f"queue state entry '{key}' must be an integer, got {type(value).__name__}")
        rescheduled = [state_dict.get(key) for key in ("rescheduled_length", "rescheduled_start")]
        if (rescheduled[0] is None) != (rescheduled[1] is None) or any(v is not None and v < 0 for v in rescheduled):
            raise ValueError(
                f"queue state entries rescheduled_length={rescheduled[0]} and rescheduled_start={rescheduled[1]} "
                "must be given together, as integers >= 0"
            )
        version = state_dict.get("version", _FORMAT_VERSION)
        if version != _FORMAT_VERSION:
            raise ValueError(
                f"the queue state has format version {version}; this ignite-swav reads version {_FORMAT_VERSION} "
                "(written by another release?)"
            )
        queue = state_dict["queue"]
        if queue is None:
            return None
        if not isinstance(queue, Tensor) or queue.ndim != 3 or not queue.is_floating_point():
            shape = tuple(queue.shape) if isinstance(queue, Tensor) else type(queue).__name__
            raise ValueError(f"queue state holds a 'queue' of {shape}, expected a float tensor (crops, length, dim)")
        if queue.requires_grad:
            raise ValueError("the saved queue requires a gradient: a queue holds detached embeddings; it was refused")
        if queue.device.type == "meta":
            raise ValueError("the saved queue is on the 'meta' device, which holds no values: it was refused")
        # Before any value is touched: a tensor whose shape claims more values than its storage holds (a stride-0
        # expansion: a file of 2.6 MB that would become 11.8 GB once copied) is not a queue torch.save wrote.
        stored = queue.untyped_storage().nbytes() // queue.element_size()
        if queue.numel() > stored:
            raise ValueError(
                f"the saved queue claims {tuple(queue.shape)} values but its storage holds {stored}: a repeated "
                "(expanded) tensor is not a saved queue; it was refused"
            )
        crops, _, dim = queue.shape
        if self.feat_dim is not None and dim != self.feat_dim:
            raise ValueError(
                f"the saved queue holds embeddings of width {dim}, but this handler has feat_dim={self.feat_dim}: "
                "the checkpoint comes from another model"
            )
        if crops != len(self.crops_for_assign):
            raise ValueError(
                f"the saved queue has {crops} crop slot(s), but this handler assigns {len(self.crops_for_assign)} "
                f"crops (crops_for_assign={self.crops_for_assign})"
            )
        if not bool(torch.isfinite(queue).all()):
            raise ValueError("the saved queue holds NaN or infinite values: it was refused")
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
