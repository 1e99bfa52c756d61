"""SwAV's queue of embeddings from earlier batches, on one process: its rows, push, fill, scores, gather and state."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from numbers import Integral
from typing import Any

import torch
from ignite import distributed as idist
from ignite.base import Serializable
from torch import Tensor

from ignite_swav._distributed import all_gather, all_reduce
from ignite_swav._validation import check_int

__all__ = ["SwAVQueue"]

_FORMAT_VERSION = 1


class SwAVQueue(Serializable):
    """The embeddings of the last ``length // world_size`` samples of this process, for each crop the loss assigns,
    newest first: what :class:`~ignite_swav.SwAVLoss` adds to its Sinkhorn once the queue is full.

    The loss uses it (``SwAVLoss(queue=...)``); :class:`~ignite_swav.SwAVQueueHandler` makes one and drives it
    from Ignite's events (start it after ``epoch_queue_starts`` epochs, gather it at the ends of epochs, save and
    restore it). Used alone, as here, it is filled from the first call of the loss after :meth:`start`.

    - Rows: :attr:`rows`, ``(num_crops, length // world_size, feat_dim)`` float32, zeros until written.
      :meth:`start` makes them at once when ``batch_size`` and ``feat_dim`` are known (on ``idist.device()``), else
      the loss makes them from its next batch, on its device, before anything is pushed (:meth:`prepare`).
      ``length`` is trimmed to a multiple of the global batch ``batch_size * world_size`` (logged once when that
      changes it).
    - Push: a step's assigned embeddings go on top, the oldest rows drop off the end, so a batch is never in its own
      queue; chosen on the device by the step's verdict (:meth:`push`), so a refused step leaves the rows as they were
      and nothing waits for the device.
    - Fill: rows are unit vectors, so a zero row was never written. How many rows are missing is read from the
      device once per new set of rows (on every process: the queue is used once every process's is full, at the same
      step everywhere) and counted on the host afterwards; :attr:`in_use` says whether the loss scores it.
    - Scores: :meth:`scores` of the rows under the current prototypes, laid out as the loss's Sinkhorn problems.
    - State: :meth:`gather` (a collective) interleaves every process's rows by age into one tensor; :meth:`state_dict`
      returns it without a collective, and :meth:`load_state_dict` reshards it onto the current world size.

    Args:
        length: global length (all processes together); 0 means no queue.
        num_crops: the loss's assigned crops (``len(loss_fn.crops_for_assign)``): one slot of rows each.
        batch_size: batch size per process; ``None`` takes it from the first batch. When given, a first batch of
            another size is an error.
        feat_dim: width of the embeddings; ``None`` takes it from the first batch. When given, embeddings of
            another width are an error.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from ignite_swav import SwAVLoss, SwAVQueue
        >>> queue = SwAVQueue(length=16)
        >>> loss_fn = SwAVLoss(queue=queue)
        >>> prototypes = F.normalize(torch.randn(10, 4), dim=1)
        >>> queue.start()
        >>> for _ in range(3):
        ...     embeddings = [F.normalize(torch.randn(8, 4), dim=1) for _ in range(4)]
        ...     loss = loss_fn(embeddings, [z @ prototypes.t() for z in embeddings], prototypes)
        >>> queue.rows.shape, queue.in_use  # full after two batches of 8, scored from the third call on
        (torch.Size([2, 16, 4]), True)
    """

    _state_dict_all_req_keys = ("queue",)

    def __init__(
        self, length: int, num_crops: int = 2, batch_size: int | None = None, feat_dim: int | None = None
    ) -> None:
        self._requested_length = check_int("length", length, 0)
        self.num_crops = check_int("num_crops", num_crops, 1)
        self._batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self._feat_dim = None if feat_dim is None else check_int("feat_dim", feat_dim, 1)
        self._rows: Tensor | None = None
        self._started = False
        self._in_use = False
        # rows still to write before the queue of every process is full (host count; None: read at its first use)
        self._rows_missing: int | None = None
        # the rows of every process, gathered (or restored), valid until the next push
        self._gathered: Tensor | None = None
        self._reported_lengths: set[tuple[int, int]] = set()
        # the SwAVQueueHandler that made this queue (it sets it), or None
        self._handler: Any = None

    def __repr__(self) -> str:
        shape = None if self._rows is None else tuple(self._rows.shape)
        return f"SwAVQueue(length={self.length}, num_crops={self.num_crops}, rows={shape}, in_use={self._in_use})"

    @property
    def requested_length(self) -> int:
        """The global length asked for (``length``, or that of the last :meth:`reset`), before it is trimmed."""
        return self._requested_length

    @property
    def length(self) -> int:
        """The global length in use: that of the rows once they exist, else ``length`` trimmed to the global batch
        (to the world size while the batch size is not known)."""
        if self._rows is not None:
            return self._rows.shape[1] * idist.get_world_size()
        return self._trimmed_length(report=True)

    @property
    def batch_size(self) -> int | None:
        """The batch size per process, given or learned from the first batch (``None`` before)."""
        return self._batch_size

    @property
    def feat_dim(self) -> int | None:
        """The width of the embeddings, given or learned from the first batch (``None`` before)."""
        return self._feat_dim

    @property
    def started(self) -> bool:
        """Whether the loss fills the queue (:meth:`start` was called, and no :meth:`reset` since)."""
        return self._started

    @property
    def in_use(self) -> bool:
        """Whether the loss scores the queue: every process's is full (as counted on the host; no device read)."""
        return self._in_use

    @property
    def handler(self) -> Any:
        """The :class:`~ignite_swav.SwAVQueueHandler` that made this queue and drives it, or ``None`` for a queue
        used alone (a trainer reads it to say when that handler is not attached to it)."""
        return self._handler

    @property
    def rows(self) -> Tensor | None:
        """The rows of this process, ``(num_crops, length // world_size, feat_dim)``, or ``None`` before they are
        made. Assign a tensor of that layout to replace them (its fill is read again); ``None`` drops them."""
        return self._rows

    @rows.setter
    def rows(self, value: Tensor | None) -> None:
        if value is not None:
            if not isinstance(value, Tensor) or value.ndim != 3 or not value.is_floating_point():
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"SwAVQueue.rows must be a float tensor (num_crops, rows, feat_dim), got {shape}")
            if value.shape[0] != self.num_crops:
                raise ValueError(
                    f"SwAVQueue.rows of {tuple(value.shape)} has {value.shape[0]} crop slot(s), but the queue has "
                    f"num_crops={self.num_crops}"
                )
            if self._feat_dim is not None and value.shape[2] != self._feat_dim:
                raise ValueError(
                    f"SwAVQueue.rows of {tuple(value.shape)} holds embeddings of width {value.shape[2]}, but the "
                    f"queue has feat_dim={self._feat_dim}"
                )
            self._feat_dim = value.shape[2]
            self._started = True
        self._rows = value
        self._rows_missing = None
        self._in_use = False
        self._gathered = None

    def start(self, device: torch.device | None = None) -> None:
        """From now on the loss fills the queue: its rows are made here (on ``device``, by default
        ``idist.device()``) when ``batch_size`` and ``feat_dim`` are known, else from the loss's next batch.

        Raises:
            ValueError: the rows do not fit in the device's memory (the message gives their size).
        """
        self._started = True
        if self._rows is None and self._batch_size is not None and self._feat_dim is not None:
            self._make_rows(device or idist.device())

    def reset(self, length: int | None = None) -> None:
        """Drop the rows and stop filling until :meth:`start`; ``length`` sets a new global length (0: no queue).

        Example:
            >>> from ignite_swav import SwAVQueue
            >>> queue = SwAVQueue(length=64, batch_size=8, feat_dim=4)
            >>> queue.start()
            >>> queue.reset(32)
            >>> queue.rows, queue.started, queue.length
            (None, False, 32)
        """
        if length is not None:
            self._requested_length = check_int("length", length, 0)
        self.rows = None
        self._started = False

    def check_batch(self, batch_size: int, feat_dim: int) -> None:
        """Learn ``batch_size`` and ``feat_dim`` from a batch of the run, or check the given ones against it.

        Raises:
            ValueError: the batch differs from the queue's given ``batch_size`` or ``feat_dim`` (both named).
        """
        if self._feat_dim is None:
            self._feat_dim = feat_dim
        elif feat_dim != self._feat_dim:
            raise ValueError(
                f"the queue has feat_dim={self._feat_dim}, but the loss gets embeddings of width {feat_dim}: pass "
                f"feat_dim={feat_dim} (to SwAVQueueHandler or SwAVQueue), or leave it out to take it from the batch"
            )
        if self._batch_size is None:
            # the loss compared the batch sizes of all processes at its first call, before this one
            self._batch_size = batch_size
            if self._rows is None:
                self._trimmed_length(report=True)
        elif batch_size != self._batch_size:
            raise ValueError(
                f"the queue has batch_size={self._batch_size}, but the first batch of the run holds {batch_size} "
                f"samples on this process: pass batch_size={batch_size} (to SwAVQueueHandler or SwAVQueue), or leave "
                "it out to take it from the batch"
            )

    def prepare(self, batch_size: int, feat_dim: int, device: torch.device) -> Tensor | None:
        """Called by the loss before its computation: makes the rows of a started queue from this batch when they
        do not exist yet, and returns them when every process's queue is full (the Sinkhorn scores them), else
        ``None``. Reads the fill from the device once per new set of rows (a collective on several processes)."""
        if self._rows is None and self._started:
            self.check_batch(batch_size, feat_dim)
            self._make_rows(device)
        if self._rows is None:
            return None
        if not self._in_use:
            self._in_use = self._missing_rows() <= 0
        return self._rows if self._in_use else None

    @torch.no_grad()
    def push(self, embeddings: Tensor, accepted: Tensor | None = None) -> int:
        """Put ``embeddings`` (``(num_crops, batch, feat_dim)``) on top of the rows, the oldest dropping off the end,
        where the device boolean ``accepted`` is true (nothing is read from the device); returns how many rows the
        host counted as written (give them to :meth:`uncount` when the host learns later that ``accepted`` was
        false). Nothing happens before the rows exist."""
        rows = self._rows
        if rows is None:
            return 0
        length = rows.shape[1]
        pushed = min(embeddings.shape[1], length)
        updated = torch.cat([embeddings[:, :pushed].to(rows.dtype), rows[:, : length - pushed]], dim=1)
        rows.copy_(updated if accepted is None else torch.where(accepted, updated, rows))
        self._gathered = None
        if self._rows_missing is None:
            return 0
        counted = min(max(self._rows_missing, 0), pushed)
        self._rows_missing -= counted
        return counted

    def uncount(self, rows: int) -> None:
        """Count ``rows`` of a :meth:`push` the device refused as not written again."""
        if self._rows_missing is not None:
            self._rows_missing += rows

    def scores(self, prototypes: Tensor, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
        """The rows' scores under ``prototypes`` (``(K, D)``, or ``(H, K, D)`` for ``H`` heads), detached, in
        ``dtype``, one problem per crop and head as the loss's Sinkhorn lays them out (crop 0's heads first):
        ``(num_crops * H, L, K)``; written into ``out`` when given.

        Example:
            >>> import torch
            >>> import torch.nn.functional as F
            >>> from ignite_swav import SwAVQueue
            >>> queue = SwAVQueue(length=8)
            >>> queue.rows = F.normalize(torch.randn(2, 8, 4), dim=2)
            >>> queue.scores(F.normalize(torch.randn(3, 10, 4), dim=2)).shape
            torch.Size([6, 8, 10])
        """
        assert self._rows is not None, "the queue has no rows to score"
        weights = prototypes.detach().to(dtype)
        if weights.ndim == 2:
            rows, weights = self._rows.to(dtype), weights.t().expand(self.num_crops, -1, -1)
        else:
            heads = weights.shape[0]
            rows = self._rows.to(dtype).repeat_interleave(heads, dim=0)
            weights = weights.transpose(1, 2).repeat(self.num_crops, 1, 1)
        return torch.bmm(rows, weights, out=out)

    def gather(self) -> None:
        """Gather the rows of every process for :meth:`state_dict` (a collective: every process calls it). Rows are
        ordered by age, newest first, across processes: row ``j`` of rank ``r`` becomes global row
        ``j * world_size + r``."""
        world_size = idist.get_world_size()
        if self._rows is None or world_size == 1:
            return
        local = self._rows.detach().contiguous()
        crops, length, dim = local.shape
        # (world, crops, length, dim) -> (crops, length, world, dim): interleave the ranks row by row.
        gathered = all_gather(local).view(world_size, crops, length, dim)
        self._gathered = gathered.permute(1, 2, 0, 3).reshape(crops, -1, dim).cpu()

    @property
    def gathered(self) -> bool:
        """Whether :meth:`state_dict` can give the rows of every process without a collective (always on one
        process)."""
        return self._rows is None or idist.get_world_size() == 1 or self._gathered is not None

    def state_dict(self) -> OrderedDict[str, Any]:
        """The rows of every process in one tensor (as last gathered: no collective), with the queue's settings.

        Raises:
            RuntimeError: on several processes, when rows were pushed since the last :meth:`gather`: they would not
                be the model's.
        """
        queue = None
        if self._rows is not None:
            if idist.get_world_size() == 1:
                queue = self._rows.detach().cpu().clone()
            elif self._gathered is not None:
                queue = self._gathered
            else:
                raise RuntimeError(
                    "the queue's state_dict() was asked for after its rows changed (a step) since its last gather of "
                    "every process's rows (SwAVQueueHandler gathers at the last iteration of every epoch and of the "
                    "run, and at its gather_event): to checkpoint in the middle of an epoch, pass "
                    "SwAVQueueHandler(..., gather_event=<the event of your Checkpoint>) and attach the handler "
                    "before that Checkpoint"
                )
        return OrderedDict(
            version=_FORMAT_VERSION,
            queue=queue,
            queue_length=self.length,
            feat_dim=self._feat_dim or (queue.shape[2] if queue is not None else 0),
            num_crops=self.num_crops,
        )

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, resharded onto the current world size (no collective).

        Every stored row lands on exactly one process. When the current global length (``length`` trimmed to this
        world size and batch) differs from the stored one, the newest rows are kept and missing rows are zeros, so
        the queue counts as full again only once they are written. The queue is filled from the loss's next call.

        Raises:
            ValueError: as :meth:`validate_state_dict`; nothing is changed then.
        """
        queue = self.validate_state_dict(state_dict)
        if queue is None:
            self.reset()
            return
        self._feat_dim = self._feat_dim or queue.shape[2]
        length = self._trimmed_length(report=True)
        if queue.shape[1] != length:
            logging.getLogger(__name__).warning(
                "the restored queue has %d rows, this run uses %d: keeping the newest rows", queue.shape[1], length
            )
            resized = queue.new_zeros(queue.shape[0], length, queue.shape[2])
            kept = min(length, queue.shape[1])
            resized[:, :kept] = queue[:, :kept]
            queue = resized
        if length == 0:
            self.reset()
            return
        world_size, rank = idist.get_world_size(), idist.get_rank()
        # Global row g goes to rank g % world_size, local row g // world_size: ages stay interleaved. A copy, so that
        # training never writes into the caller's state.
        self.rows = queue[:, rank::world_size].to(device=idist.device(), dtype=torch.float32, copy=True)
        self._gathered = queue.to(dtype=torch.float32, copy=True)  # what state_dict gives until training moves on

    def validate_state_dict(self, state_dict: Mapping[str, Any]) -> Tensor | None:
        """Check ``state_dict`` as :meth:`load_state_dict` would, changing nothing; returns its rows.

        Raises:
            TypeError, ValueError: not a queue state; a queue that is not a float ``(crops, length, dim)`` tensor,
                or of another width or crop count than this queue's (the message names both), or holding
                non-finite values, or requiring a gradient, or claiming more values than its storage holds.
        """
        Serializable.load_state_dict(self, state_dict)  # Ignite's checks: a mapping with the required keys
        for key, value in state_dict.items():
            if key != "queue" and (isinstance(value, bool) or not isinstance(value, Integral)):
                raise ValueError(f"queue state entry '{key}' must be an integer, got {type(value).__name__}")
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
        if self._feat_dim is not None and dim != self._feat_dim:
            raise ValueError(
                f"the saved queue holds embeddings of width {dim}, but this queue has feat_dim={self._feat_dim}: "
                "the checkpoint comes from another model"
            )
        if crops != self.num_crops:
            raise ValueError(
                f"the saved queue has {crops} crop slot(s), but this queue has num_crops={self.num_crops} "
                "(one per crop the loss assigns)"
            )
        if not bool(torch.isfinite(queue).all()):
            raise ValueError("the saved queue holds NaN or infinite values: it was refused")
        return queue

    def _trimmed_length(self, report: bool) -> int:
        """``requested_length`` trimmed to the global batch (to the world size before the batch size is known);
        ``report``: log it once when that changes it."""
        world_size = idist.get_world_size()
        if self._batch_size is None:
            return self._requested_length - self._requested_length % world_size
        global_batch = self._batch_size * world_size
        length = self._requested_length - self._requested_length % global_batch
        reported = (self._requested_length, length)
        if report and length != self._requested_length and reported not in self._reported_lengths:
            self._reported_lengths.add(reported)
            advice = "no queue will be used; " if length == 0 else ""
            logging.getLogger(__name__).warning(
                "queue_length=%d is used as %d: a multiple of the global batch (batch_size=%d x world_size=%d = %d); "
                "%spass a multiple of it to use the length you asked for",
                self.requested_length,
                length,
                self._batch_size,
                world_size,
                global_batch,
                advice,
            )
        return length

    def _make_rows(self, device: torch.device) -> None:
        assert self._feat_dim is not None
        local_length = self._trimmed_length(report=True) // idist.get_world_size()
        if local_length == 0:
            return
        shape = (self.num_crops, local_length, self._feat_dim)
        try:
            rows = torch.zeros(shape, dtype=torch.float32, device=device)
        except (RuntimeError, MemoryError) as error:  # torch's allocator: "can't allocate memory", CUDA out of memory
            gigabytes = local_length * self.num_crops * self._feat_dim * 4 / 1e9
            raise ValueError(
                f"queue_length={self.requested_length} needs a queue of {shape} float32 values per process "
                f"({gigabytes:.3g} GB), which {device} cannot allocate: use a shorter queue (SwAV's ImageNet recipe "
                f"uses 3840 rows) ({str(error).splitlines()[0][:120]})"
            ) from None
        self.rows = rows

    def _missing_rows(self) -> int:
        if self._rows_missing is None:
            # One read per set of rows (a new run, a restored checkpoint), of every process's fill: rows are written
            # from the top, so the written rows are the leading non-zero ones. The queue comes into use when the
            # emptiest process's is full, at the same step on every process (after a reshard their fills differ).
            assert self._rows is not None
            written = self._rows[0].ne(0).any(dim=1)
            missing = torch.where(written[-1], 0, self._rows.shape[1] - written.sum())
            if idist.get_world_size() > 1:
                missing = all_reduce(missing, op="MAX")
            self._rows_missing = int(missing.item())
        return self._rows_missing
