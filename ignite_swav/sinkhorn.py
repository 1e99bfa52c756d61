"""Sinkhorn-Knopp equipartition of SwAV, distributed over every rank of the ``ignite.distributed`` group."""

from __future__ import annotations

import math

import torch
from ignite import distributed as idist
from torch import Tensor

from ignite_swav._distributed import (
    all_reduce,
    log_sum_over_ranks,
    max_over_ranks,
    non_finite_on_any_rank,
    values_by_rank,
)
from ignite_swav._validation import check_int, check_positive_float

__all__ = ["sinkhorn"]

# How the iterations are computed, chosen from a bound on (largest score - smallest score) / epsilon, the
# spread of the exponents; a bound known on the host (cosine scores lie in [-1, 1]) needs no wait for the
# device. Up to 80, the kernel exp(scores / epsilon), each row shifted by its maximum, is built once: every
# entry stays above e^-80, a normal float32 (underflow starts at e^-87), and the codes are within 1e-5 of the
# float64 loop (tests/test_sinkhorn.py, at the limit, on cosine scores of exactly +1 and -1). Beyond, a prototype
# far from every row would lose its whole column to underflow (codes off by 0.2 at epsilon 0.01, measured):
# the first normalisation of the prototypes is then computed in the log domain and absorbed into the kernel
# ("stabilised"), after which every column of the kernel holds an entry of at least 1 / rows, so the remaining
# scalings stay within a few powers of ten and what underflows is negligible: within 1e-5 of the float64 loop
# for any spread tested, at twice the kernel's cost instead of the log domain's five times. Both in float32 up
# to a spread of 10,000 (float32 keeps the exponents to 1e-3 there), float64 beyond or for float64 scores.
KERNEL_SPREAD = 80.0
FLOAT32_SPREAD = 10_000.0
_TINY = {torch.float32: torch.finfo(torch.float32).tiny, torch.float64: torch.finfo(torch.float64).tiny}


def sinkhorn_method(spread_over_epsilon: float, dtype: torch.dtype = torch.float32) -> tuple[str, torch.dtype]:
    """``("kernel" or "stabilised", dtype)`` of the iterations for exponents that spread over at most
    ``spread_over_epsilon`` (see the constants above); float64 scores are always worked on in float64."""
    wide = spread_over_epsilon > FLOAT32_SPREAD or dtype == torch.float64
    return (
        "kernel" if spread_over_epsilon <= KERNEL_SPREAD else "stabilised"
    ), torch.float64 if wide else torch.float32


@torch.no_grad()
def codes_from_rows(
    rows: Tensor,
    batch: int,
    iterations: int,
    epsilon: float,
    method: tuple[str, torch.dtype],
    scratch: Tensor | None = None,
) -> Tensor:
    """Codes of the first ``batch`` rows of each of the ``A`` problems in ``rows`` (``(A, N, K)`` scores in the
    method's dtype; the other rows, such as the queue's, join the equipartition only); ``(A, batch, K)`` float32.

    ``rows`` is overwritten (the kernel is built in it, so that no second matrix of its size is allocated): pass
    a tensor the caller owns. The stabilised method needs a second matrix of that shape and dtype: ``scratch``
    (overwritten; allocated here when ``None``). Nothing is read on the host: ``method`` (from
    :func:`sinkhorn_method`) is chosen by the caller. The per-prototype sums are combined over all ranks at every
    iteration.
    """
    with torch.autocast(device_type=rows.device.type, enabled=False):
        if method[0] == "kernel":
            log_row_scale = _kernel(rows, epsilon)
            log_prototype_scale = _scaling_iterations(rows, log_row_scale, iterations)
        else:
            log_row_scale = _stabilised_kernel(rows, epsilon, torch.empty_like(rows) if scratch is None else scratch)
            log_prototype_scale = _scaling_iterations(rows, log_row_scale, iterations - 1)
        # rows now hold the kernel, each row shifted by its maximum: the codes are its rows scaled by b
        weights = rows[:, :batch].mul(log_prototype_scale.exp_())
        return weights.div_(weights.sum(dim=2, keepdim=True)).float()


def _kernel(rows: Tensor, epsilon: float) -> Tensor:
    """Turn ``rows`` into the kernel exp(rows / epsilon), each row shifted by its maximum (its largest entry is
    1), in place; returns the log row scale ``(A, 1, N)`` that the shift moved out of it."""
    row_max = rows.amax(dim=2, keepdim=True)  # (A, N, 1)
    rows.sub_(row_max).div_(epsilon).exp_()
    # The shift goes into the row scale, minus the largest one (a constant factor): (m - max) / epsilon keeps
    # float32's precision near 0, where m / epsilon (up to 1 / epsilon) would blur every row scale by ~1e-6.
    largest = max_over_ranks(_amax_or_minus_infinity(row_max, dim=1))
    return row_max.sub_(largest).div_(epsilon).transpose(1, 2)


def _stabilised_kernel(rows: Tensor, epsilon: float, scratch: Tensor) -> Tensor:
    """The first normalisation of the prototypes in the log domain (exact whatever the spread), absorbed into the
    kernel built in ``rows`` (each row shifted by its maximum); returns the log row scale of the next step, the
    normalisation of the rows. ``scratch`` (same shape) is overwritten."""
    logits = rows.div_(epsilon)  # (A, N, K)
    # log of each prototype's sum over the rows of every rank, each column shifted by its maximum over all ranks
    top = max_over_ranks(_amax_or_minus_infinity(logits, dim=1))  # (A, 1, K)
    column_sums = torch.sub(logits, top, out=scratch).exp_().sum(dim=1, keepdim=True)
    log_sums = log_sum_over_ranks(column_sums.clamp_min_(_TINY[rows.dtype]).log_().add_(top))
    logits.add_(log_sums.amin(dim=2, keepdim=True) - log_sums)  # the prototypes' scale absorbed
    rows.sub_(logits.amax(dim=2, keepdim=True)).exp_()
    return rows.sum(dim=2).clamp_min_(_TINY[rows.dtype]).log_().neg_().unsqueeze(1)


def _amax_or_minus_infinity(values: Tensor, dim: int) -> Tensor:
    """``values.amax(dim, keepdim=True)``, or -inf where ``dim`` is empty (a rank without rows)."""
    if values.shape[dim] == 0:
        shape = list(values.shape)
        shape[dim] = 1
        return values.new_full(shape, -math.inf)
    return values.amax(dim=dim, keepdim=True)


def _scaling_iterations(kernel: Tensor, log_row_scale: Tensor, iterations: int) -> Tensor:
    """log b of the Sinkhorn iterations (``(A, 1, K)``) on ``kernel`` from the log row scale ``(A, 1, N)``.

    The plan is ``diag(a) kernel diag(b)``: each half-iteration is one batched matrix-vector product. Row scales
    are kept as logarithms; any constant factor of ``b`` cancels in the end: its largest entry is kept at 1.
    """
    tiny = _TINY[kernel.dtype]
    kernel_t = kernel.transpose(1, 2)
    log_prototype_scale = kernel.new_zeros((kernel.shape[0], 1, kernel.shape[2]))
    for iteration in range(iterations):
        if kernel.shape[1] == 0:  # a rank without rows: it adds nothing to the sums, and takes part in combining them
            log_prototype_sums = log_sum_over_ranks(torch.full_like(log_prototype_scale, -math.inf))
        else:
            shift = log_row_scale.amax(dim=2, keepdim=True)
            prototype_sums = torch.bmm(torch.sub(log_row_scale, shift).exp_(), kernel)  # (A, 1, K)
            log_prototype_sums = log_sum_over_ranks(prototype_sums.clamp_min_(tiny).log_().add_(shift))
        log_prototype_scale = torch.sub(log_prototype_sums.amin(dim=2, keepdim=True), log_prototype_sums)
        if iteration + 1 < iterations:
            row_sums = torch.bmm(log_prototype_scale.exp(), kernel_t)  # (A, 1, N)
            log_row_scale = row_sums.clamp_min_(tiny).log_().neg_()
    return log_prototype_scale


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


def _check_max_abs_score(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"max_abs_score must be a positive finite number (1.0 for cosine scores), got {value!r}")
    return float(value)


def sinkhorn(
    scores: Tensor,
    extra_scores: Tensor | None = None,
    iterations: int = 3,
    epsilon: float = 0.05,
    *,
    max_abs_score: float | None = None,
) -> Tensor:
    """SwAV codes for the rows of ``scores`` by Sinkhorn-Knopp equipartition over the rows of all ranks; the
    rows of ``extra_scores`` (the queue's scores) join the equipartition but get no code.

    This is the paper's algorithm written on scaling vectors: the transport plan is ``diag(a) exp(scores /
    epsilon) diag(b)``, each iteration updates ``b`` (one entry per prototype) and ``a`` (one per row), and
    only the rows of ``scores`` are materialised at the end. In exact arithmetic it is the classic loop
    ``Q /= Q.sum(1); Q /= K; Q /= Q.sum(0); Q /= B`` started from ``exp(scores / epsilon)``. When an
    ``ignite.distributed`` group is active, the per-prototype sums are all-reduced at every iteration, so 2
    ranks holding half the rows each get exactly the codes one process computes on all rows. Runs outside
    autocast and without gradient.

    Numerics: scores whose spread is at most ``80 * epsilon`` are worked on through the kernel
    ``exp(scores / epsilon)``, and beyond through a stabilised kernel (the first normalisation in the log domain),
    in float32 up to a spread of ``10,000 * epsilon`` (cosine scores at any epsilon from 0.0002) and in float64
    beyond or for float64 scores: the codes are finite, and within 1e-4 of the classic float64 loop wherever that
    loop is finite.

    Args:
        scores: ``(N, K)`` scores of N samples against K prototypes on this rank.
        extra_scores: ``(L, K)`` scores of rows that only join the equipartition (SwAV's queue), or ``None``.
        iterations: number of Sinkhorn-Knopp iterations (SwAV uses 3).
        epsilon: entropic regularisation; the kernel is ``exp(scores / epsilon)`` (SwAV uses 0.05).
        max_abs_score: a bound on ``|score|`` known in advance (1.0 for cosine similarities of unit vectors). With
            it, nothing is read back from the device (no host synchronisation, no check of the values); without
            it, the scores' range and finiteness are read, over all ranks.

    Returns:
        ``(N, K)`` float32 codes; every row sums to 1.

    Example:
        >>> import torch
        >>> from ignite_swav import sinkhorn
        >>> codes = sinkhorn(torch.randn(8, 4))
        >>> codes.shape, torch.allclose(codes.sum(dim=1), torch.ones(8))
        (torch.Size([8, 4]), True)
        >>> queue = torch.randn(32, 4)
        >>> sinkhorn(torch.randn(8, 4), queue).shape  # only the rows of scores get codes
        torch.Size([8, 4])
    """
    iterations = check_int("iterations", iterations, 1)
    epsilon = check_positive_float("epsilon", epsilon)
    _check_scores("scores", scores)
    # on several processes a rank may hold no row (its shard was all padding): it still takes part
    rows_of_all = scores.shape[0] if idist.get_world_size() == 1 else sum(r[0] for r in values_by_rank([len(scores)]))
    if rows_of_all == 0 or scores.shape[1] == 0:
        raise ValueError(
            f"scores must have at least one row and one column (prototype), got shape {tuple(scores.shape)}"
            + ("" if idist.get_world_size() == 1 else " (and no row on any other process)")
        )
    if extra_scores is not None:
        _check_scores("extra_scores", extra_scores, scores.shape[1])
    blocks = [scores] if extra_scores is None else [scores, extra_scores]
    if max_abs_score is not None:
        spread = 2 * _check_max_abs_score(max_abs_score)
    else:
        spread = _spread_over_ranks(blocks, epsilon)
    method = sinkhorn_method(spread / epsilon, scores.dtype)
    rows = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    rows = rows.detach().to(method[1], copy=True).unsqueeze(0)  # a copy: the codes are computed in it
    return codes_from_rows(rows, scores.shape[0], iterations, epsilon, method).squeeze(0)


def _spread_over_ranks(blocks: list[Tensor], epsilon: float) -> float:
    """Largest minus smallest score over all ranks (one read of the device); refuses non-finite scores and an
    epsilon that makes ``scores / epsilon`` overflow."""
    names = ["scores", "extra_scores"]
    if any(non_finite_on_any_rank(blocks)):
        bad = [name for name, flag in zip(names, non_finite_on_any_rank(blocks)) if flag]
        raise ValueError(
            f"{' and '.join(bad)} hold NaN or infinite values (on this rank or another one): no codes can be computed"
        )
    dtype = torch.float64 if blocks[0].dtype == torch.float64 else torch.float32
    nonempty = [b.detach().to(dtype) for b in blocks if b.numel() > 0]
    if nonempty:
        bounds = torch.stack(
            [torch.stack([b.max() for b in nonempty]).max(), -torch.stack([b.min() for b in nonempty]).min()]
        )
    else:  # a rank without rows
        bounds = torch.full((2,), -math.inf, dtype=dtype, device=blocks[0].device)
    largest, neg_smallest = all_reduce(bounds, op="MAX").tolist()
    magnitude = max(largest, neg_smallest)
    if not math.isfinite(magnitude / epsilon):
        raise ValueError(
            f"epsilon={epsilon} is too small for these scores (largest magnitude {magnitude:.3g}): scores / epsilon "
            "overflows float64; use a larger epsilon or smaller scores"
        )
    return largest + neg_smallest
