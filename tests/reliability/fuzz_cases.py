"""Random SwAV settings and inputs for the fuzz tests, and the check each of them must pass: a valid result
(finite loss, codes that sum to 1, a queue that round-trips through its state) or an error raised by
ignite_swav itself with a message, never an exception from deep inside torch."""

from __future__ import annotations

import traceback
from dataclasses import dataclass

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from ignite.engine import Engine

from ignite_swav import SwAVLoss, SwAVQueueHandler, sinkhorn


@dataclass
class Case:
    batch: int
    num_crops: int
    crops_for_assign: list
    num_prototypes: int
    feat_dim: int
    queue_length: int
    epsilon: float
    temperature: float
    iterations: int
    score_scale: float
    seed: int


# Each setting is valid most of the time and sometimes not, so that a drawn case is often valid as a whole.
cases = st.builds(
    Case,
    batch=st.sampled_from([1, 2, 3, 4, 5, 6, 0]),
    num_crops=st.sampled_from([2, 3, 4, 2, 3, 1]),
    crops_for_assign=st.sampled_from([[0, 1], [0], [1], [0, 1], [1, 0], [0, 2], [0, 1], [], [0, 0], [-1], [5]]),
    num_prototypes=st.integers(1, 12),
    feat_dim=st.integers(1, 6),
    queue_length=st.integers(0, 24),
    epsilon=st.sampled_from([0.01, 0.05, 0.5, 1.0, 0.05, 0.0]),
    temperature=st.sampled_from([0.05, 0.1, 1.0, 0.1, 0.0]),
    iterations=st.sampled_from([1, 2, 3, 4, 3, 0]),
    score_scale=st.sampled_from([1e-6, 1.0, 1e3, 1e6, 1.0]),
    seed=st.integers(0, 1000),
)


def raised_by_us(error: BaseException) -> bool:
    """Whether the exception was raised in ignite_swav's own code (a checked, explained error)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "ignite_swav" in frames[-1].filename and bool(str(error))


def run_case(case: Case) -> str:
    """Train a few steps of the loss and the queue handler with ``case``; returns "valid" or "refused"."""
    try:
        loss = SwAVLoss(
            crops_for_assign=case.crops_for_assign,
            temperature=case.temperature,
            epsilon=case.epsilon,
            sinkhorn_iterations=case.iterations,
        )
        handler = SwAVQueueHandler(
            loss,
            queue_length=case.queue_length,
            epoch_queue_starts=0,
            batch_size=max(case.batch, 1),
            feat_dim=case.feat_dim,
        )
    except (ValueError, TypeError) as error:
        assert raised_by_us(error), f"{case}: {type(error).__name__} from outside ignite_swav: {error}"
        return "refused"

    generator = torch.Generator().manual_seed(case.seed + 7919 * idist.get_rank())
    prototypes = F.normalize(torch.randn(case.num_prototypes, case.feat_dim, generator=generator), dim=1)
    losses = []

    def step(engine, _):
        embeddings = [
            F.normalize(torch.randn(case.batch, case.feat_dim, generator=generator), dim=1)
            for _ in range(case.num_crops)
        ]
        scores = [e @ prototypes.t() * case.score_scale for e in embeddings]
        value = loss(scores=scores, embeddings=embeddings, prototypes=prototypes)
        losses.append(float(value))
        codes = sinkhorn(scores[0], iterations=max(case.iterations, 1), epsilon=max(case.epsilon, 0.01))
        assert torch.allclose(codes.sum(dim=1), torch.ones(case.batch), atol=1e-4), case

    engine = Engine(step)
    handler.attach(engine)
    try:
        engine.run(range(3), max_epochs=2)
    except (ValueError, TypeError) as error:
        assert raised_by_us(error), f"{case}: {type(error).__name__} from outside ignite_swav: {error}"
        return "refused"
    assert all(torch.isfinite(torch.tensor(v)) for v in losses), (case, losses)
    if handler.queue.rows is not None:
        assert bool(torch.isfinite(handler.queue.rows).all())
        state = handler.state_dict()
        restored = SwAVQueueHandler(
            SwAVLoss(crops_for_assign=case.crops_for_assign),
            queue_length=case.queue_length,
            batch_size=max(case.batch, 1),
            feat_dim=case.feat_dim,
        )
        restored.load_state_dict(state)
        assert torch.equal(restored.queue.rows, handler.queue.rows), case
    return "valid"
