"""Regression guards of the GPU-lean step, counted on the CPU: the aten operations one SwAVLoss call dispatches
and the host synchronisations (waits for the device) of the loss and of a training step."""

import ignite.distributed as idist
import pytest
import torch
import torch.nn.functional as F
from helpers import DispatchCounter, queue_of, random_crops, spawn_gloo, tiny_swav_model
from ignite.engine import Events

from ignite_swav import SwAVLoss, SwAVQueueHandler, create_swav_trainer

MAX_LOSS_OPERATIONS = 100
MAX_STEP_SYNCHRONISATIONS = 2  # the check of the step's values after backward, and Ignite's loss.item() output


def reference_case(seed: int = 0):
    """The setting of issue 22: batch 64, 2 + 6 crops, 3000 prototypes of width 128, a full queue of 3840 rows."""
    g = torch.Generator().manual_seed(seed)
    prototypes = F.normalize(torch.randn(3000, 128, generator=g), dim=1)
    embeddings = [F.normalize(torch.randn(64, 128, generator=g), dim=1).requires_grad_() for _ in range(8)]
    queue = F.normalize(torch.randn(2, 3840, 128, generator=g), dim=2)
    return prototypes, embeddings, queue


@pytest.fixture
def accelerator_path(monkeypatch):
    """The loss as it runs on accelerators (all crops' log-softmax in one pass), counted on the CPU; on the CPU
    itself it takes one crop at a time, more operations but faster there (their launches cost nothing)."""
    import ignite_swav.loss

    monkeypatch.setattr(ignite_swav.loss, "_one_crop_at_a_time", lambda crop_scores: False)


@pytest.mark.parametrize("with_queue", [True, False])
def test_one_loss_call_dispatches_at_most_100_operations_and_never_waits_for_the_device(with_queue, accelerator_path):
    prototypes, embeddings, queue = reference_case()
    loss_fn = SwAVLoss()
    loss_fn.queue = queue_of(queue) if with_queue else None
    loss_fn(scores=[z @ prototypes.t() for z in embeddings], embeddings=embeddings, prototypes=prototypes)  # warm
    scores = [z @ prototypes.t() for z in embeddings]
    with DispatchCounter() as forward:
        loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes, check_finite=False)
    with DispatchCounter() as backward:
        loss.backward()
    assert loss_fn.queue_in_use is with_queue
    assert forward.synchronisations == 0, forward.operations
    assert forward.total <= MAX_LOSS_OPERATIONS, forward.operations
    assert backward.total <= 60, backward.operations  # 79 before the crops were batched
    with DispatchCounter() as check:
        loss_fn.raise_if_non_finite()
    assert check.synchronisations == 1


def test_the_cpus_one_crop_at_a_time_path_gives_the_same_loss_and_gradients_and_never_waits(monkeypatch):
    import ignite_swav.loss

    results = []
    for one_at_a_time in (True, False):
        monkeypatch.setattr(ignite_swav.loss, "_one_crop_at_a_time", lambda crop_scores, value=one_at_a_time: value)
        prototypes, embeddings, queue = reference_case()
        loss_fn = SwAVLoss()
        loss_fn.queue = queue_of(queue)
        loss_fn(scores=[z @ prototypes.t() for z in embeddings], embeddings=embeddings, prototypes=prototypes)  # warm
        scores = [z @ prototypes.t() for z in embeddings]
        with DispatchCounter() as forward:
            loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes, check_finite=False)
        for z in embeddings:
            z.grad = None
        loss.backward()
        assert forward.synchronisations == 0, forward.operations
        results.append((loss.detach(), [z.grad for z in embeddings], forward.total))
    (crop_loss, crop_grads, crop_ops), (batched_loss, batched_grads, batched_ops) = results
    assert crop_ops > batched_ops  # the two paths really differ
    torch.testing.assert_close(crop_loss, batched_loss, rtol=1e-6, atol=0)
    for a, b in zip(crop_grads, batched_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def _count_steps(epochs: int = 3) -> list[tuple[int, bool, int]]:
    """(iteration, queue used, host synchronisations) of each step of a run whose queue fills in epoch 2."""
    model = idist.auto_model(tiny_swav_model(seed=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, optimizer, loss_fn, freeze_prototypes_iters=2)
    SwAVQueueHandler(loss_fn, queue_length=8 * idist.get_world_size(), epoch_queue_starts=1).attach(trainer)
    counted, counter = [], {}

    @trainer.on(Events.ITERATION_STARTED)
    def start(_):
        counter["mode"] = DispatchCounter().__enter__()

    @trainer.on(Events.ITERATION_COMPLETED)
    def stop(engine):
        counter["mode"].__exit__(None, None, None)
        counted.append((engine.state.iteration, loss_fn.queue_in_use, counter["mode"].synchronisations))

    batches = [random_crops(4, sizes=(16, 16, 8, 8), seed=i + 10 * idist.get_rank()) for i in range(4)]
    trainer.run(batches, max_epochs=epochs)
    return counted


def _check_step_counts(counted: list[tuple[int, bool, int]]) -> None:
    assert [used for _, used, _ in counted] == [False] * 6 + [True] * 6  # 4 steps a epoch; full after 2 pushes
    # The first step of a run compares the shapes of every process, and the first step with a new queue reads
    # how full it is: once each. Every other step waits for the device exactly twice.
    steady = [syncs for iteration, _, syncs in counted if iteration not in (1, 5)]
    assert steady == [MAX_STEP_SYNCHRONISATIONS] * len(steady), counted
    assert all(syncs <= MAX_STEP_SYNCHRONISATIONS + 1 for _, _, syncs in counted), counted


def test_a_training_step_waits_for_the_device_at_most_twice_with_or_without_the_queue():
    _check_step_counts(_count_steps())


def _two_process_worker(rank: int) -> None:
    _check_step_counts(_count_steps())


@pytest.mark.distributed
def test_a_training_step_on_two_processes_waits_for_the_device_at_most_twice():
    spawn_gloo(_two_process_worker)
