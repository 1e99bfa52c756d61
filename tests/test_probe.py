"""OnlineLinearProbe: trained beside SwAV without touching it, evaluated as an Ignite metric, saved, on two ranks."""

import ignite.distributed as idist
import pytest
import torch
from helpers import spawn_gloo, tiny_swav_model
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from ignite_swav import OnlineLinearProbe, SwAVLoss, create_knn_evaluator, create_swav_trainer


def labelled_crops(num_batches=6, batch=16, seed=0):
    """Crops of images whose class (0, 1, 2) sets their colour: linearly separable features."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        labels = torch.randint(0, 3, (batch,), generator=g)
        colour = torch.eye(3)[labels].view(batch, 3, 1, 1) * 2
        crops = [colour + 0.3 * torch.randn(batch, 3, size, size, generator=g) for size in (16, 16, 8)]
        batches.append((crops, labels))
    return batches


def heldout(seed=9):
    return [(crops[0], labels) for crops, labels in labelled_crops(2, seed=seed)]


def trainer_with_probe(seed=0, lr=0.05):
    model = tiny_swav_model(seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    trainer = create_swav_trainer(model, optimizer, SwAVLoss())
    probe = OnlineLinearProbe(model.backbone, num_classes=3, lr=0.05)
    probe.attach(trainer)
    return trainer, model, optimizer, probe


def test_the_probe_learns_the_labels_and_is_scored_on_held_out_images():
    trainer, model, optimizer, probe = trainer_with_probe()
    trainer.run(labelled_crops(), max_epochs=4)
    accuracy = probe.create_evaluator().run(heldout()).metrics["online_linear_top1"]
    assert accuracy >= 0.9
    assert model.training, "the evaluator restores the backbone's mode"
    probe_parameters = {id(p) for p in probe.classifier.parameters()}
    assert not probe_parameters & {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_the_probe_sends_no_gradient_into_the_backbone():
    trainer, model, _, probe = trainer_with_probe(lr=0.0)
    grads = {}

    @trainer.on(Events.ITERATION_COMPLETED)  # after the probe's step (attached first)
    def keep(_):
        grads.update({n: p.grad.clone() for n, p in model.backbone.named_parameters()})

    trainer.run(labelled_crops(1), max_epochs=1)
    # the same step again without the probe: the same backbone gradients
    fresh = tiny_swav_model(seed=0)
    trainer2 = create_swav_trainer(fresh, torch.optim.SGD(fresh.parameters(), lr=0.0), SwAVLoss())
    trainer2.run(labelled_crops(1), max_epochs=1)
    for name, parameter in fresh.backbone.named_parameters():
        assert torch.equal(parameter.grad, grads[name]), name


def test_the_probe_leaves_the_runs_random_stream_and_weights_as_they_are():
    """Attaching the probe must not change what SwAV trains: its classifier is made without drawing from the global
    random stream that the crops and the data order come from."""
    runs = {}
    for with_probe in (False, True):
        model = tiny_swav_model(seed=0)
        trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), SwAVLoss())
        if with_probe:
            OnlineLinearProbe(model.backbone, num_classes=3).attach(trainer)
        draws = []
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda _, draws=draws: draws.append(torch.rand(1).item()))
        torch.manual_seed(0)
        trainer.run(labelled_crops(3), max_epochs=2)
        runs[with_probe] = draws, [p.detach().clone() for p in model.parameters()]
    assert runs[True][0] == runs[False][0]
    for with_probe, without in zip(runs[True][1], runs[False][1]):
        assert torch.equal(with_probe, without)


def test_the_probe_is_scored_in_the_knn_evaluators_pass():
    trainer, model, _, probe = trainer_with_probe()
    trainer.run(labelled_crops(), max_epochs=2)
    evaluator = create_knn_evaluator(model.backbone, heldout(seed=5), k=3)
    probe.attach_metric(evaluator)
    metrics = evaluator.run(heldout()).metrics
    assert set(metrics) == {"knn_top1", "online_linear_top1"}
    assert metrics["online_linear_top1"] == probe.create_evaluator().run(heldout()).metrics["online_linear_top1"]


def test_the_probe_resumes_from_a_checkpoint(tmp_path):
    trainer, model, optimizer, probe = trainer_with_probe()
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "probe": probe}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False)))
    trainer.run(labelled_crops(), max_epochs=1)
    restored = OnlineLinearProbe(tiny_swav_model(seed=0).backbone, num_classes=3)
    Checkpoint.load_objects({"probe": restored}, str(tmp_path / "checkpoint_6.pt"))
    features = torch.randn(4, 16)
    assert torch.equal(restored.predict(features), probe.predict(features))
    assert restored.optimizer.state_dict()["state"].keys() == probe.optimizer.state_dict()["state"].keys()
    with pytest.raises(ValueError, match=r"classifier of shape \(5, 16\), expected \(3, features\)"):
        restored.load_state_dict({"classifier": {"weight": torch.zeros(5, 16)}, "optimizer": None})


def test_a_data_set_without_labels_is_one_clear_error():
    trainer, *_ = trainer_with_probe()
    crops_only = [crops for crops, _ in labelled_crops(1)]
    with pytest.raises(
        ValueError,
        match="OnlineLinearProbe needs a 1-D tensor of integer labels for each batch, got no labels in the trainer",
    ):
        trainer.run(crops_only, max_epochs=1)
    trainer, *_ = trainer_with_probe()
    unlabeled = [(crops, torch.full_like(labels, -1)) for crops, labels in labelled_crops(1)]  # STL-10's marks
    with pytest.raises(ValueError, match=r"saw no labelled image in epoch 1 \(every label was -1, unlabelled\)"):
        trainer.run(unlabeled, max_epochs=1)


def test_unlabelled_images_are_not_trained_on_and_a_bad_label_in_any_batch_is_one_error_at_the_epochs_end():
    trainer, *_, probe = trainer_with_probe()
    data = labelled_crops(4)
    data[1] = (data[1][0], torch.tensor([-1, -1, 0, 1]))  # STL-10's unlabelled images beside labelled ones
    trainer.run(data, max_epochs=1)  # trains, says nothing
    trained = probe.classifier.weight.detach().clone()
    data[2] = (data[2][0], torch.tensor([0, 1, 7, 2]))  # a label beyond num_classes=3, in the third batch
    with pytest.raises(ValueError, match=r"got 1 label\(s\) outside 0..2 in epoch 2 \(on this rank or another one\)"):
        trainer.run(data, max_epochs=2)
    assert trainer.state.iteration == 8  # not a device-side assert in the batch: the epoch ran, the label ignored
    assert not torch.equal(trained, probe.classifier.weight)


def test_bad_settings_and_uses_are_refused():
    backbone = tiny_swav_model().backbone
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got 1"):
        OnlineLinearProbe(backbone, num_classes=1)
    with pytest.raises(TypeError, match="backbone must be a torch.nn.Module"):
        OnlineLinearProbe("resnet", num_classes=3)
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        OnlineLinearProbe(backbone, num_classes=3, lr=0)
    with pytest.raises(RuntimeError, match="has not been trained yet"):
        OnlineLinearProbe(backbone, num_classes=3).predict(torch.zeros(2, 16))
    probe = OnlineLinearProbe(backbone, num_classes=3)
    probe.attach(Engine(lambda e, b: None))
    with pytest.raises(ValueError, match="already attached"):
        probe.attach(Engine(lambda e, b: None))
    # attached to an engine that does not run the backbone
    lonely = OnlineLinearProbe(tiny_swav_model().backbone, num_classes=3)
    engine = Engine(lambda e, b: None)
    lonely.attach(engine)
    with pytest.raises(ValueError, match="saw no call of its backbone in this iteration"):
        engine.run([(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))], max_epochs=1)


def _two_rank_worker(rank):
    torch.manual_seed(rank)  # other classifier initialisations: the probe broadcasts rank 0's
    model = idist.auto_model(tiny_swav_model(seed=0))
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), SwAVLoss())
    probe = OnlineLinearProbe(model.module.backbone if hasattr(model, "module") else model.backbone, num_classes=3)
    probe.attach(trainer)
    trainer.run(labelled_crops(seed=rank), max_epochs=2)
    weights = idist.all_gather(probe.classifier.weight.detach().unsqueeze(0))
    assert torch.allclose(weights[0], weights[1]), "every rank holds the same classifier"


@pytest.mark.distributed
def test_two_ranks_train_one_classifier():
    spawn_gloo(_two_rank_worker)


def test_a_probe_state_of_another_width_or_with_optimizer_buffers_of_other_shapes_is_refused_at_load():
    import copy

    trainer, *_, probe = trainer_with_probe()
    trainer.run(labelled_crops(2), max_epochs=1)
    state = probe.state_dict()
    wider = copy.deepcopy(state)
    wider["classifier"]["weight"] = torch.zeros(3, 20)
    with pytest.raises(ValueError, match="classifier of 20 features, this probe's backbone gives 16"):
        probe.load_state_dict(wider)
    reshaped = copy.deepcopy(state)
    reshaped["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"the probe's 'optimizer': 'exp_avg' of parameter 0 is \(3, 5\)"):
        probe.load_state_dict(reshaped)
    # a probe not built yet learns the width at its first step: another backbone's is named there
    model = tiny_swav_model(width=8)
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), SwAVLoss())
    fresh = OnlineLinearProbe(model.backbone, num_classes=3)
    fresh.load_state_dict(state)
    fresh.attach(trainer)
    with pytest.raises(ValueError, match="takes 16 features .a restored state.., the backbone gives 8"):
        trainer.run(labelled_crops(1), max_epochs=1)
