"""Plain implementations written from the SwAV paper's formulas, used as independent oracles in tests."""

from __future__ import annotations

import torch
from torch import Tensor


def classic_sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """The paper's loop on the whole matrix, in float64: rows normalised per prototype, then per sample."""
    q = torch.exp(scores.double() / epsilon).t()  # (K, B)
    q /= q.sum()
    num_prototypes, num_samples = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= num_samples
    return (q * num_samples).t()


def classic_swav_loss(
    scores: list[Tensor],
    crops_for_assign: tuple[int, ...],
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    queue_scores: list[Tensor] | None = None,
) -> Tensor:
    """Swapped prediction loss by the paper's double loop, in float64; queue scores prepended per assigned crop."""
    batch = scores[0].shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for slot, crop in enumerate(crops_for_assign):
        out = scores[crop].detach().double()
        if queue_scores is not None:
            out = torch.cat([queue_scores[slot].double(), out])
        codes = classic_sinkhorn(out, iterations, epsilon)[-batch:]
        sub = torch.zeros((), dtype=torch.float64)
        for v in range(len(scores)):
            if v == crop:
                continue
            log_p = torch.log_softmax(scores[v].double() / temperature, dim=1)
            sub -= (codes * log_p).sum(dim=1).mean()
        total += sub / (len(scores) - 1)
    return total / len(crops_for_assign)
