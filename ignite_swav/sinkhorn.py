"""Sinkhorn-Knopp equipartition of SwAV, distributed over every rank of the ``ignite.distributed`` group."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ignite_swav._distributed import all_reduce, log_sum_over_ranks, max_over_ranks, non_finite_on_any_rank
from ignite_swav._validation import check_int, check_positive_float

__all__ = ["sinkhorn"]

# How the iterations are computed, chosen from a bound on (largest score - smallest score) / epsilon, the
# spread of the exponents; a bound known on the host (cosine scores lie in [-1, 1]) needs no wait for the
# device. Up to 50, the float32 kernel exp(scores / epsilon) (each row shifted by its maximum) keeps every
# entry above e^-50, far from float32's underflow at e^-87: codes within 1e-5 of the float64 loop, measured at
# the limit on cosine scores of exactly +1 and -1 (tests/test_sinkhorn.py). Up to 300, the same kernel in
# float64 (underflow at e^-708). Beyond, the iterations run in the log domain in float64: exact for any
# spread, and slower, as every iteration takes the exp of the whole matrix again.
KERNEL_FLOAT32_SPREAD = 50.0
KERNEL_FLOAT64_SPREAD = 300.0
_TINY = {torch.float32: torch.finfo(torch.float32).tiny, torch.float64: torch.finfo(torch.float64).tiny}


def sinkhorn_method(spread_over_epsilon: float, dtype: torch.dtype = torch.float32) -> tuple[str, torch.dtype]:
    """``("kernel" or "log", dtype)`` of the iterations for exponents that spread over at most
    ``spread_over_epsilon`` (see the constants above); float64 scores are always worked on in float64."""
    if spread_over_epsilon <= KERNEL_FLOAT32_SPREAD and dtype != torch.float64:
        return "kernel", torch.float32
    if spread_over_epsilon <= KERNEL_FLOAT64_SPREAD:
        return "kernel", torch.float64
    return "log", torch.float64


@torch.no_grad()
def codes_from_rows(
    rows: Tensor, batch: int, iterations: int, epsilon: float, method: tuple[str, torch.dtype]
) -> Tensor:
    """Codes of the first ``batch`` rows of each of the ``A`` problems in ``rows`` (``(A, N, K)`` scores in the
    method's dtype; the other rows, such as the queue's, join the equipartition only); ``(A, batch, K)`` float32.

    ``rows`` is overwritten (the kernel is built in it, so that no second matrix of its size is allocated): pass
    a tensor the caller owns. Nothing is read on the host: ``method`` (from :func:`sinkhorn_method`) is chosen
    by the caller. The per-prototype sums are combined over all ranks at every iteration.
    """
    with torch.autocast(device_type=rows.device.type, enabled=False):
        if method[0] == "kernel":
            log_prototype_scale = _kernel_iterations(rows, iterations, epsilon)
            # rows now hold the kernel, each row shifted by its maximum: the codes are its rows scaled by b
            weights = rows[:, :batch].mul(log_prototype_scale.exp_())
            return weights.div_(weights.sum(dim=2, keepdim=True)).float()
        log_prototype_scale = _log_domain_iterations(rows, iterations, epsilon)
        logits = rows[:, :batch].div(epsilon).add_(log_prototype_scale)
        return torch.softmax(logits, dim=2).float()  # in float64: logits may not fit float32's precision


def _kernel_iterations(rows: Tensor, iterations: int, epsilon: float) -> Tensor:
    """log b of the Sinkhorn iterations (``(A, 1, K)``), on the kernel exp(rows / epsilon) built once, in place.

    The plan is ``diag(a) exp(rows / epsilon) diag(b)``: each half-iteration is one batched matrix-vector
    product. The kernel is stored with every row shifted by its maximum (its largest entry is 1); the shift
    moves into the row scale ``a``, kept as a logarithm. Any constant factor of ``b`` cancels in the end: its
    largest entry is kept at 1.
    """
    tiny = _TINY[rows.dtype]
    row_max = rows.amax(dim=2, keepdim=True)  # (A, N, 1)
    kernel = rows.sub_(row_max).div_(epsilon).exp_()  # (A, N, K), in place
    kernel_t = kernel.transpose(1, 2)
    # The row shift goes into the row scale, minus the largest one (a constant factor): (m - max) / epsilon keeps
    # float32's precision near 0, where m / epsilon (up to 1 / epsilon) would blur every row scale by ~1e-6.
    largest = max_over_ranks(row_max.amax(dim=1, keepdim=True))
    log_row_scale = row_max.sub_(largest).div_(epsilon).transpose(1, 2)  # (A, 1, N)
    for iteration in range(iterations):
        shift = log_row_scale.amax(dim=2, keepdim=True)
        prototype_sums = torch.bmm(torch.sub(log_row_scale, shift).exp_(), kernel)  # (A, 1, K)
        log_prototype_sums = log_sum_over_ranks(prototype_sums.clamp_min_(tiny).log_().add_(shift))
        log_prototype_scale = torch.sub(log_prototype_sums.amin(dim=2, keepdim=True), log_prototype_sums)
        if iteration + 1 < iterations:
            row_sums = torch.bmm(log_prototype_scale.exp(), kernel_t)  # (A, 1, N)
            log_row_scale = row_sums.clamp_min_(tiny).log_().neg_()
    return log_prototype_scale


def _log_domain_iterations(rows: Tensor, iterations: int, epsilon: float) -> Tensor:
    """log b of the Sinkhorn iterations (``(A, 1, K)``) in the log domain: exact for any spread of the scores."""
    logits = rows.div(epsilon)  # (A, N, K)
    log_row_scale = torch.zeros_like(logits[:, :, :1])
    for iteration in range(iterations):
        log_prototype_sums = log_sum_over_ranks(torch.logsumexp(logits + log_row_scale, dim=1, keepdim=True))
        log_prototype_scale = log_prototype_sums.amin(dim=2, keepdim=True) - log_prototype_sums
        if iteration + 1 < iterations:
            log_row_scale = -torch.logsumexp(logits + log_prototype_scale, dim=2, keepdim=True)
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

    Numerics: scores whose spread is at most ``50 * epsilon`` are worked on through a float32 kernel, up to
    ``300 * epsilon`` through a float64 one, and beyond in the log domain in float64: the codes are finite, and
    within 1e-4 of the classic float64 loop wherever that loop is finite.

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
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        raise ValueError(
            f"scores must have at least one row and one column (prototype), got shape {tuple(scores.shape)}"
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
    bounds = torch.stack(
        [torch.stack([b.max() for b in nonempty]).max(), -torch.stack([b.min() for b in nonempty]).min()]
    )
    largest, neg_smallest = all_reduce(bounds, op="MAX").tolist()
    magnitude = max(largest, neg_smallest)
    if not math.isfinite(magnitude / epsilon):
        raise ValueError(
            f"epsilon={epsilon} is too small for these scores (largest magnitude {magnitude:.3g}): scores / epsilon "
            "overflows float64; use a larger epsilon or smaller scores"
        )
    return largest + neg_smallest
