"""The names 1.0 changed keep working for one release, each with a DeprecationWarning naming the new one; the names
0.2 deprecated are gone."""

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

import ignite_swav
from ignite_swav import SwAVLoss, SwAVQueue, SwAVQueueHandler


def test_the_queue_handler_s_loss_is_loss_fn_and_its_methods_are_named_after_their_events():
    loss_fn = SwAVLoss()
    with pytest.warns(DeprecationWarning, match=r"SwAVQueueHandler\(loss=...\) is now SwAVQueueHandler\(loss_fn=...\)"):
        handler = SwAVQueueHandler(loss=loss_fn, queue_length=8)
    assert handler.loss_fn is loss_fn
    with pytest.warns(DeprecationWarning, match="SwAVQueueHandler.loss is now SwAVQueueHandler.loss_fn; the old name"):
        assert handler.loss is loss_fn
    with pytest.raises(TypeError, match="give loss_fn .*not both"), pytest.warns(DeprecationWarning):
        SwAVQueueHandler(loss_fn, loss=loss_fn)
    engine = Engine(lambda e, b: None)
    handler.attach(engine)
    for old, new, event in [
        ("on_started", "started", Events.STARTED),
        ("on_epoch_started", "epoch_started", Events.EPOCH_STARTED),
        ("on_iteration_completed", "iteration_completed", Events.ITERATION_COMPLETED),
    ]:
        assert engine.has_event_handler(getattr(handler, new), event)
        with pytest.warns(DeprecationWarning, match=f"SwAVQueueHandler.{old} is now SwAVQueueHandler.{new}"):
            getattr(handler, old)(engine)


def test_the_loss_takes_the_model_s_order_and_a_call_in_the_old_positional_order_is_named():
    prototypes = F.normalize(torch.randn(10, 4), dim=1)
    embeddings = [F.normalize(torch.randn(6, 4), dim=1) for _ in range(3)]
    scores = [z @ prototypes.t() for z in embeddings]
    by_keyword = SwAVLoss()(scores=scores, embeddings=embeddings, prototypes=prototypes)
    in_order = SwAVLoss()(embeddings, scores, prototypes)  # (embeddings, scores): the model's output, as it is
    assert torch.equal(by_keyword, in_order)
    with pytest.raises(TypeError, match=r"SwAVLoss takes \(embeddings, scores, prototypes\) since 1.0"):
        SwAVLoss()(scores, embeddings, prototypes)


def test_0_2_s_queue_attributes_of_the_loss_still_work_with_a_warning():
    prototypes = F.normalize(torch.randn(10, 4), dim=1)
    embeddings = [F.normalize(torch.randn(4, 4), dim=1) for _ in range(2)]
    loss_fn = SwAVLoss()
    rows = F.normalize(torch.randn(2, 8, 4), dim=2)
    with pytest.warns(DeprecationWarning, match=r"assigning a tensor to SwAVLoss.queue is now SwAVLoss\(queue="):
        loss_fn.queue = rows  # 0.2: the queue's rows, given to the loss
    assert isinstance(loss_fn.queue, SwAVQueue) and loss_fn.queue.rows is rows and loss_fn.queue.length == 8
    loss_fn(embeddings, [z @ prototypes.t() for z in embeddings], prototypes)
    with pytest.warns(DeprecationWarning, match="SwAVLoss.use_queue is now SwAVLoss.queue_in_use"):
        assert loss_fn.use_queue is True
    assert torch.equal(loss_fn.queue.rows[:, :4], torch.stack(embeddings))


def test_the_names_deprecated_in_0_2_are_gone():
    assert not hasattr(ignite_swav, "multicrop_collate")
