"""torch.compile on the loss and the step: the loss's forward with the queue in use is one graph without a break,
the step breaks only where torch itself does (zero_grad, backward, the optimizer's step), and a compiled run
trains as the eager one."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import queue_of, random_crops, tiny_swav_model
from ignite.engine import Engine, Events

from ignite_swav import SwAVLoss, create_swav_trainer, swav_training_step

pytestmark = pytest.mark.slow
PACKAGE = Path(__file__).resolve().parents[1] / "ignite_swav"


def loss_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(30, 8, generator=g), dim=1)
    embeddings = [F.normalize(torch.randn(16, 8, generator=g), dim=1) for _ in range(4)]
    return embeddings, [z @ prototypes.t() for z in embeddings], prototypes  # the model's order


def full_loss(epsilon: float = 0.05) -> SwAVLoss:
    loss_fn = SwAVLoss(epsilon=epsilon)
    loss_fn.queue = queue_of(F.normalize(torch.randn(2, 32, 8, generator=torch.Generator().manual_seed(9)), dim=2))
    loss_fn(*loss_inputs())  # reads the fill once: full, in use from now on
    assert loss_fn.queue_in_use
    return loss_fn


@pytest.mark.parametrize("epsilon", [0.05, 0.02])  # the kernel and the stabilised Sinkhorn
def test_the_losss_forward_with_the_queue_in_use_is_one_graph_without_a_break(epsilon):
    loss_fn = full_loss(epsilon)
    embeddings, scores, prototypes = loss_inputs(1)
    explained = torch._dynamo.explain(lambda z, s, p: loss_fn(z, s, p, check_finite=False))(
        embeddings, scores, prototypes
    )
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_the_steps_graph_breaks_are_torchs_own_never_in_the_librarys_code():
    model = tiny_swav_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    loss_fn = SwAVLoss()
    step = swav_training_step(model, optimizer, loss_fn, output_transform=lambda *args: None)
    engine = Engine(step)
    loss_fn.queue = queue_of(F.normalize(torch.randn(2, 8, 8), dim=2))
    batches = [random_crops(4, sizes=(16, 16, 8, 8), seed=i) for i in range(3)]
    engine.run(batches, max_epochs=1)
    explained = torch._dynamo.explain(step)(engine, batches[0])
    lines = {
        (Path(frame.filename).name, frame.line.strip())
        for reason in explained.break_reasons
        for frame in reason.user_stack[-1:]
        if Path(frame.filename).parent == PACKAGE
    }
    # zero_grad (skipped by dynamo) and optimizer.step (torch breaks before it on purpose) show up as their callers'
    # lines or inside torch; backward() cannot be traced in the same frame as the forward
    allowed = {"scaled.backward()", "optimizer.zero_grad(set_to_none=True)", "optimizer.step()"}
    assert {line for _, line in lines} <= allowed, lines
    assert explained.graph_break_count <= 3, explained.break_reasons


@pytest.mark.soak  # inductor compiles for about 40 s on 2 cores
def test_compile_model_trains_and_the_compiled_loss_equals_the_eager_one():
    model = tiny_swav_model()
    loss_fn = SwAVLoss(epsilon=0.02)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    trainer = create_swav_trainer(model, optimizer, loss_fn, compile_model=True)
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    trainer.run([random_crops(4, sizes=(16, 16, 8, 8), seed=i) for i in range(3)], max_epochs=1)
    assert len(outputs) == 3 and all(math.isfinite(x) for x in outputs)
    assert set(model.state_dict()) == set(tiny_swav_model().state_dict())  # checkpoints of the plain module

    embeddings, scores, prototypes = loss_inputs(2)
    compiled = loss_fn._computation(scores, embeddings, prototypes, None)
    eager = loss_fn._compute(scores, embeddings, prototypes, None)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_model_the_compiler_cannot_compile_is_one_line_naming_the_fix():
    def failing_backend(graph, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    model = tiny_swav_model()
    trainer = create_swav_trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), SwAVLoss(), compile_model={"backend": failing_backend}
    )
    with pytest.raises(ValueError, match=r"torch.compile could not compile the model .*pass compile_model=False"):
        trainer.run([random_crops(4, sizes=(16, 16, 8, 8))], max_epochs=1)
    with pytest.raises(ValueError, match="compile_model=.*torch.compile refused it"):
        create_swav_trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), SwAVLoss(), compile_model={"mode": "fast"}
        )
