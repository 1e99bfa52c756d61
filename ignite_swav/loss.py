"""SwAV's swapped-prediction loss, with the optional queue of embeddings from earlier batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from ignite import distributed as idist
from torch import Tensor, nn

from ignite_swav._deprecation import warn_renamed
from ignite_swav._distributed import any_flag_on_any_rank, values_by_rank
from ignite_swav._loss_checks import (
    MAX_ABS_SCORE,
    SMALLEST_DIVISOR,
    UNIT_TOLERANCE,
    bad_values_message,
    check_inputs,
)
from ignite_swav._validation import check_crops_for_assign, check_int, check_positive_float
from ignite_swav.queue import SwAVQueue
from ignite_swav.sinkhorn import codes_from_rows, sinkhorn_method

__all__ = ["SwAVLoss", "SwAVLossStep"]


class SwAVLossStep(NamedTuple):
    """What one :class:`SwAVLoss` call computed, detached, on the device (nothing is read back): read by
    :class:`~ignite_swav.SwAVHealthMonitor`.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from ignite_swav import SwAVLoss
        >>> loss_fn, prototypes = SwAVLoss(), F.normalize(torch.randn(10, 4), dim=1)
        >>> z = [F.normalize(torch.randn(8, 4), dim=1) for _ in range(2)]
        >>> _ = loss_fn(scores=[e @ prototypes.t() for e in z], embeddings=z, prototypes=prototypes)
        >>> step = loss_fn.last_step
        >>> step.codes.shape, torch.allclose(step.codes.sum(dim=2), torch.ones(2, 8))
        (torch.Size([2, 8, 10]), True)
    """

    loss: Tensor  #: the scalar loss
    #: ``(len(crops_for_assign) * H, B, K)`` Sinkhorn codes of the assigned crops, for each of the ``H`` prototype
    #: heads (crop 0's heads first; ``H = 1`` for one head)
    codes: Tensor
    scores: Tensor  #: the prototype scores of the assigned crops, laid out as ``codes``
    #: a device boolean, false when the training step refused this call's values (set by the training step once it
    #: has decided; ``None`` when nobody decided)
    accepted: Tensor | None = None
    num_heads: int = 1  #: the number of prototype heads ``H``


def _one_crop_at_a_time(crop_scores: Tensor) -> bool:
    """Whether the loss takes the log-softmax one crop at a time (large crops on the CPU, where a crop's values stay
    in the core's cache and launches cost nothing) rather than all crops in one pass (accelerators, small crops).
    The threshold is measured: ``benchmarks/loss.py --grid``. A function, so that tests can count either path."""
    return crop_scores.device.type == "cpu" and crop_scores.numel() >= 65536


def _largest_magnitude(values: Tensor) -> Tensor:
    """``values.abs().amax()`` in float32, without writing ``abs``'s copy of ``values`` (3x faster on the CPU)."""
    low, high = torch.aminmax(values)
    return torch.maximum(high, low.neg()).float()


class _PendingStep(NamedTuple):
    """A call's checks of this rank (float 0/1 on the device: non-finite loss, embeddings not unit, scores beyond
    the cosine range, prototypes not unit while they score the queue), what its error message reads, and the push
    into the queue it waits for."""

    flags: Tensor
    all_scores: Tensor
    pushed_embeddings: Tensor
    prototypes: Tensor | None
    queue: SwAVQueue | None
    rows: Tensor | None  # the queue's rows this call read: a push goes into them only if they are still the queue's


class SwAVLoss(nn.Module):
    """Swapped prediction: the code of each assigned crop is predicted from every other crop.

    For each crop ``i`` in ``crops_for_assign``, the codes ``q_i`` come from a Sinkhorn-Knopp equipartition
    (:func:`ignite_swav.sinkhorn`, over all ranks) of that crop's scores, joined by the scores of the queue's
    embeddings under the current prototypes once the queue is full. The loss is the mean over assigned crops of
    the mean over the other crops ``v`` of ``-mean_batch(sum_k q_i * log_softmax(scores_v / temperature))``.
    Uniform scores give ``ln(K)``. With several prototype heads (``prototypes`` of shape ``(H, K, D)``, as
    :class:`~ignite_swav.SwAVPrototypes` with a list of widths gives them, the reference's ``MultiPrototypes`` of
    DeepCluster-v2 and SeLa-v2), each head has its own codes and softmax and the loss is the mean over the heads,
    as the reference averages its heads' losses; the queue's embeddings are scored by every head. All crops are
    computed together: one log-softmax over all crops, the
    assigned crops' Sinkhorn as one batched problem, one push into the queue.

    The queue: a :class:`~ignite_swav.SwAVQueue` (``queue``), made and driven by
    :class:`~ignite_swav.SwAVQueueHandler` in an Ignite run, or given here. In a step, the queue is read before the
    current batch's assigned embeddings are pushed into it (newest rows first), so a batch is never in its own
    queue; it is scored once full on every rank (:attr:`SwAVQueue.in_use <ignite_swav.SwAVQueue.in_use>`, counted on
    the host, so that a step never waits for the device to know it).

    Inputs are SwAV's: unit-norm embeddings and prototypes, so that scores are cosine similarities. Scores
    beyond ``[-1, 1]`` (by more than autocast's rounding), assigned embeddings that are not unit vectors
    (a head without L2 normalisation), prototypes that are not unit rows while the queue is used, and
    non-finite values raise a ``ValueError`` naming the crop and the fix, on every rank at once; they are
    never pushed into the queue. Finding them needs the device's answer, a host synchronisation that stalls
    a GPU in the middle of the step; with ``check_finite=False`` the call leaves the checks and the push pending
    until :meth:`raise_if_non_finite` (or the next call), so that a loop can call it after backward, before the
    optimizer step. :func:`~ignite_swav.create_swav_trainer` decides the step on the device instead, with the
    gradients' check, and reads the verdict later. The push is conditional on the device, so the queue is never
    written with a bad row either way.

    Args:
        crops_for_assign: indices of the crops whose codes are computed (SwAV: the two large crops).
        temperature: softmax temperature of the predictions.
        epsilon: Sinkhorn regularisation.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.
        queue: the :class:`~ignite_swav.SwAVQueue` to fill and score, or ``None`` (``SwAVQueueHandler`` gives the
            loss its own).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from ignite_swav import SwAVLoss
        >>> loss_fn = SwAVLoss(crops_for_assign=(0, 1))
        >>> prototypes = F.normalize(torch.randn(10, 4), dim=1)
        >>> embeddings = [F.normalize(torch.randn(8, 4), dim=1) for _ in range(3)]  # 3 crops of 8 images
        >>> scores = [z @ prototypes.t() for z in embeddings]
        >>> loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
        >>> loss.ndim, loss_fn.last_step.codes.shape
        (0, torch.Size([2, 8, 10]))
    """

    def __init__(
        self,
        crops_for_assign: Sequence[int] = (0, 1),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue: SwAVQueue | None = None,
    ) -> None:
        super().__init__()
        self.crops_for_assign = check_crops_for_assign(crops_for_assign)
        self.temperature = check_positive_float("temperature", temperature, minimum=SMALLEST_DIVISOR)
        self.epsilon = check_positive_float("epsilon", epsilon, minimum=SMALLEST_DIVISOR)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, 1)
        # chosen once from the bound on cosine scores: no step reads the scores' range from the device
        self._sinkhorn_method = sinkhorn_method(2 * MAX_ABS_SCORE / self.epsilon)
        self._queue: SwAVQueue | None = None
        self.queue = queue
        #: ``(batch size, embedding width)`` of the last call
        self.last_batch_shape: tuple[int, int] | None = None
        #: what the last call computed (:class:`SwAVLossStep`), or ``None`` before the first call
        self.last_step: SwAVLossStep | None = None
        self._pending: _PendingStep | None = None
        # set by compile(); None for self._compute, whose bound method kept on self would be a reference cycle
        self._computation: Callable[..., tuple[Tensor, ...]] | None = None
        self._workspace_tensors: tuple[Tensor, Tensor | None] | None = None
        self._constants_cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @property
    def queue(self) -> SwAVQueue | None:
        """The :class:`~ignite_swav.SwAVQueue` the loss fills and scores, or ``None``. Assigning a tensor (0.2's way
        of giving the queue's rows) still works, deprecated: it becomes a started ``SwAVQueue`` of those rows."""
        return self._queue

    @queue.setter
    def queue(self, value: SwAVQueue | Tensor | None) -> None:
        if isinstance(value, Tensor):
            warn_renamed("assigning a tensor to SwAVLoss.queue", "SwAVLoss(queue=SwAVQueue(length))")
            rows = value
            value = SwAVQueue(
                rows.shape[1] * idist.get_world_size() if rows.ndim == 3 else 0, len(self.crops_for_assign)
            )
            value.rows = rows  # checks the layout
        if value is not None and not isinstance(value, SwAVQueue):
            raise TypeError(f"queue must be an ignite_swav.SwAVQueue or None, got {type(value).__name__}")
        if value is not None and value.num_crops != len(self.crops_for_assign):
            raise ValueError(
                f"the queue has num_crops={value.num_crops}, but the loss assigns {len(self.crops_for_assign)} "
                f"crops (crops_for_assign={self.crops_for_assign}): one queue slot per assigned crop"
            )
        self._queue = value

    @property
    def queue_in_use(self) -> bool:
        """Whether the last call scored the queue (it is full on every rank); ``False`` without a queue."""
        return self._queue is not None and self._queue.in_use

    @property
    def use_queue(self) -> bool:
        """Deprecated name of :attr:`queue_in_use` (removed in 1.1)."""
        warn_renamed("SwAVLoss.use_queue", "SwAVLoss.queue_in_use")
        return self.queue_in_use

    @property
    def queue_handler(self) -> Any:
        """The :class:`~ignite_swav.SwAVQueueHandler` that drives ``queue``, or ``None``."""
        return None if self._queue is None else self._queue.handler

    def extra_repr(self) -> str:
        return (
            f"crops_for_assign={self.crops_for_assign}, temperature={self.temperature}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}"
        )

    def forward(
        self, embeddings: Sequence[Tensor], scores: Sequence[Tensor], prototypes: Tensor, *, check_finite: bool = True
    ) -> Tensor:
        """Loss of one step; pushes the assigned crops' embeddings into ``queue`` when it has rows.

        The arguments come in the order of :class:`~ignite_swav.SwAVModel`'s output, ``(embeddings, scores)``, since
        1.0 (before: ``scores`` first); a call in the old positional order is refused with a ``TypeError`` that says
        so, and calls by keyword work with either.

        Args:
            embeddings: one ``(B, D)`` tensor of L2-normalised embeddings per crop.
            scores: one ``(B, K)`` tensor of prototype scores per crop, in the same order.
            prototypes: ``(K, D)`` prototype weight (L2-normalised rows), or ``(H, K, D)`` for ``H`` heads of ``K``
                prototypes, whose scores are the ``H * K`` columns of ``scores``, head after head.
            check_finite: raise here on bad values. ``False`` leaves the check and the push into the queue to a
                later :meth:`raise_if_non_finite` (at the latest, the next call does it), so that the device is not
                waited for in the middle of the step; the queue is still pushed only when all is valid.

        Returns:
            The scalar loss (float32).
        """
        self.raise_if_non_finite()
        queue = self._queue
        batch_size = check_inputs(
            embeddings, scores, prototypes, self.crops_for_assign, None if queue is None else queue.rows
        )
        feat_dim = embeddings[0].shape[1]
        if self.last_batch_shape is None:
            # once, before the first collective of the Sinkhorn: ranks with other shapes would abort in it (gloo)
            # or hang, instead of saying what differs
            shapes = values_by_rank([batch_size, feat_dim, scores[0].shape[1]])
            if len(set(shapes)) > 1:
                raise ValueError(
                    "the processes give the loss batches of other shapes (batch size, embedding width, prototypes by "
                    f"rank: {shapes}): every process needs the same batch size and the same model"
                )
        self.last_batch_shape = (batch_size, feat_dim)
        # decided on the host (the queue's fill is counted there), before the computation
        scored = queue is not None and queue.prepare(batch_size, feat_dim, embeddings[0].device) is not None
        loss, codes, assigned_scores, flags, all_scores, pushed_embeddings = (self._computation or self._compute)(
            scores, embeddings, prototypes, queue if scored else None
        )
        checked_prototypes = prototypes.detach() if scored else None
        loss_value = loss.detach()
        self.last_step = SwAVLossStep(loss_value, codes, assigned_scores, num_heads=_num_heads(prototypes))
        rows = None if queue is None else queue.rows
        self._pending = _PendingStep(flags, all_scores, pushed_embeddings, checked_prototypes, queue, rows)
        if check_finite:
            self.raise_if_non_finite()
        return loss

    def _compute(
        self, scores: Sequence[Tensor], embeddings: Sequence[Tensor], prototypes: Tensor, queue: SwAVQueue | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The computation of one call (what :meth:`compile` compiles): the loss, the codes and scores of the assigned
        crops, this rank's check flags, all scores and the assigned embeddings (detached). ``queue`` is the queue
        when its scores join the Sinkhorn (a full queue), else ``None``; its rows are only read here (the push waits
        for the step's verdict)."""
        batch_size = scores[0].shape[0]
        num_crops, num_assigned, heads = len(scores), len(self.crops_for_assign), _num_heads(prototypes)
        stacked_scores = torch.stack(list(scores))  # (V, B, H * K)
        all_scores = stacked_scores.detach()
        assigned, limits = self._constants(all_scores.device)
        # one Sinkhorn problem per assigned crop and head: (A * H, B, K)
        assigned_scores = _per_head(all_scores.index_select(0, assigned), heads)

        # The Sinkhorn's rows: the assigned crops' scores, then the queue's scores under the current prototypes,
        # read before this step's push.
        rows, scratch = self._sinkhorn_rows(assigned_scores, queue, prototypes)
        codes = codes_from_rows(
            rows, batch_size, self.sinkhorn_iterations, self.epsilon, self._sinkhorn_method, scratch
        )
        weighted = self._weighted_log_probs(stacked_scores, scores, _all_heads(codes, heads), assigned, heads)
        loss = weighted.div(-(batch_size * (num_crops - 1) * num_assigned * heads))

        # Every check in one small tensor of this rank, compared on the device; the crops are looked at only when
        # something is wrong. NaN compares false, so it fails every check.
        pushed_embeddings = torch.stack([embeddings[c] for c in self.crops_for_assign]).detach()
        unit_prototypes = (
            torch.linalg.vector_norm(prototypes.detach().float(), dim=-1).sub_(1).abs_().amax()
            if queue is not None  # the prototypes score the queue: they must be unit rows too
            else limits[3]
        )
        measured = [
            loss.detach() * 0,  # NaN for a non-finite loss
            torch.linalg.vector_norm(pushed_embeddings.float(), dim=2).sub_(1).abs_().amax(),
            _largest_magnitude(all_scores),
            unit_prototypes,
        ]
        flags = torch.stack(measured).le(limits).logical_not_().float()
        return loss, codes, assigned_scores, flags, all_scores, pushed_embeddings

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the loss's computation with ``torch.compile`` (its arguments); the bookkeeping around it (the
        queue's fill, counted on the host, the checks' context) stays eager, so that filling the queue never
        recompiles it. :func:`~ignite_swav.create_swav_trainer` does it with ``compile_model``."""
        self._computation = torch.compile(self._compute, *args, **kwargs)

    def _sinkhorn_rows(
        self, assigned_scores: Tensor, queue: SwAVQueue | None, prototypes: Tensor
    ) -> tuple[Tensor, Any]:
        """The Sinkhorn's ``(crops, batch + queue, K)`` rows in the method's dtype (the queue's scores under the
        current prototypes after the batch's), and the stabilised method's scratch matrix (or ``None``)."""
        dtype = self._sinkhorn_method[1]
        if torch.compiler.is_compiling():
            # a compiled graph allocates and fuses its own buffers (an out= into a slice would break the graph)
            blocks = [assigned_scores.to(dtype)]
            if queue is not None:
                blocks.append(queue.scores(prototypes, dtype))
            return torch.cat(blocks, dim=1), None
        batch_size = assigned_scores.shape[1]
        length = 0 if queue is None or queue.rows is None else queue.rows.shape[1]
        shape = (assigned_scores.shape[0], batch_size + length, assigned_scores.shape[2])
        rows, scratch = self._workspace(shape, assigned_scores.device)
        rows[:, :batch_size] = assigned_scores
        if queue is not None:
            queue.scores(prototypes, dtype, out=rows[:, batch_size:])
        return rows, scratch

    def _weighted_log_probs(
        self, stacked_scores: Tensor, scores: Sequence[Tensor], codes: Tensor, assigned: Tensor, heads: int
    ) -> Tensor:
        """The sum over assigned crops i and other crops v of ``codes_i . log_softmax(scores_v / temperature)``, as a
        float32 scalar: crop v's log-probabilities weigh by the codes of the assigned crops other than v (their sum,
        less v's own codes when v is assigned).

        Dot products: the gradient is the weight itself, contiguous, and autocast leaves ``torch.dot`` in float32.
        """
        total = codes.sum(dim=0)
        if not _one_crop_at_a_time(scores[0]):
            weights = total.expand(len(scores), -1, -1).clone()
            weights.index_add_(0, assigned, codes, alpha=-1)
            log_probs = _log_softmax_per_head(stacked_scores.float().div(self.temperature), heads)
            return torch.dot(weights.view(-1), log_probs.reshape(-1))
        terms = []
        for crop, crop_scores in enumerate(scores):
            assigned_slot = self.crops_for_assign.index(crop) if crop in self.crops_for_assign else None
            weight = total if assigned_slot is None else total - codes[assigned_slot]
            log_probs = _log_softmax_per_head(crop_scores.float().div(self.temperature), heads)
            terms.append(torch.dot(weight.view(-1), log_probs.reshape(-1)))
        return torch.stack(terms).sum()

    def raise_if_non_finite(self) -> None:
        """Finish the step of the last call made with ``check_finite=False``: combine its checks over all ranks,
        push its assigned embeddings into the queue if every check passed on every rank, and raise the
        ``ValueError`` of a bad value otherwise (not finite, scores beyond ``[-1, 1]``, embeddings that are not
        unit vectors, or prototypes while the queue is used).

        Waits for the device. Every rank must call it at the same point, as with any collective. Nothing to do
        after a call with ``check_finite=True``, which checked already.
        """
        pending = self._take_pending()
        if pending is None:
            return
        flags = any_flag_on_any_rank(pending.flags) if idist.get_world_size() > 1 else pending.flags
        counted = self._commit(pending, flags.any().logical_not())
        if bool(flags.any()):
            self._uncount(pending, counted)
            self._raise_bad_values(pending)

    def _raise_bad_values(self, pending: _PendingStep) -> None:
        """Raise the error of a refused call (a collective: every rank calls it, after reading the same verdict)."""
        raise ValueError(
            bad_values_message(pending.all_scores, pending.pushed_embeddings, pending.prototypes, self.crops_for_assign)
        )

    def _take_pending(self) -> _PendingStep | None:
        """The step of the last call, not pushed into the queue yet (``None`` when there is none); a training step
        takes it to decide its fate together with the gradients' (:func:`~ignite_swav.swav_training_step`)."""
        pending, self._pending = self._pending, None
        return pending

    def _commit(self, pending: _PendingStep, valid: Tensor) -> int:
        """Push the pending step's embeddings into its queue where ``valid`` (a device boolean: nothing is read);
        returns how many rows were counted as written on the host. Rows replaced since the call (a restored
        checkpoint) get nothing: the step's embeddings belong to the rows it read."""
        queue = pending.queue
        if queue is None or pending.rows is None or queue.rows is not pending.rows:
            return 0
        return queue.push(pending.pushed_embeddings, valid)

    def _uncount(self, pending: _PendingStep, counted: int) -> None:
        """Uncount the rows a refused step's push counted on the host (the push was skipped on the device)."""
        if pending.queue is not None:
            pending.queue.uncount(counted)

    def _constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The assigned crops' indices and the checks' limits on ``device``, made once (not at every step)."""
        if device not in self._constants_cache:
            self._constants_cache[device] = (
                torch.tensor(self.crops_for_assign, device=device),
                torch.tensor([0.0, UNIT_TOLERANCE, MAX_ABS_SCORE, UNIT_TOLERANCE], device=device),
            )
        return self._constants_cache[device]

    def _workspace(self, shape: tuple[int, int, int], device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The Sinkhorn's ``(problems, rows, prototypes)`` matrix (and the stabilised method's scratch matrix), kept
        from one call to the next (their shape is fixed within a run): allocating new ones at every step costs the
        CPU half the loss's time."""
        dtype = self._sinkhorn_method[1]
        workspace = self._workspace_tensors
        if workspace is None or workspace[0].shape != shape or workspace[0].device != device:
            rows = torch.empty(shape, dtype=dtype, device=device)
            scratch = torch.empty_like(rows) if self._sinkhorn_method[0] == "stabilised" else None
            workspace = self._workspace_tensors = (rows, scratch)
        return workspace


def _num_heads(prototypes: Tensor) -> int:
    """The prototype heads of a ``(K, D)`` (one) or ``(H, K, D)`` prototype tensor."""
    return 1 if prototypes.ndim == 2 else prototypes.shape[0]


def _per_head(values: Tensor, heads: int) -> Tensor:
    """``(A, B, H * K)`` as ``(A * H, B, K)``: one problem per crop and head (crop 0's heads first)."""
    if heads == 1:
        return values
    num, batch, columns = values.shape
    return values.view(num, batch, heads, columns // heads).transpose(1, 2).reshape(num * heads, batch, -1)


def _all_heads(values: Tensor, heads: int) -> Tensor:
    """The inverse of :func:`_per_head`: ``(A * H, B, K)`` as ``(A, B, H * K)``."""
    if heads == 1:
        return values
    problems, batch, width = values.shape
    return values.view(problems // heads, heads, batch, width).transpose(1, 2).reshape(problems // heads, batch, -1)


def _log_softmax_per_head(values: Tensor, heads: int) -> Tensor:
    """``log_softmax`` over each head's ``K`` columns of the last dimension (``H * K`` wide)."""
    if heads == 1:
        return F.log_softmax(values, dim=-1)
    return F.log_softmax(values.unflatten(-1, (heads, -1)), dim=-1).flatten(-2)
