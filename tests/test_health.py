"""SwAVHealthMonitor: its per-epoch metrics, on one process and on two, and its collapse and queue alarms."""

import logging
import math

import ignite.distributed as idist
import pytest
import torch
import torch.nn.functional as F
from helpers import queue_breaking_step, random_crops, spawn_gloo, tiny_swav_model
from ignite.engine import Engine, Events
from torch import nn

from ignite_swav import (
    SwAVEvents,
    SwAVHealthMonitor,
    SwAVLoss,
    SwAVModel,
    SwAVPrototypes,
    SwAVQueueHandler,
    create_swav_trainer,
    diagnose,
)


class Constant(nn.Module):
    """A 'projection' whose embeddings are the same unit vector for every image: forced collapse."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.direction = nn.Parameter(F.normalize(torch.randn(dim), dim=0))
        self.out_dim = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.direction, dim=0).expand(features.shape[0], -1) + 0 * features.sum()


class Distinct(nn.Module):
    """A fixed random projection of the flattened image: every image gets its own embedding, both crops of an
    image almost the same one (a healthy, if untrained, representation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.projection = nn.Linear(3 * 4 * 4, dim)
        self.out_dim = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(features), dim=1)


def pooled_backbone() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())


def image_crops(num_batches: int = 4, batch: int = 16, seed: int = 0) -> list[list[torch.Tensor]]:
    """Two slightly different views of each of ``batch`` random images."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        images = torch.randn(batch, 3, 8, 8, generator=g)
        batches.append([images + 0.01 * torch.randn(images.shape, generator=g) for _ in range(2)])
    return batches


def run(projection: nn.Module, epochs: int, seed: int = 0, **monitor_kwargs):
    torch.manual_seed(seed)
    model = SwAVModel(pooled_backbone(), projection, SwAVPrototypes(projection.out_dim, 20))
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn)
    monitor = SwAVHealthMonitor(loss_fn, **monitor_kwargs)
    monitor.attach(trainer)
    alarms = []
    trainer.add_event_handler(SwAVEvents.COLLAPSE_SUSPECTED, lambda e: alarms.append(e.state.collapse_report))
    per_epoch = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: per_epoch.append(dict(e.state.metrics)))
    trainer.run(image_crops(seed=seed), max_epochs=epochs)
    return per_epoch, alarms, monitor


def test_the_metrics_are_in_the_trainers_metrics_after_every_epoch():
    per_epoch, _, monitor = run(Distinct(8), epochs=2)
    assert len(per_epoch) == 2 and len(monitor.history) == 2
    for metrics in per_epoch:
        assert set(metrics) == {"prototype_usage", "code_entropy", "loss_over_lnk"}
        assert 0 < metrics["prototype_usage"] <= 1 and 0 <= metrics["code_entropy"] <= 1
        assert metrics["loss_over_lnk"] > 0


def test_the_metrics_are_what_they_say_on_a_hand_made_step():
    loss_fn = SwAVLoss(crops_for_assign=(0,))
    prototypes = torch.eye(4)
    embeddings = [torch.eye(4)[[0, 0, 1, 1]], torch.eye(4)[[0, 0, 1, 1]]]  # 4 samples, best prototypes 0 and 1
    scores = [z @ prototypes.t() for z in embeddings]
    engine = Engine(lambda e, b: loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes))
    SwAVHealthMonitor(loss_fn).attach(engine)
    metrics = engine.run([0, 1], max_epochs=1).metrics
    codes = loss_fn.last_step.codes[0]
    entropy = -(codes * codes.log()).sum(dim=1).mean().item() / math.log(4)
    assert metrics["prototype_usage"] == 0.5  # prototypes 0 and 1 of 4
    assert metrics["code_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert metrics["loss_over_lnk"] == pytest.approx(loss_fn.last_step.loss.item() / math.log(4), rel=1e-5)


def test_forced_collapse_raises_the_event_within_two_epochs_and_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="ignite_swav.health"):
        per_epoch, alarms, _ = run(Constant(8), epochs=4)
    assert per_epoch[0]["code_entropy"] == pytest.approx(1.0, abs=1e-4)
    assert per_epoch[0]["prototype_usage"] == pytest.approx(1 / 20)
    assert [a.epoch for a in alarms] == [2], "one alarm, at epoch 2, for the whole episode"
    assert alarms[0].kind == "collapse" and not alarms[0].queue_is_likely_cause
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "collapse suspected at epoch 2" in warnings[0] and "is not improving" in warnings[0]
    # the remedies, in the reference's order; no queue advice in a run without a queue
    order = ["freeze the prototypes for longer", "smaller epsilon", "lower the learning rate"]
    positions = [warnings[0].index(text) for text in order]
    assert positions == sorted(positions) and "queue" not in warnings[0]


class ConstantBackbone(nn.Module):
    """Features that are the same vector for every image (a dead backbone): whatever the head, the embeddings are
    identical, the codes exactly uniform, and the loss above ln K while the prototypes predict unevenly."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Parameter(torch.randn(width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features.expand(images.shape[0], -1) + 0 * images.mean()


class LinearHead(nn.Module):
    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.linear, self.out_dim = nn.Linear(width, dim), dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(features), dim=1)


@pytest.mark.parametrize("head", ["standard", "linear"])
def test_a_collapse_whose_loss_falls_to_ln_k_from_above_is_flagged_within_two_epochs(head):
    """The textbook collapse: constant features, uniform codes, prototypes that keep learning pull the loss down
    to ln K from above; that fall is the collapse settling, not learning."""
    from ignite_swav import SwAVProjectionHead

    torch.manual_seed(3)
    projection = SwAVProjectionHead(16, 32, 8) if head == "standard" else LinearHead(16, 8)
    model = SwAVModel(ConstantBackbone(16), projection, SwAVPrototypes(8, 20))
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), loss_fn)
    monitor = SwAVHealthMonitor(loss_fn)
    monitor.attach(trainer)
    alarms = []
    trainer.add_event_handler(SwAVEvents.COLLAPSE_SUSPECTED, lambda e: alarms.append(e.state.collapse_report))
    trainer.run(image_crops(), max_epochs=3)
    losses = [r["loss_over_lnk"] for r in monitor.history]
    assert losses[0] > 1.05 and losses[1] < losses[0] - 0.01, losses  # above ln K, and falling
    assert all(r["code_entropy"] > 0.999 for r in monitor.history)
    assert [a.epoch for a in alarms] == [2] and alarms[0].kind == "collapse"


def test_a_healthy_run_raises_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="ignite_swav.health"):
        per_epoch, alarms, _ = run(Distinct(8), epochs=4)
    assert alarms == [] and caplog.records == []
    assert all(m["code_entropy"] < 0.9 for m in per_epoch)


def test_a_loss_that_rises_when_the_queue_comes_in_is_blamed_on_the_queue(caplog):
    # A constructed run: two views of an image agree (a low loss) until the queue is in use, then they are
    # unrelated random vectors, so the loss climbs towards ln K.
    loss_fn = SwAVLoss()
    trainer = Engine(queue_breaking_step(loss_fn, seed=1))
    SwAVQueueHandler(loss_fn, queue_length=16, epoch_queue_starts=3).attach(trainer)
    monitor = SwAVHealthMonitor(loss_fn)
    monitor.attach(trainer)
    alarms = []
    trainer.add_event_handler(SwAVEvents.COLLAPSE_SUSPECTED, lambda e: alarms.append(e.state.collapse_report))
    with caplog.at_level(logging.WARNING, logger="ignite_swav.health"):
        trainer.run(range(6), max_epochs=6)
    assert [r["queue_used"] for r in monitor.history] == [False] * 3 + [True] * 3
    assert [a.epoch for a in alarms] == [4] and alarms[0].queue_is_likely_cause
    message = caplog.records[0].getMessage()
    assert "The queue is the likely cause" in message
    assert message.index("shorter queue or start it later") < message.index("freeze the prototypes")


def record(epoch, entropy, loss, usage=0.05, queue_used=False, alarm=False):
    return {
        "epoch": epoch,
        "prototype_usage": usage,
        "code_entropy": entropy,
        "loss_over_lnk": loss,
        "queue_used": queue_used,
        "alarm": alarm,
    }


def test_diagnose_rules_on_histories():
    # at initialisation the signature holds, but a falling loss is not an alarm
    assert diagnose([record(1, 0.96, 1.02)]) is None
    assert diagnose([record(1, 0.96, 1.02), record(2, 0.95, 0.95)]) is None
    # stuck: the signature twice, the loss not falling by 1% of ln K
    assert diagnose([record(1, 0.96, 1.02), record(2, 0.96, 1.015)]).kind == "collapse"
    # the same episode is reported once
    assert diagnose([record(1, 0.96, 1.02), record(2, 0.96, 1.02, alarm=True), record(3, 0.97, 1.03)]) is None
    # appeared after an epoch without it (it had gone), right away
    report = diagnose([record(1, 0.96, 1.0), record(2, 0.5, 0.6), record(3, 0.95, 0.95)])
    assert report.kind == "collapse" and "appeared after an epoch without it" in report.evidence
    # a rise after the queue came in, within the window; not before, not after
    base = [record(1, 0.5, 0.6), record(2, 0.4, 0.5)]
    assert diagnose([*base, record(3, 0.5, 0.56, queue_used=True)]).kind == "queue"
    assert diagnose([*base, record(3, 0.5, 0.54, queue_used=True)]) is None
    late = [*base, record(3, 0.4, 0.5, queue_used=True), record(4, 0.4, 0.5, queue_used=True)]
    assert diagnose([*late, record(5, 0.5, 0.6, queue_used=True)]) is None
    # thresholds are the caller's
    assert diagnose([record(1, 0.96, 1.02), record(2, 0.96, 1.015)], entropy_threshold=0.99) is None
    # the remedies fit the run: queue advice only once a queue came in
    assert not any("queue" in r for r in diagnose([record(1, 0.96, 1.02), record(2, 0.96, 1.015)]).remedies)
    with_queue = [record(1, 0.96, 1.02, queue_used=True), record(2, 0.96, 1.015, queue_used=True)]
    assert any("queue" in r for r in diagnose(with_queue).remedies)
    # uniform codes and a loss falling to ln K from above: the collapse settling, at once
    settling = [record(1, 1.0, 1.58, usage=0.3), record(2, 1.0, 1.07, usage=0.2)]
    assert diagnose(settling).kind == "collapse"
    assert diagnose([record(1, 0.96, 1.58), record(2, 0.96, 1.07)]) is None  # not uniform: a fall is learning
    assert diagnose([record(1, 1.0, 1.2), record(2, 1.0, 0.98)]) is None  # below ln K: not uniform predictions


def test_the_history_is_saved_and_restored():
    _, _, monitor = run(Distinct(8), epochs=2)
    restored = SwAVHealthMonitor(SwAVLoss())
    restored.load_state_dict(monitor.state_dict())
    assert restored.history == monitor.history
    with pytest.raises(ValueError, match="list of per-epoch records with"):
        restored.load_state_dict({"history": [{"epoch": 1}]})


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"loss_fn": torch.nn.MSELoss()}, TypeError, "loss_fn must be an ignite_swav.SwAVLoss, got MSELoss"),
        ({"entropy_threshold": 1.5}, ValueError, r"entropy_threshold must be > 0 and <= 1, got 1.5"),
        ({"entropy_threshold": 0}, ValueError, r"entropy_threshold must be > 0 and <= 1, got 0"),
        ({"loss_threshold": -1}, ValueError, r"loss_threshold must be > 0, got -1"),
        ({"loss_threshold": float("nan")}, ValueError, r"loss_threshold must be > 0, got nan"),
        ({"min_improvement": -0.1}, ValueError, r"min_improvement must be >= 0 and <= 1, got -0.1"),
        ({"queue_rise": "0.05"}, TypeError, r"queue_rise must be a number, got '0.05'"),
        ({"queue_window": 0}, ValueError, r"queue_window must be an integer >= 1, got 0"),
        ({"logger": "health"}, TypeError, r"logger must be a logging.Logger, got str"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        SwAVHealthMonitor(**({"loss_fn": SwAVLoss()} | kwargs))


def test_attaching_twice_or_to_a_non_engine_is_refused():
    monitor = SwAVHealthMonitor(SwAVLoss())
    with pytest.raises(TypeError, match="engine must be an ignite Engine, got str"):
        monitor.attach("trainer")
    engine = Engine(lambda e, b: None)
    monitor.attach(engine)
    with pytest.raises(ValueError, match="already attached to this engine"):
        monitor.attach(engine)
    with pytest.raises(ValueError, match="already attached to another engine"):
        monitor.attach(Engine(lambda e, b: None))


def test_a_monitor_whose_loss_is_not_called_says_so(caplog):
    engine = Engine(lambda e, b: None)
    SwAVHealthMonitor(SwAVLoss()).attach(engine)
    with caplog.at_level(logging.WARNING, logger="ignite_swav.health"):
        state = engine.run([0], max_epochs=1)
    assert "saw no call of its SwAVLoss in epoch 1" in caplog.text
    assert "prototype_usage" not in state.metrics


def test_ignite_loggers_pick_the_metrics_up(tmp_path):
    pytest.importorskip("tensorboard")
    from ignite.handlers import TensorboardLogger
    from ignite.handlers.tensorboard_logger import OutputHandler
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = SwAVModel(pooled_backbone(), Distinct(8), SwAVPrototypes(8, 20))
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), loss_fn)
    SwAVHealthMonitor(loss_fn).attach(trainer)
    tb_logger = TensorboardLogger(log_dir=str(tmp_path))
    tb_logger.attach(trainer, OutputHandler("train", metric_names="all"), Events.EPOCH_COMPLETED)
    trainer.run(image_crops(), max_epochs=2)
    tb_logger.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"train/prototype_usage", "train/code_entropy", "train/loss_over_lnk"} <= set(events.Tags()["scalars"])
    assert len(events.Scalars("train/code_entropy")) == 2


def test_the_monitor_adds_no_host_synchronisation_to_a_step():
    from helpers import DispatchCounter

    model = tiny_swav_model()
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
    SwAVHealthMonitor(loss_fn).attach(trainer)
    counted, counter = [], {}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: counter.update(mode=DispatchCounter().__enter__()))

    @trainer.on(Events.ITERATION_COMPLETED)  # registered after the monitor's handler: its work is counted
    def stop(_):
        counter["mode"].__exit__(None, None, None)
        counted.append(counter["mode"].synchronisations)

    trainer.run([random_crops(4, sizes=(16, 16, 8), seed=i) for i in range(3)], max_epochs=2)
    assert counted == [2] * 6  # the step's own two: the monitor reads the device once per epoch, after the step


def _two_rank_worker(rank: int) -> None:
    torch.manual_seed(0)
    model = idist.auto_model(tiny_swav_model(seed=0))
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), loss_fn)
    SwAVHealthMonitor(loss_fn).attach(trainer)
    batches = [random_crops(4, sizes=(16, 16, 8), seed=i + 100 * rank) for i in range(3)]
    metrics = trainer.run(batches, max_epochs=2).metrics
    values = torch.tensor([metrics[name] for name in ("prototype_usage", "code_entropy", "loss_over_lnk")])
    gathered = idist.all_gather(values.unsqueeze(0))
    assert torch.equal(gathered[0], gathered[1]), "the ranks disagree on the health metrics"
    # usage over all ranks: at least what this rank alone saw
    local = torch.zeros(12)
    local[loss_fn.last_step.scores.argmax(dim=-1).flatten()] = 1
    assert metrics["prototype_usage"] >= local.mean().item() - 1e-6


@pytest.mark.distributed
def test_two_ranks_get_the_same_metrics():
    spawn_gloo(_two_rank_worker)


def test_the_monitor_can_look_every_n_iterations():
    torch.manual_seed(0)
    model = SwAVModel(pooled_backbone(), Constant(8), SwAVPrototypes(8, 20))
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), loss_fn)
    monitor = SwAVHealthMonitor(loss_fn, event=Events.ITERATION_COMPLETED(every=2))
    monitor.attach(trainer)
    alarms = []
    trainer.add_event_handler(SwAVEvents.COLLAPSE_SUSPECTED, lambda e: alarms.append(e.state.iteration))
    trainer.run(image_crops(num_batches=4), max_epochs=1)
    assert [r["iteration"] for r in monitor.history] == [2, 4]  # two windows of 2 iterations in one epoch
    assert alarms == [4]  # the collapse, seen in the second window
    with pytest.raises(TypeError, match="event must be an Ignite event"):
        SwAVHealthMonitor(loss_fn, event="every 100")
