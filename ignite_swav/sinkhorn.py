"""Sinkhorn-Knopp equipartition of SwAV, distributed over every rank of the ``ignite.distributed`` group."""

from __future__ import annotations

import math

import torch
from ignite import distributed as idist
from torch import Tensor

from ignite_swav._validation import check_int, check_positive_float

__all__ = ["sinkhorn"]

_TINY = torch.finfo(torch.float32).tiny


def non_finite_flags(tensors: list[Tensor]) -> Tensor:
    """A float tensor with one flag per tensor, 1 where it holds a NaN or an infinity on this rank or any other.

    It stays on the device (no wait for it): read it with ``.tolist()`` where a host synchronisation is cheap.
    Every rank gets the same flags, so every rank raises together instead of leaving the others waiting in
    the next collective.
    """
    flags = torch.stack([~torch.isfinite(t).all() for t in tensors]).to(torch.float32)
    return idist.all_reduce(flags, op="MAX")


def values_by_rank(values: list[int]) -> list[tuple[int, ...]]:
    """``values`` of every rank, in rank order (one all_gather; on one process, no collective)."""
    if idist.get_world_size() == 1:
        return [tuple(values)]
    gathered = idist.all_gather(torch.tensor([values], device=idist.device()))
    return [tuple(row) for row in gathered.view(-1, len(values)).tolist()]


def non_finite_on_any_rank(tensors: list[Tensor]) -> list[bool]:
    """For each tensor, whether it holds a NaN or an infinity on this rank or any other rank (see
    :func:`non_finite_flags`; this one waits for the answer)."""
    return [bool(f) for f in non_finite_flags(tensors).tolist()]


def _check_scores(name: str, scores: object, num_prototypes: int | None = None) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, K), got {type(scores).__name__}")
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape (N, K) (rows, prototypes), got shape {tuple(scores.shape)}")
    if num_prototypes is not None and scores.shape[1] != num_prototypes:
        raise ValueError(f"{name} must have {num_prototypes} columns (prototypes), got shape {tuple(scores.shape)}")
    if not (scores.is_floating_point()):
        raise TypeError(f"{name} must be a floating point tensor, got dtype {scores.dtype}")
    if scores.device.type == "meta":
        raise ValueError(f"{name} is on the 'meta' device, which holds no values: codes need real scores")
    return scores


def _log_sum_over_ranks(log_values: Tensor) -> Tensor:
    """``log(sum_r exp(log_values_r))`` over the ranks, element-wise, without overflow: two all-reduces of the
    vector (its maximum, then the sum of ``exp`` below it), so each rank sends O(len) values whatever the world size."""
    if idist.get_world_size() == 1:
        return log_values  # not only the collectives: the exp and log around them would change nothing either
    top = idist.all_reduce(log_values.clone(), op="MAX")
    total = idist.all_reduce(torch.exp(log_values - top), op="SUM")
    return total.log_().add_(top)


# Above this spread of scores / epsilon, exp(scores / epsilon) spans more than float32 can hold with margin
# (exp underflows below e^-87): the iterations then run in the log domain, in float64.
_KERNEL_SPREAD = 40.0


@torch.no_grad()
def sinkhorn_codes(
    scores: Tensor, extra_scores: Tensor | None = None, iterations: int = 3, epsilon: float = 0.05
) -> Tensor:
    """Codes for the rows of ``scores``; the rows of ``extra_scores`` (the queue) join the equipartition only.

    This is the algorithm of the SwAV paper written on scaling vectors: the transport plan is
    ``diag(a) exp(scores / epsilon) diag(b)``, and each iteration updates ``a`` (one entry per row) and ``b``
    (one per prototype), instead of rescaling the whole matrix twice; only the rows of ``scores`` are
    materialised at the end. In exact arithmetic the result is the one of the classic loop
    ``Q /= Q.sum(1); Q /= K; Q /= Q.sum(0); Q /= B`` started from ``exp(scores / epsilon)``. The per-prototype
    sums are combined over all ranks at every iteration (two all-reduces of K values), so the equipartition
    runs over the rows of all ranks.

    Numerics: when the scores spread over at most ``40 * epsilon`` (cosine scores at SwAV's epsilon 0.05),
    the kernel ``exp`` of the scores, each row shifted by its maximum, is computed once in float32 and each
    half-iteration is one matrix-vector product. A wider spread (small epsilon, unnormalised scores)
    would make that kernel underflow, so the iterations then run in the log domain in float64, slower but
    exact wherever the classic float64 loop is finite. The scaling vectors are kept as logarithms and the
    codes are a softmax of ``scores / epsilon + log b``: scores of any range give finite codes whose rows sum
    to 1.
    """
    iterations = check_int("iterations", iterations, 1)
    epsilon = check_positive_float("epsilon", epsilon)
    _check_scores("scores", scores)
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(
            f"scores must have at least one row and one column (prototype), got shape {tuple(scores.shape)}"
        )
    blocks = [scores]
    if extra_scores is not None:
        _check_scores("extra_scores", extra_scores, scores.shape[1])
        if extra_scores.shape[0] > 0:
            blocks.append(extra_scores)

    # float64 scores are worked on in float64 (they may not fit float32); everything else in float32
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=scores.device.type, enabled=False):
        blocks = [block.detach().to(dtype) for block in blocks]
        row_max = [block.amax(dim=1) for block in blocks]
        # the largest score and minus the smallest, over all ranks (every rank takes the same path below)
        bounds = torch.stack(
            [torch.stack([m.max() for m in row_max]).max(), -torch.stack([block.min() for block in blocks]).min()]
        )
        global_max, neg_global_min = idist.all_reduce(bounds, op="MAX").unbind()
        largest = max(float(global_max), float(neg_global_min))
        # (non-finite scores give non-finite codes here: the caller reports them, naming where they came from)
        if math.isfinite(largest) and not math.isfinite(largest / epsilon):
            raise ValueError(
                f"epsilon={epsilon} is too small for these scores (largest magnitude {largest:.3g}): scores / epsilon "
                "overflows float64; use a larger epsilon or smaller scores"
            )
        if float(global_max + neg_global_min) <= _KERNEL_SPREAD * epsilon:
            log_prototype_scale = _kernel_iterations(blocks, row_max, global_max, iterations, epsilon)
            return torch.softmax(blocks[0].div(epsilon).add_(log_prototype_scale), dim=1).float()
        log_prototype_scale = _log_domain_iterations(blocks, iterations, epsilon)
        return torch.softmax(blocks[0].double().div(epsilon).add_(log_prototype_scale), dim=1).float()


def _kernel_iterations(
    blocks: list[Tensor], row_max: list[Tensor], global_max: Tensor, iterations: int, epsilon: float
) -> Tensor:
    """log b of the Sinkhorn iterations, on a float32 kernel computed once (scores of a narrow spread)."""
    # exp((s - max_row) / eps): one pass that writes the kernel; every row's largest entry is 1 and, the spread
    # being at most 40 epsilon, none is below e^-40.
    kernels = [torch.sub(block, m.unsqueeze(1)).div_(epsilon).exp_() for block, m in zip(blocks, row_max)]
    # The classic loop starts from exp((s - global_max) / eps): the row shift moves into the row scale.
    log_row_scales = [torch.sub(m, global_max).div_(epsilon) for m in row_max]
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
            log_row_scales = [torch.mv(kernel, prototype_scale).clamp_min_(_TINY).log_().neg_() for kernel in kernels]
    return log_prototype_scale


def _log_domain_iterations(blocks: list[Tensor], iterations: int, epsilon: float) -> Tensor:
    """log b of the Sinkhorn iterations in the log domain and float64: exact for any spread of the scores."""
    logits = [block.double().div(epsilon) for block in blocks]
    log_row_scales = [torch.zeros(block.shape[0], dtype=torch.float64, device=block.device) for block in blocks]
    for iteration in range(iterations):
        local = torch.logsumexp(
            torch.stack([torch.logsumexp(z + log_a.unsqueeze(1), dim=0) for z, log_a in zip(logits, log_row_scales)]),
            dim=0,
        )
        log_prototype_sums = _log_sum_over_ranks(local)
        log_prototype_scale = log_prototype_sums.min() - log_prototype_sums
        if iteration + 1 < iterations:
            log_row_scales = [-torch.logsumexp(z + log_prototype_scale, dim=1) for z in logits]
    return log_prototype_scale


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
