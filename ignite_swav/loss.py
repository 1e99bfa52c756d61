"""SwAV's swapped-prediction loss, with the optional queue of embeddings from earlier batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ignite_swav._validation import check_crops_for_assign, check_int, check_positive_float
from ignite_swav.sinkhorn import non_finite_flags, non_finite_on_any_rank, sinkhorn_codes, values_by_rank

__all__ = ["SwAVLoss"]


class SwAVLoss(nn.Module):
    """Swapped prediction: the code of each assigned crop is predicted from every other crop.

    For each crop ``i`` in ``crops_for_assign``, the codes ``q_i`` come from a Sinkhorn-Knopp equipartition
    (:func:`ignite_swav.sinkhorn`, over all ranks) of that crop's scores, joined by the scores of the queue's
    embeddings under the current prototypes once the queue is full. The loss is the mean over assigned crops of
    the mean over the other crops ``v`` of ``-mean_batch(sum_k q_i * log_softmax(scores_v / temperature))``.
    Uniform scores give ``ln(K)``.

    The attributes ``queue`` (``(len(crops_for_assign), L, D)`` tensor, or ``None``) and ``use_queue`` are
    managed by :class:`ignite_swav.SwAVQueueHandler`. In a step, the queue is read before the current batch's
    assigned embeddings are pushed into it (newest rows first), so a batch is never in its own queue. The queue
    counts as full, and ``use_queue`` switches on, when its last row is non-zero: it holds unit vectors, so a
    zero row was never written.

    Non-finite values (a diverged model) raise a ``ValueError`` naming the crop, on every rank at once, and are
    never pushed into the queue. Finding them needs the device's answer, a host synchronisation that stalls a
    GPU in the middle of the step; ``create_swav_trainer`` therefore calls the loss with ``check_finite=False``
    and calls :meth:`raise_if_non_finite` after backward, before the optimizer step. The push is then
    conditional on the device, so the queue is never written with a non-finite row either way.

    Args:
        crops_for_assign: indices of the crops whose codes are computed (SwAV: the two large crops).
        temperature: softmax temperature of the predictions.
        epsilon: Sinkhorn regularisation.
        sinkhorn_iterations: Sinkhorn-Knopp iterations.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from ignite_swav import SwAVLoss
        >>> loss_fn = SwAVLoss(crops_for_assign=(0, 1))
        >>> prototypes = F.normalize(torch.randn(10, 4), dim=1)
        >>> embeddings = [F.normalize(torch.randn(8, 4), dim=1) for _ in range(3)]  # 3 crops of 8 images
        >>> scores = [z @ prototypes.t() for z in embeddings]
        >>> loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes)
        >>> loss.ndim
        0
    """

    def __init__(
        self,
        crops_for_assign: Sequence[int] = (0, 1),
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        self.crops_for_assign = check_crops_for_assign(crops_for_assign)
        self.temperature = check_positive_float("temperature", temperature)
        self.epsilon = check_positive_float("epsilon", epsilon)
        self.sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, 1)
        self.queue: Tensor | None = None
        self.use_queue = False
        self._pending_check: tuple[Tensor, list[Tensor], list[Tensor]] | None = None
        # (batch size, embedding width) of the last call, read by SwAVQueueHandler
        self.last_batch_shape: tuple[int, int] | None = None
        # Set by SwAVQueueHandler when the queue is due but its shape is not known yet: called with the first
        # batch's shape, before that batch is pushed.
        self._queue_factory: Callable[[int, int, torch.device], Tensor | None] | None = None

    def extra_repr(self) -> str:
        return (
            f"crops_for_assign={self.crops_for_assign}, temperature={self.temperature}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}"
        )

    def forward(
        self, scores: Sequence[Tensor], embeddings: Sequence[Tensor], prototypes: Tensor, *, check_finite: bool = True
    ) -> Tensor:
        """Loss of one step; pushes the assigned crops' embeddings into ``queue`` when there is one.

        Args:
            scores: one ``(B, K)`` tensor of prototype scores per crop.
            embeddings: one ``(B, D)`` tensor of L2-normalised embeddings per crop, in the same order.
            prototypes: ``(K, D)`` prototype weight (L2-normalised rows).
            check_finite: raise here on non-finite values. ``False`` leaves the check to a later
                :meth:`raise_if_non_finite` (at the latest, the next call does it), so that the device is not
                waited for in the middle of the step; the queue is still pushed only when all is finite.

        Returns:
            The scalar loss (float32).
        """
        self.raise_if_non_finite()
        batch_size = self._check_inputs(scores, embeddings, prototypes)
        if self.last_batch_shape is None:
            self._check_same_shapes_on_every_rank(batch_size, embeddings[0].shape[1], scores[0].shape[1])
        self.last_batch_shape = (batch_size, embeddings[0].shape[1])
        if self.queue is None and self._queue_factory is not None:
            factory, self._queue_factory = self._queue_factory, None
            self.queue = factory(batch_size, embeddings[0].shape[1], embeddings[0].device)
        num_crops = len(scores)
        assigned = list(self.crops_for_assign)

        # Every crop's log-probabilities once, and their sum: the loss of assigned crop i is then
        # -(q_i * (sum_v log_p_v - log_p_i)), the other crops' terms in one product.
        log_probs = [F.log_softmax(s.float() / self.temperature, dim=1) for s in scores]
        log_probs_sum = torch.stack(log_probs).sum(dim=0)

        loss = scores[0].new_zeros((), dtype=torch.float32)
        for slot, crop in enumerate(assigned):
            codes = self._codes(slot, scores[crop], prototypes)
            cross_entropy = -(codes * (log_probs_sum - log_probs[crop])).sum(dim=1).mean()
            loss = loss + cross_entropy / (num_crops - 1)
        loss = loss / len(assigned)

        # One check of a scalar (and of the small embeddings to store), for every rank at once, before anything
        # is pushed into the queue; the crops are looked at only when something is wrong.
        assigned_embeddings = [embeddings[c].detach() for c in assigned]
        flags = non_finite_flags([loss.detach(), *assigned_embeddings])
        if self.queue is not None:
            all_finite = flags.amax() == 0
            for slot, crop_embeddings in enumerate(assigned_embeddings):
                self._push(slot, crop_embeddings, batch_size, all_finite)
        self._pending_check = (flags, [s.detach() for s in scores], [embeddings[c].detach() for c in assigned])
        if check_finite:
            self.raise_if_non_finite()
        return loss

    def raise_if_non_finite(self) -> None:
        """Raise the ``ValueError`` of the last call if its loss or embeddings were not finite (on any rank).

        Waits for the device. Every rank must call it at the same point, as with any collective. Nothing to do
        after a call with ``check_finite=True``, which checked already.
        """
        if self._pending_check is None:
            return
        flags, scores, assigned_embeddings = self._pending_check
        self._pending_check = None
        if any(f != 0 for f in flags.tolist()):
            self._raise_non_finite(scores, assigned_embeddings)

    @torch.no_grad()
    def _codes(self, slot: int, scores: Tensor, prototypes: Tensor) -> Tensor:
        queue_scores = None
        queue = self.queue
        if queue is not None:
            if not self.use_queue and bool(queue[slot, -1].ne(0).any()):
                self.use_queue = True
            if self.use_queue:
                # Scores of the stored embeddings under the current prototypes, read before this step's push.
                queue_scores = queue[slot] @ prototypes.detach().to(queue.dtype).t()
        return sinkhorn_codes(scores, queue_scores, iterations=self.sinkhorn_iterations, epsilon=self.epsilon)

    @torch.no_grad()
    def _push(self, slot: int, embeddings: Tensor, batch_size: int, all_finite: Tensor) -> None:
        # Newest rows first: the batch on top of the queue shifted down by the batch. Chosen on the device by
        # ``all_finite`` (no host synchronisation), so a non-finite step leaves the queue as it was.
        queue = self.queue
        assert queue is not None
        length = queue.shape[1]
        pushed = min(batch_size, length)
        updated = torch.cat([embeddings[:pushed].to(queue.dtype), queue[slot, : length - pushed]])
        queue[slot] = torch.where(all_finite, updated, queue[slot])

    @staticmethod
    def _check_same_shapes_on_every_rank(batch_size: int, feat_dim: int, num_prototypes: int) -> None:
        # Once, before the first collective of the Sinkhorn: ranks with other shapes would abort in it (gloo) or
        # hang, instead of saying what differs.
        shapes = values_by_rank([batch_size, feat_dim, num_prototypes])
        if len(set(shapes)) > 1:
            raise ValueError(
                "the processes give the loss batches of other shapes (batch size, embedding width, prototypes by "
                f"rank: {shapes}): every process needs the same batch size and the same model"
            )

    def _check_inputs(self, scores: Sequence[Tensor], embeddings: Sequence[Tensor], prototypes: Tensor) -> int:
        for name, value in (("scores", scores), ("embeddings", embeddings)):
            if isinstance(value, Tensor) or not isinstance(value, Sequence):
                raise TypeError(f"{name} must be a list with one tensor per crop, got {type(value).__name__}")
            for v, t in enumerate(value):
                if not isinstance(t, Tensor) or t.ndim != 2:
                    shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                    raise ValueError(f"{name}[{v}] must be a 2-D tensor (batch, width), got {shape}")
        if len(scores) != len(embeddings):
            raise ValueError(
                f"scores and embeddings must have one entry per crop each, got {len(scores)} scores and "
                f"{len(embeddings)} embeddings"
            )
        if len(scores) < 2:
            raise ValueError(f"SwAV needs at least 2 crops (one to assign, one to predict it), got {len(scores)}")
        missing = [c for c in self.crops_for_assign if c >= len(scores)]
        if missing:
            raise ValueError(
                f"crops_for_assign={self.crops_for_assign} names crop(s) {missing}, but the loss was given "
                f"{len(scores)} crops (valid indices 0..{len(scores) - 1})"
            )
        batch_size, num_prototypes = scores[0].shape
        feat_dim = embeddings[0].shape[1]
        if batch_size == 0:
            raise ValueError("scores[0] has an empty batch: the loss needs at least one sample")
        for v, (s, z) in enumerate(zip(scores, embeddings)):
            if s.shape != (batch_size, num_prototypes):
                raise ValueError(
                    f"scores[{v}] has shape {tuple(s.shape)}, but scores[0] has {(batch_size, num_prototypes)}: "
                    "every crop needs the same batch size and number of prototypes"
                )
            if z.shape != (batch_size, feat_dim):
                raise ValueError(
                    f"embeddings[{v}] has shape {tuple(z.shape)}, expected {(batch_size, feat_dim)} "
                    "(the batch size of the scores and the width of embeddings[0])"
                )
        if not isinstance(prototypes, Tensor) or prototypes.ndim != 2:
            raise ValueError(f"prototypes must be a (K, D) tensor, got {getattr(prototypes, 'shape', prototypes)}")
        if prototypes.shape[1] != feat_dim:
            raise ValueError(
                f"prototypes have width {prototypes.shape[1]} (shape {tuple(prototypes.shape)}), but the "
                f"embeddings have width {feat_dim}: they must match"
            )
        if prototypes.shape[0] != num_prototypes:
            raise ValueError(
                f"prototypes have {prototypes.shape[0]} rows, but the scores have {num_prototypes} columns: "
                "one score per prototype is expected"
            )
        if self.queue is not None:
            expected = (len(self.crops_for_assign), feat_dim)
            if self.queue.ndim != 3 or (self.queue.shape[0], self.queue.shape[2]) != expected:
                raise ValueError(
                    f"queue has shape {tuple(self.queue.shape)}, expected ({expected[0]}, length, {expected[1]}) "
                    f"(one slot per assigned crop, rows as wide as the embeddings, which have width {feat_dim}): "
                    "a SwAVQueueHandler's feat_dim must be the width of the embeddings"
                )
            if self.queue.shape[1] == 0:
                raise ValueError("queue has length 0: set queue to None to train without a queue")
        return batch_size

    def _raise_non_finite(self, scores: list[Tensor], assigned_embeddings: list[Tensor]) -> None:
        named = [(f"scores[{v}]", s) for v, s in enumerate(scores)]
        named += [(f"embeddings[{c}]", z) for c, z in zip(self.crops_for_assign, assigned_embeddings)]
        flags = non_finite_on_any_rank([t for _, t in named])
        bad = [name for (name, _), flag in zip(named, flags) if flag]
        where = (
            f"in {', '.join(bad)}: the model's output diverged"
            if bad
            else "in the loss although the scores are finite: the scores are too large for the temperature"
        )
        raise ValueError(
            f"non-finite values (NaN or inf) {where} (on this rank or another one); the queue was left unchanged"
        )
