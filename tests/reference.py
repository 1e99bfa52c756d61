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


def log_domain_sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05) -> Tensor:
    """The paper's loop in float64 and in the log domain: the same normalisations as :func:`classic_sinkhorn`,
    finite for any scores and epsilon (the classic loop's ``exp`` overflows float64 beyond 709)."""
    log_q = scores.double().t() / epsilon  # (K, B)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # per prototype
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True)  # per sample
    return log_q.exp().t()


def reference_swav_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[list[Tensor]],
    epochs: int,
    queue_length: int,
    epoch_queue_starts: int,
    freeze_prototypes_iters: int,
    crops_for_assign: tuple[int, ...] = (0, 1),
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
) -> tuple[list[float], Tensor | None]:
    """SwAV training written step by step from the reference's ``train`` function (facebookresearch/swav,
    ``main_swav.py``) on one process: normalise the prototypes, forward, score the queue (once it is full),
    push the assigned crops' embeddings, Sinkhorn on queue + batch keeping the batch rows, swapped prediction
    over the other crops, drop the prototype gradients while frozen, step. Returns the losses and the queue."""
    prototypes = model.prototypes.weight
    queue = None
    losses = []
    step = 0
    for epoch in range(epochs):
        if queue_length > 0 and epoch >= epoch_queue_starts and queue is None:
            queue = torch.zeros(len(crops_for_assign), queue_length, prototypes.shape[1])
        use_the_queue = False
        for crops in batches:
            with torch.no_grad():
                prototypes.copy_(torch.nn.functional.normalize(prototypes, dim=1))
            embeddings, scores = model(crops)
            embedding, output = torch.cat(embeddings).detach(), torch.cat(scores)
            batch, num_crops = crops[0].shape[0], len(crops)
            loss = 0
            for i, crop in enumerate(crops_for_assign):
                with torch.no_grad():
                    out = output[batch * crop : batch * (crop + 1)].detach()
                    if queue is not None:
                        if use_the_queue or not torch.all(queue[i, -1, :] == 0):
                            use_the_queue = True
                            out = torch.cat((queue[i] @ prototypes.detach().t(), out))
                        queue[i, batch:] = queue[i, :-batch].clone()
                        queue[i, :batch] = embedding[crop * batch : (crop + 1) * batch]
                    q = classic_sinkhorn(out, iterations, epsilon)[-batch:].float()
                subloss = 0
                for v in range(num_crops):
                    if v == crop:
                        continue
                    p = torch.softmax(output[batch * v : batch * (v + 1)] / temperature, dim=1)
                    subloss -= torch.mean(torch.sum(q * torch.log(p), dim=1))
                loss += subloss / (num_crops - 1)
            loss /= len(crops_for_assign)
            optimizer.zero_grad()
            loss.backward()
            if step < freeze_prototypes_iters:
                prototypes.grad = None
            optimizer.step()
            step += 1
            losses.append(loss.item())
    return losses, queue
