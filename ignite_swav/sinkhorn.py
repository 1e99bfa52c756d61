"""Sinkhorn-Knopp equipartition of SwAV, distributed over every rank of the ``ignite.distributed`` group."""

from __future__ import annotations

import torch
from ignite import distributed as idist
from torch import Tensor

from ignite_swav._validation import check_int, check_positive_float

__all__ = ["sinkhorn"]

_TINY = torch.finfo(torch.float32).tiny


def all_reduce(tensor: Tensor, op: str = "SUM") -> Tensor:
    """``idist.all_reduce`` when a group with more than one rank is active, else ``tensor`` itself."""
    if idist.get_world_size() > 1:
        tensor = idist.all_reduce(tensor, op=op)
    return tensor


def non_finite_on_any_rank(tensors: list[Tensor]) -> list[bool]:
    """For each tensor, whether it holds a NaN or an infinity on this rank or any other rank.

    Every rank gets the same answer, so every rank raises together instead of leaving the others waiting in
    the next collective.
    """
    flags = torch.stack([~torch.isfinite(t).all() for t in tensors]).to(torch.float32)
    return [bool(f) for f in all_reduce(flags, op="MAX").tolist()]


def _check_scores(name: str, scores: object, num_prototypes: int | None = None) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, K), got {type(scores).__name__}")
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape (N, K) (rows, prototypes), got shape {tuple(scores.shape)}")
    if num_prototypes is not None and scores.shape[1] != num_prototypes:
        raise ValueError(f"{name} must have {num_prototypes} columns (prototypes), got shape {tuple(scores.shape)}")
    if not (scores.is_floating_point()):
        raise TypeError(f"{name} must be a floating point tensor, got dtype {scores.dtype}")
    return scores


def _log_sum_over_ranks(log_values: Tensor) -> Tensor:
    """``log(sum_r exp(log_values_r))`` over the ranks, element-wise, without overflow (one all_gather)."""
    world_size = idist.get_world_size()
    if world_size == 1:
        return log_values
    gathered = idist.all_gather(log_values.unsqueeze(0)).view(world_size, -1)
    return torch.logsumexp(gathered, dim=0)


@torch.no_grad()
def sinkhorn_codes(
    scores: Tensor, extra_scores: Tensor | None = None, iterations: int = 3, epsilon: float = 0.05
) -> Tensor:
    """Codes for the rows of ``scores``; the rows of ``extra_scores`` (the queue) join the equipartition only.

    This is the algorithm of the SwAV paper written on scaling vectors: the transport plan is
    ``diag(a) exp(scores / epsilon) diag(b)``, and each iteration updates ``a`` (one entry per row) and ``b``
    (one per prototype) with one matrix-vector product each, instead of rescaling the whole matrix twice; only
    the rows of ``scores`` are materialised at the end. In exact arithmetic the result is the one of the
    classic loop ``Q /= Q.sum(1); Q /= K; Q /= Q.sum(0); Q /= B`` started from ``exp(scores / epsilon)``.
    The per-prototype sums are combined over all ranks at every iteration, so the equipartition runs over the
    rows of all ranks.

    Numerics: each row is shifted by its own maximum before ``exp`` (no overflow), the scaling vectors are
    kept as logarithms, and the codes are a softmax of ``scores / epsilon + log b``, so scores of any range
    give finite codes whose rows sum to 1.
    """
    iterations = check_int("iterations", iterations, 1)
    epsilon = check_positive_float("epsilon", epsilon)
    _check_scores("scores", scores)
    if scores.shape[0] == 0:
        raise ValueError(f"scores must have at least one row, got shape {tuple(scores.shape)}")
    blocks = [scores]
    if extra_scores is not None:
        _check_scores("extra_scores", extra_scores, scores.shape[1])
        if extra_scores.shape[0] > 0:
            blocks.append(extra_scores)

    with torch.autocast(device_type=scores.device.type, enabled=False):
        blocks = [block.detach().float() for block in blocks]
        kernels, log_row_scales = [], []
        row_max = [block.amax(dim=1) for block in blocks]
        global_max = all_reduce(torch.stack([m.max() for m in row_max]).max(), op="MAX")
        for block, block_max in zip(blocks, row_max):
            # exp((s - max_row) / eps): one pass that writes the kernel; every row's largest entry is 1.
            kernels.append(torch.sub(block, block_max.unsqueeze(1)).div_(epsilon).exp_())
            # The classic loop starts from exp((s - global_max) / eps): the row shift moves into the row scale.
            log_row_scales.append(torch.sub(block_max, global_max).div_(epsilon))

        for iteration in range(iterations):
            shift = torch.stack([log_a.max() for log_a in log_row_scales]).max()
            prototype_sums = sum(
                torch.mv(kernel.t(), torch.sub(log_a, shift).exp_()) for kernel, log_a in zip(kernels, log_row_scales)
            )
            log_prototype_sums = _log_sum_over_ranks(prototype_sums.clamp_min_(_TINY).log_().add_(shift))
            # Any constant factor of b cancels in the end: keep its largest entry at 1.
            log_prototype_scale = log_prototype_sums.min() - log_prototype_sums
            if iteration + 1 < iterations:
                prototype_scale = log_prototype_scale.exp()
                log_row_scales = [
                    torch.mv(kernel, prototype_scale).clamp_min_(_TINY).log_().neg_() for kernel in kernels
                ]

        return torch.softmax(blocks[0].div(epsilon).add_(log_prototype_scale), dim=1)


def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """SwAV codes for the local prototype scores, by Sinkhorn-Knopp equipartition over the rows of all ranks.

    When an ``ignite.distributed`` group is active, the per-prototype sums are all-reduced at every iteration,
    so 2 ranks holding half the rows each get exactly the codes one process computes on all rows. Runs in
    float32 outside autocast and without gradient.

    Args:
        scores: ``(N, K)`` scores of N samples against K prototypes on this rank.
        iterations: number of Sinkhorn-Knopp iterations (SwAV uses 3).
        epsilon: entropic regularisation; the kernel is ``exp(scores / epsilon)`` (SwAV uses 0.05).

    Returns:
        ``(N, K)`` float32 codes; every row sums to 1.

    Example:
        >>> import torch
        >>> from ignite_swav import sinkhorn
        >>> codes = sinkhorn(torch.randn(8, 4))
        >>> codes.shape, torch.allclose(codes.sum(dim=1), torch.ones(8))
        (torch.Size([8, 4]), True)
    """
    _check_scores("scores", scores)
    if non_finite_on_any_rank([scores])[0]:
        raise ValueError("scores hold NaN or infinite values (on this rank or another one): no codes can be computed")
    return sinkhorn_codes(scores, None, iterations=iterations, epsilon=epsilon)
