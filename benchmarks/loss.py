#!/usr/bin/env python
"""Time one forward+backward of the SwAV loss: ignite-swav's SwAVLoss against a loop written from the
paper's formulas (matrix rescaled twice per Sinkhorn iteration) and, when installed, lightly's SwaVLoss
(``pip install lightly --no-deps``) and, with ``--against COMMIT``, ignite-swav as it was at that commit.
Interleaved, in one process, on the same inputs; prints medians.

    python benchmarks/loss.py                      # the reference case: batch 64, 2+6 crops, K 3000, queue 3840
    python benchmarks/loss.py --grid               # batch {32, 64, 256} x queue {0, 3840, 16384} x K {512, 3000}
    python benchmarks/loss.py --against dac2513    # beside the loss before the crops were batched (issue 22)
    python benchmarks/loss.py --epsilon 0.03 --against 1e28175  # the main job's epsilon, before float32 (issue 28)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _machine import describe
from _previous import load_package_at

from ignite_swav import SwAVLoss, SwAVQueue

FEAT_DIM = 128
TEMPERATURE, EPSILON, ITERATIONS = 0.1, 0.05, 3


def paper_loop(scores, embeddings, prototypes, queue):
    """SwAV's loss as the paper's pseudo-code writes it: queue rows prepended, the matrix rescaled in place."""
    batch = scores[0].shape[0]
    loss = 0.0
    for slot, crop in enumerate((0, 1)):
        with torch.no_grad():
            out = scores[crop].detach()
            if queue is not None:
                out = torch.cat([queue[slot] @ prototypes.t(), out])
            q = torch.exp(out / EPSILON).t()
            q /= q.sum()
            k, b = q.shape
            for _ in range(ITERATIONS):
                q /= q.sum(dim=1, keepdim=True)
                q /= k
                q /= q.sum(dim=0, keepdim=True)
                q /= b
            q = (q * b).t()[-batch:]
        sub = 0.0
        for v in range(len(scores)):
            if v != crop:
                sub -= (q * F.log_softmax(scores[v] / TEMPERATURE, dim=1)).sum(dim=1).mean()
        loss += sub / (len(scores) - 1)
    return loss / 2


def lightly_loss() -> Callable | None:
    try:
        from lightly.loss import SwaVLoss
    except Exception:
        return None
    loss = SwaVLoss(temperature=TEMPERATURE, sinkhorn_epsilon=EPSILON, sinkhorn_iterations=ITERATIONS)

    def run(scores, embeddings, prototypes, queue):
        queue_outputs = None if queue is None else [q @ prototypes.t() for q in queue]
        return loss(scores[:2], scores[2:], queue_outputs)

    return run


def ours(loss_class: type = SwAVLoss) -> Callable:
    loss = loss_class(crops_for_assign=(0, 1), temperature=TEMPERATURE, epsilon=EPSILON, sinkhorn_iterations=ITERATIONS)

    def run(scores, embeddings, prototypes, queue):
        # a full queue that is not modified between runs: SwAVLoss pushes the batch, so its rows are set back in
        # place (the same rows: their fill, read at the first run, is not read again)
        if queue is None:
            loss.queue = None
        elif loss.queue is None or loss.queue.rows is None or loss.queue.rows.shape != queue.shape:
            loss.queue = SwAVQueue(queue.shape[1])
            loss.queue.rows = queue.clone()
        else:
            loss.queue.rows.copy_(queue)
        return loss(scores=scores, embeddings=embeddings, prototypes=prototypes)

    return run


def make_inputs(batch: int, queue_length: int, num_prototypes: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(num_prototypes, FEAT_DIM, generator=g), dim=1).to(device)
    embeddings = [F.normalize(torch.randn(batch, FEAT_DIM, generator=g), dim=1).to(device) for _ in range(8)]
    queue = F.normalize(torch.randn(2, queue_length, FEAT_DIM, generator=g), dim=2) if queue_length else None
    return embeddings, prototypes, None if queue is None else queue.to(device)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_case(
    candidates: dict[str, Callable],
    batch: int,
    queue_length: int,
    num_prototypes: int,
    repeats: int,
    device: str = "cpu",
):
    embeddings, prototypes, queue = make_inputs(batch, queue_length, num_prototypes, device=device)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    values: dict[str, float] = {}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in candidates.items():
            z = [e.clone().requires_grad_() for e in embeddings]
            scores = [e @ prototypes.t() for e in z]
            _synchronize(device)
            start = time.perf_counter()
            value = fn(scores, z, prototypes, queue)
            value.backward()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
            values[name] = value.item()
    return {name: statistics.median(t[1:]) for name, t in times.items()}, values


def main() -> None:
    global EPSILON  # the candidates read it
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", action="store_true", help="the whole grid instead of the reference case")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--verbose", action="store_true", help="print the loss values too")
    parser.add_argument("--against", metavar="COMMIT", help="also time SwAVLoss as it was at this git commit")
    parser.add_argument("--epsilon", type=float, default=EPSILON, help=f"Sinkhorn epsilon (default {EPSILON})")
    args = parser.parse_args()
    EPSILON = args.epsilon
    candidates: dict[str, Callable] = {"ignite-swav": ours(), "paper loop": paper_loop}
    if args.against:
        candidates[f"@{args.against}"[:12]] = ours(load_package_at(args.against).SwAVLoss)
    lightly = lightly_loss()
    if lightly is not None:
        candidates["lightly"] = lightly
    print(describe(args.device))
    print(f"one forward+backward, 2+6 crops, feat_dim 128, epsilon {EPSILON}, median of {args.repeats} runs (ms)")
    cases = list(itertools.product((32, 64, 256), (0, 3840, 16384), (512, 3000))) if args.grid else [(64, 3840, 3000)]
    header = f"{'batch':>5} {'queue':>6} {'K':>5} " + " ".join(f"{name:>12}" for name in candidates)
    print(header + "   max |loss difference|")
    for batch, queue_length, num_prototypes in cases:
        medians, values = time_case(candidates, batch, queue_length, num_prototypes, args.repeats, args.device)
        spread = max(values.values()) - min(values.values())
        if args.verbose:
            print("  loss values:", {name: round(v, 7) for name, v in values.items()})
        cells = " ".join(f"{medians[name] * 1000:12.1f}" for name in candidates)
        print(f"{batch:>5} {queue_length:>6} {num_prototypes:>5} {cells}   {spread:.1e}")


if __name__ == "__main__":
    main()
