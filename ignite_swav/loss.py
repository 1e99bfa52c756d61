"""SwAV's swapped-prediction loss, with the optional queue of embeddings from earlier batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ignite_swav._validation import check_crops_for_assign, check_int, check_positive_float
from ignite_swav.sinkhorn import non_finite_on_any_rank, sinkhorn_codes

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

    def extra_repr(self) -> str:
        return (
            f"crops_for_assign={self.crops_for_assign}, temperature={self.temperature}, epsilon={self.epsilon}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}"
        )

    def forward(self, scores: Sequence[Tensor], embeddings: Sequence[Tensor], prototypes: Tensor) -> Tensor:
        """Loss of one step; pushes the assigned crops' embeddings into ``queue`` when there is one.

        Args:
            scores: one ``(B, K)`` tensor of prototype scores per crop.
            embeddings: one ``(B, D)`` tensor of L2-normalised embeddings per crop, in the same order.
            prototypes: ``(K, D)`` prototype weight (L2-normalised rows).

        Returns:
            The scalar loss (float32).
        """
        batch_size = self._check_inputs(scores, embeddings, prototypes)
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
        if any(non_finite_on_any_rank([loss.detach(), *assigned_embeddings])):
            self._raise_non_finite(scores, embeddings, assigned)
        if self.queue is not None:
            for slot, crop_embeddings in enumerate(assigned_embeddings):
                self._push(slot, crop_embeddings, batch_size)
        return loss

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
    def _push(self, slot: int, embeddings: Tensor, batch_size: int) -> None:
        # Newest rows first: shift the queue down by the batch and write the batch on top.
        queue = self.queue
        assert queue is not None
        length = queue.shape[1]
        pushed = min(batch_size, length)
        if pushed < length:
            queue[slot, pushed:] = queue[slot, : length - pushed].clone()
        queue[slot, :pushed] = embeddings[:pushed].to(queue.dtype)

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
                    "(one slot per assigned crop, rows as wide as the embeddings)"
                )
            if self.queue.shape[1] == 0:
                raise ValueError("queue has length 0: set queue to None to train without a queue")
        return batch_size

    @staticmethod
    def _raise_non_finite(scores: Sequence[Tensor], embeddings: Sequence[Tensor], assigned: list[int]) -> None:
        named = [(f"scores[{v}]", s) for v, s in enumerate(scores)]
        named += [(f"embeddings[{c}]", embeddings[c]) for c in assigned]
        flags = non_finite_on_any_rank([t.detach() for _, t in named])
        bad = [name for (name, _), flag in zip(named, flags) if flag]
        where = (
            f"in {', '.join(bad)}: the model's output diverged"
            if bad
            else "in the loss although the scores are finite: the scores are too large for the temperature"
        )
        raise ValueError(
            f"non-finite values (NaN or inf) {where} (on this rank or another one); the queue was left unchanged"
        )
