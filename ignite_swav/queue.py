"""Life cycle of SwAV's per-rank embedding queue as Ignite event handlers: create, trim, save, load, reshard."""

from __future__ import annotations

import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from ignite import distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import Tensor

from ignite_swav._validation import check_crops_for_assign, check_int
from ignite_swav.loss import SwAVLoss

__all__ = ["SwAVQueueHandler", "load_checkpoint_file"]

_FORMAT_VERSION = 1
_FILE_PREFIX = "swav"
_FILE_PATTERN = re.compile(rf"^{_FILE_PREFIX}_queue_(\d+)\.pt$")


def _check_archive(path: Path) -> None:
    # torch.load does not verify the CRC-32 that torch.save writes for every record of its zip archive, so a
    # flipped byte in tensor data would load silently as a wrong weight; zipfile checks them all.
    if not zipfile.is_zipfile(path):
        return  # not torch's zip format: torch.load reports what it is
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(f"checkpoint file '{path}' cannot be read, it is truncated or corrupted ({error})") from None
    if damaged is not None:
        raise ValueError(f"checkpoint file '{path}' is corrupted: the data of '{damaged}' does not match its checksum")


def load_checkpoint_file(path: str | Path) -> Any:
    """Load a checkpoint file with ``torch.load(weights_only=True)``; never runs code stored in the file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is empty, truncated or corrupted (the checksum of every record is verified),
            or holds objects other than tensors, numbers, strings and containers of them (a pickle that would
            run code is refused, not executed).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file '{path}' does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint file '{path}' is empty (0 bytes): it was not written completely")
    _check_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = str(error)
        # torch's weights-only unpickler names the callable it refused to import: "GLOBAL module.name".
        refused = re.search(r"GLOBAL (\S+)", message)
        if isinstance(error, pickle.UnpicklingError) and refused and re.fullmatch(r"[\w.]+", refused.group(1)):
            raise ValueError(
                f"checkpoint file '{path}' refers to '{refused.group(1)}', which is not a tensor or a number: the "
                "file was refused without running any of its code (only files of tensors and numbers, as ignite's "
                "Checkpoint writes them, are accepted)"
            ) from None
        detail = message.splitlines()[0][:200] if message else "no detail"
        raise ValueError(
            f"checkpoint file '{path}' cannot be read, it is truncated or corrupted ({type(error).__name__}: {detail})"
        ) from None


class SwAVQueueHandler:
    """Manages the queue of :class:`~ignite_swav.SwAVLoss` on every rank, as Ignite event handlers.

    The queue holds, for each crop in ``crops_for_assign``, the embeddings of the last
    ``queue_length // world_size`` samples of this rank; the loss adds them to the Sinkhorn equipartition once
    the queue is full. ``attach(engine)`` registers:

    - :meth:`on_started` on ``Events.STARTED``: trims ``queue_length`` to a multiple of the global batch
      ``batch_size * world_size``; when ``dirname`` holds a queue file saved at the engine's current iteration
      (a resumed run), loads it. A queue restored before the run (``load_state_dict``) is kept.
    - :meth:`on_epoch_started` on ``Events.EPOCH_STARTED``: resets ``loss.use_queue``; creates the queue (zeros,
      float32, ``(len(crops_for_assign), queue_length // world_size, feat_dim)`` on ``idist.device()``) the
      first time ``engine.state.epoch - 1 >= epoch_queue_starts``, i.e. once ``epoch_queue_starts`` epochs
      are done (Ignite epochs are 1-based; ``epoch_queue_starts=0`` creates it before the first epoch).
    - :meth:`on_epoch_completed` on ``Events.EPOCH_COMPLETED``: every ``interval`` epochs, when ``dirname`` is
      set, writes the queue of all ranks to one file through Ignite's ``Checkpoint`` and an atomic
      ``DiskSaver`` (rank 0 writes; the last 2 files are kept, so one is always complete).

    :meth:`state_dict` gathers the queues of all ranks into one ``(crops, queue_length, feat_dim)`` tensor:
    it is a collective, so a ``Checkpoint`` holding the handler must run on every rank (as Ignite's own
    ``Checkpoint`` requires in distributed runs). :meth:`load_state_dict` reshards it onto the current world
    size, so a run saved on 2 processes resumes on 1 or 4. Only tensors and numbers are stored, so
    ``Checkpoint.load_objects`` (``weights_only=True``) loads it.

    Args:
        loss: the :class:`~ignite_swav.SwAVLoss` whose ``queue`` and ``use_queue`` this handler manages.
        batch_size: batch size per process.
        epoch_queue_starts: number of epochs trained without a queue.
        crops_for_assign: the assigned crops; must equal ``loss.crops_for_assign``.
        feat_dim: width of the embeddings.
        queue_length: global queue length (all ranks together); 0 means no queue.
        interval: save the queue file every ``interval`` epochs (only with ``dirname``).
        dirname: directory of the queue file; ``None`` to keep the queue only in the user's own ``Checkpoint``.

    Example:
        .. code-block:: python

            from ignite.engine import Engine, Events
            from ignite.handlers import Checkpoint, DiskSaver
            from ignite_swav import SwAVLoss, SwAVQueueHandler

            loss_fn = SwAVLoss(crops_for_assign=(0, 1))
            queue_handler = SwAVQueueHandler(loss_fn, batch_size=64, epoch_queue_starts=15, queue_length=3840)
            trainer = Engine(train_step)  # train_step calls loss_fn(scores=..., embeddings=..., prototypes=...)
            queue_handler.attach(trainer)
            # model, optimizer and queue in one file, from the same moment; attached after the handler, so the
            # queue's end-of-epoch work runs first
            to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": queue_handler}
            checkpoint = Checkpoint(to_save, DiskSaver("runs", require_empty=False))
            trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    """

    def __init__(
        self,
        loss: SwAVLoss,
        batch_size: int,
        epoch_queue_starts: int = 15,
        crops_for_assign: Sequence[int] = (0, 1),
        feat_dim: int = 128,
        queue_length: int = 0,
        interval: int = 1,
        dirname: str | Path | None = None,
    ) -> None:
        if not isinstance(loss, SwAVLoss):
            raise TypeError(f"loss must be an ignite_swav.SwAVLoss, got {type(loss).__name__}")
        self.loss = loss
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.epoch_queue_starts = check_int("epoch_queue_starts", epoch_queue_starts, 0)
        self.crops_for_assign = check_crops_for_assign(crops_for_assign)
        if self.crops_for_assign != loss.crops_for_assign:
            raise ValueError(
                f"crops_for_assign={self.crops_for_assign} differs from the loss's crops_for_assign="
                f"{loss.crops_for_assign}: the queue has one slot per crop the loss assigns, pass the same crops"
            )
        self.feat_dim = check_int("feat_dim", feat_dim, 1)
        self.requested_queue_length = check_int("queue_length", queue_length, 0)
        self.interval = check_int("interval", interval, 1)
        self.dirname = Path(dirname) if dirname is not None else None
        # The trimmed global length; set for the current world size on STARTED (or on load_state_dict).
        self.queue_length = self.requested_queue_length
        self.queue: Tensor | None = None
        self._saver: Checkpoint | None = None
        self._short_queue_warned = False

    def _global_queue_length(self) -> int:
        global_batch = self.batch_size * idist.get_world_size()
        length = self.requested_queue_length - self.requested_queue_length % global_batch
        if 0 < self.requested_queue_length < global_batch and not self._short_queue_warned:
            self._short_queue_warned = True
            warnings.warn(
                f"queue_length={self.requested_queue_length} is smaller than the global batch "
                f"(batch_size={self.batch_size} x world_size={idist.get_world_size()} = {global_batch}): "
                "no queue will be used; pass a queue_length that is a multiple of the global batch",
                stacklevel=3,
            )
        return length

    def attach(self, engine: Engine) -> None:
        """Register :meth:`on_started`, :meth:`on_epoch_started` and :meth:`on_epoch_completed` on ``engine``.

        Attach it before a ``Checkpoint`` on ``EPOCH_COMPLETED``: handlers of one event run in the order of
        registration.
        """
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an ignite Engine, got {type(engine).__name__}")
        if engine.has_event_handler(self.on_started, Events.STARTED):
            raise ValueError("this SwAVQueueHandler is already attached to this engine; attach it only once")
        engine.add_event_handler(Events.STARTED, self.on_started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.on_epoch_started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.on_epoch_completed)

    def on_started(self, engine: Engine) -> None:
        """Trim ``queue_length`` to the global batch; load the queue file of a resumed run from ``dirname``."""
        self.queue_length = self._global_queue_length()
        if self.queue is None and self.dirname is not None:
            self._load_from_dirname(engine)
        self.loss.queue = self.queue

    def on_epoch_started(self, engine: Engine) -> None:
        """Reset ``loss.use_queue``; create the queue once ``epoch_queue_starts`` epochs are done."""
        self.loss.use_queue = False
        if self.queue is None and self.queue_length > 0 and engine.state.epoch - 1 >= self.epoch_queue_starts:
            local_length = self.queue_length // idist.get_world_size()
            self.queue = torch.zeros(
                len(self.crops_for_assign), local_length, self.feat_dim, dtype=torch.float32, device=idist.device()
            )
        self.loss.queue = self.queue

    def on_epoch_completed(self, engine: Engine) -> None:
        """Every ``interval`` epochs, write the queue of all ranks to ``dirname`` (a collective)."""
        if self.dirname is None or engine.state.epoch % self.interval != 0:
            return
        if self._saver is None:
            self._saver = Checkpoint(
                {"queue": self},
                DiskSaver(self.dirname, atomic=True, create_dir=True, require_empty=False),
                filename_prefix=_FILE_PREFIX,
                n_saved=2,
                global_step_transform=lambda e, _: e.state.iteration,
            )
        self._saver(engine)

    def state_dict(self) -> dict[str, Any]:
        """The queue of all ranks in one tensor (collective: call it on every rank), with its settings.

        Rows are ordered by age, newest first, across ranks: row ``j`` of rank ``r`` becomes global row
        ``j * world_size + r``.
        """
        queue = None
        if self.queue is not None:
            world_size = idist.get_world_size()
            local = self.queue.detach().contiguous()
            gathered = idist.all_gather(local) if world_size > 1 else local
            crops, length, dim = local.shape
            # (world, crops, length, dim) -> (crops, length, world, dim): interleave the ranks row by row.
            queue = gathered.view(world_size, crops, length, dim).permute(1, 2, 0, 3).reshape(crops, -1, dim).cpu()
        return {
            "version": _FORMAT_VERSION,
            "queue": queue,
            "queue_length": self.queue_length,
            "feat_dim": self.feat_dim,
            "num_crops": len(self.crops_for_assign),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the queue from :meth:`state_dict`, resharded onto the current world size.

        Every stored row lands on exactly one rank. When the current global length (``queue_length`` trimmed
        to this world size and batch) differs from the stored one, the newest rows are kept and missing rows
        are zeros, so the queue counts as full again only once they are written.

        Raises:
            ValueError: the state is not a queue state, or its feature width or crop count differ from this
                handler's (the message names both), or it holds non-finite values.
        """
        queue = self._validated_queue(state_dict)
        self.queue_length = self._global_queue_length()
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
            # Global row g goes to rank g % world_size, local row g // world_size: ages stay interleaved.
            self.queue = queue[:, rank::world_size].to(device=idist.device(), dtype=torch.float32).contiguous()
            if self.queue.shape[1] == 0:
                self.queue = None
        self.loss.queue = self.queue
        self.loss.use_queue = False

    def _validated_queue(self, state_dict: Mapping[str, Any]) -> Tensor | None:
        if not isinstance(state_dict, Mapping) or "queue" not in state_dict:
            found = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"not a SwAVQueueHandler state: expected a mapping with a 'queue' entry, got {found}")
        for key, value in state_dict.items():
            if key != "queue" and (isinstance(value, bool) or not isinstance(value, Integral)):
                raise ValueError(f"queue state entry '{key}' must be an integer, got {type(value).__name__}")
        queue = state_dict["queue"]
        if queue is None:
            return None
        if not isinstance(queue, Tensor) or queue.ndim != 3 or not queue.is_floating_point():
            shape = tuple(queue.shape) if isinstance(queue, Tensor) else type(queue).__name__
            raise ValueError(f"queue state holds a 'queue' of {shape}, expected a float tensor (crops, length, dim)")
        crops, _, dim = queue.shape
        if dim != self.feat_dim:
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
