import gc
import logging
import math
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import random_crops, tiny_swav_model
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver

from ignite_swav import (
    BatchedMultiCrop,
    OnlineLinearProbe,
    PreemptionHandler,
    SwAVEvents,
    SwAVHealthMonitor,
    SwAVLoss,
    SwAVQueueGuard,
    SwAVQueueHandler,
    create_swav_trainer,
    prepare_image_batch,
    prepare_multicrop_batch,
)


def fake_loader(num_batches: int = 4, batch: int = 4, with_targets: bool = True, seed: int = 0):
    batches = []
    for i in range(num_batches):
        crops = random_crops(batch, sizes=(16, 16, 8, 8), seed=seed + i)
        batches.append((crops, torch.arange(batch)) if with_targets else crops)
    return batches


def sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def trainer_with_queue(seed: int = 0, **trainer_kwargs: Any) -> tuple[Engine, dict]:
    """A trainer (``create_swav_trainer``'s keyword arguments) with a queue of 8 rows from the second epoch;
    returns it and its objects to checkpoint."""
    model = tiny_swav_model(seed=seed)
    loss_fn = SwAVLoss()
    optimizer = sgd(model)
    trainer = create_swav_trainer(model, optimizer, loss_fn, **trainer_kwargs)
    handler = SwAVQueueHandler(loss_fn, queue_length=8, epoch_queue_starts=1, batch_size=4, feat_dim=8)
    handler.attach(trainer)
    return trainer, {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": handler}


def test_a_run_with_queue_and_checkpoint_over_several_epochs(tmp_path: Path):
    trainer, to_save = trainer_with_queue()
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False)))
    outputs, first_use = [], []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: outputs.append((e.state.output, e.state.queue_in_use))
    )
    trainer.add_event_handler(SwAVEvents.QUEUE_FIRST_USED, lambda e: first_use.append(e.state.iteration))
    trainer.run(fake_loader(), max_epochs=3)

    assert all(isinstance(loss, float) and math.isfinite(loss) for loss, _ in outputs)
    assert [in_use for _, in_use in outputs] == [False] * 6 + [True] * 2 + [True] * 4
    assert first_use == [7]
    assert (tmp_path / "checkpoint_12.pt").exists()

    # resume from the checkpoint into other objects: the queue is back and used at once
    trainer2, to_load = trainer_with_queue(seed=1)
    Checkpoint.load_objects(to_load, tmp_path / "checkpoint_12.pt")
    assert torch.equal(to_load["queue_handler"].queue.rows, to_save["queue_handler"].queue.rows)
    for a, b in zip(to_save["model"].parameters(), to_load["model"].parameters()):
        assert torch.equal(a, b)
    resumed = []
    trainer2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: resumed.append(e.state.queue_in_use))
    trainer2.run(fake_loader(), max_epochs=4)
    assert resumed == [True] * 4


def test_prototypes_are_frozen_for_the_first_iterations_and_then_train():
    model = tiny_swav_model()
    optimizer = sgd(model, lr=0.5)
    trainer = create_swav_trainer(model, optimizer, SwAVLoss(), freeze_prototypes_iters=3)
    start = F.normalize(model.prototypes.weight.detach().clone(), dim=1)
    weights, has_state = [], []

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        weights.append(model.prototypes.weight.detach().clone())
        has_state.append(model.prototypes.weight in optimizer.state)

    trainer.run(fake_loader(6), max_epochs=1)
    for it in range(3):
        # only the per-step normalisation touched them: no gradient, no momentum, no weight decay
        assert (weights[it] - start).abs().max() < 1e-6
        assert not has_state[it]
    assert (weights[3] - start).abs().max() > 1e-3
    assert has_state[3]
    # the other parameters trained from the first step
    assert model.backbone.conv.weight in optimizer.state


def test_freezing_given_in_epochs_is_the_same_as_in_iterations_of_the_run_s_epoch_length():
    def trained_weights(**freeze):
        model = tiny_swav_model()
        create_swav_trainer(model, sgd(model, lr=0.5), SwAVLoss(), **freeze).run(fake_loader(6), max_epochs=2)
        return model.prototypes.weight.detach().clone()

    half_an_epoch = trained_weights(freeze_prototypes_epochs=0.5)  # 3 of the epoch's 6 iterations
    assert torch.equal(half_an_epoch, trained_weights(freeze_prototypes_iters=3))
    assert not torch.equal(half_an_epoch, trained_weights(freeze_prototypes_iters=2))
    assert torch.equal(trained_weights(freeze_prototypes_epochs=0), trained_weights())


def test_no_freeze_trains_the_prototypes_at_once():
    model = tiny_swav_model()
    start = F.normalize(model.prototypes.weight.detach().clone(), dim=1)
    trainer = create_swav_trainer(model, sgd(model, lr=0.5), SwAVLoss())
    trainer.run(fake_loader(1), max_epochs=1)
    assert (model.prototypes.weight - start).abs().max() > 1e-3


def test_bfloat16_autocast_on_cpu_trains_with_a_float32_loss():
    model = tiny_swav_model()
    losses = []
    trainer = create_swav_trainer(model, sgd(model), SwAVLoss(), amp_mode="amp", amp_dtype=torch.bfloat16)

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        losses.append(engine.state.output)

    trainer.run(fake_loader(3, with_targets=False), max_epochs=1)
    assert all(math.isfinite(v) for v in losses)
    # same first step in float32, up to bfloat16's precision
    reference = tiny_swav_model()
    ref_trainer = create_swav_trainer(reference, sgd(reference), SwAVLoss())
    ref_trainer.run(fake_loader(1, with_targets=False), max_epochs=1)
    assert math.isclose(losses[0], ref_trainer.state.output, rel_tol=0.05)


def test_custom_output_and_model_transforms():
    model = tiny_swav_model()
    seen = {}

    def output_transform(x, y, y_pred, loss):
        seen["n"] = (len(x), y.tolist(), len(y_pred[0]), len(y_pred[1]))
        return {"loss": loss.item()}

    trainer = create_swav_trainer(
        model, sgd(model), SwAVLoss(), model_transform=lambda out: (out[0], out[1]), output_transform=output_transform
    )
    trainer.run(fake_loader(1), max_epochs=1)
    assert isinstance(trainer.state.output["loss"], float)
    assert seen["n"] == (4, [0, 1, 2, 3], 4, 4)


def test_prepare_batch_accepts_crops_or_a_crops_target_pair():
    crops = random_crops(2, sizes=(8, 4))
    x, y = prepare_multicrop_batch(crops)
    assert all(a is b for a, b in zip(x, crops)) and y is None
    x, y = prepare_multicrop_batch((crops, torch.tensor([3, 4])))
    assert all(a is b for a, b in zip(x, crops)) and y.tolist() == [3, 4]
    with pytest.raises(TypeError, match="list of crop batches, or a \\(crops, target\\) pair; got Tensor"):
        prepare_multicrop_batch(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"freeze_prototypes_iters": -1}, ValueError, "freeze_prototypes_iters must be an integer >= 0, got -1"),
        ({"freeze_prototypes_epochs": -1}, ValueError, "freeze_prototypes_epochs must be a finite number >= 0"),
        ({"freeze_prototypes_epochs": "1"}, TypeError, "freeze_prototypes_epochs must be a finite number >= 0"),
        (
            {"freeze_prototypes_epochs": 1, "freeze_prototypes_iters": 5},
            ValueError,
            r"give freeze_prototypes_iters \(5\) or freeze_prototypes_epochs \(1\), not both",
        ),
        ({"amp_mode": "apex"}, ValueError, "amp_mode must be None or 'amp'"),
        ({"amp_mode": "amp", "device": "meta"}, ValueError, "device='meta' holds no values: train on 'cpu' or 'cuda'"),
        ({"amp_mode": "amp", "amp_dtype": torch.float64}, ValueError, "amp_dtype=torch.float64 cannot be used"),
        ({"amp_dtype": torch.bfloat16}, ValueError, "only used with amp_mode='amp'"),
        (
            {"amp_mode": "amp", "scaler": True},
            ValueError,
            "scaler is for float16 autocast .amp_mode=.amp., amp_dtype=torch.float16",
        ),
        ({"scaler": 1}, TypeError, "scaler must be a bool or a torch.amp.GradScaler"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, message):
    model = tiny_swav_model()
    with pytest.raises(error, match=message):
        create_swav_trainer(model, sgd(model), SwAVLoss(), **kwargs)


def test_the_model_loss_and_optimizer_types_are_checked_in_ignites_order():
    model = tiny_swav_model()
    order = r"create_swav_trainer\(model, optimizer, loss_fn, ...\) takes Ignite's order"
    with pytest.raises(TypeError, match=order + ": optimizer and loss_fn were swapped"):
        create_swav_trainer(model, SwAVLoss(), sgd(model))
    with pytest.raises(TypeError, match=order + ": loss_fn must be an ignite_swav.SwAVLoss, got MSELoss"):
        create_swav_trainer(model, sgd(model), torch.nn.MSELoss())
    with pytest.raises(TypeError, match=order + ": optimizer must be a torch.optim.Optimizer, got NoneType"):
        create_swav_trainer(model, None, SwAVLoss())
    with pytest.raises(TypeError, match=order + ": model must be a torch.nn.Module, got str"):
        create_swav_trainer("resnet", sgd(model), SwAVLoss())
    with pytest.raises(TypeError, match="has no 'prototypes' layer: pass prototypes="):
        create_swav_trainer(model.backbone, sgd(model), SwAVLoss())
    with pytest.raises(TypeError, match=r"prototypes must be a layer with a \(num_prototypes, feat_dim\) weight"):
        create_swav_trainer(model, sgd(model), SwAVLoss(), prototypes=torch.nn.ReLU())
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be an integer >= 1, got 0"):
        create_swav_trainer(model, sgd(model), SwAVLoss(), gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="device must be None, a torch.device or a device string.*'banana'"):
        create_swav_trainer(model, sgd(model), SwAVLoss(), device="banana")
    with pytest.raises(TypeError, match="model_fn must be callable"):
        create_swav_trainer(model, sgd(model), SwAVLoss(), model_fn=None)


def test_a_crop_list_that_disagrees_with_crops_for_assign_is_named():
    model = tiny_swav_model()
    trainer = create_swav_trainer(model, sgd(model), SwAVLoss(crops_for_assign=(0, 4)))
    with pytest.raises(ValueError, match=r"crops_for_assign=\(0, 4\) names crop\(s\) \[4\].*given 4 crops"):
        trainer.run(fake_loader(1), max_epochs=1)


def test_non_contiguous_crop_sizes_are_named():
    model = tiny_swav_model()
    trainer = create_swav_trainer(model, sgd(model), SwAVLoss())
    with pytest.raises(ValueError, match="must be contiguous"):
        trainer.run([random_crops(2, sizes=(16, 8, 16))], max_epochs=1)


def test_on_device_augmentation_makes_the_crops_from_raw_images():
    model = tiny_swav_model()
    augment = BatchedMultiCrop(
        size_crops=(16, 8), num_crops=(2, 2), min_scale_crops=(0.5, 0.2), max_scale_crops=(1, 0.5)
    )
    seen = []

    def output_transform(x, y, y_pred, loss):
        seen.append([tuple(c.shape) for c in x])
        return loss.item()

    trainer = create_swav_trainer(model, sgd(model), SwAVLoss(), augment=augment, output_transform=output_transform)
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    batches = [(images, torch.arange(4)), images, [images[0], images[1, :, :12], images[2], images[3]]]
    trainer.run(batches, max_epochs=1)
    assert seen == [[(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2] * 3
    assert math.isfinite(trainer.state.output)


def test_prepare_image_batch_refuses_crops_and_other_things():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    x, y = prepare_image_batch([images[0], images[1]])
    assert x[1].shape == (3, 8, 8) and y is None
    with pytest.raises(TypeError, match=r"raw images.*got a tensor of shape \(3, 8, 8\)"):
        prepare_image_batch(images[0])
    with pytest.raises(TypeError, match="raw images.*got dict"):
        prepare_image_batch({"image": images})
    model = tiny_swav_model()
    with pytest.raises(TypeError, match="augment must be callable"):
        create_swav_trainer(model, sgd(model), SwAVLoss(), augment="gpu")


def test_compile_model_runs_the_forward_through_torch_compile_and_keeps_plain_checkpoints():
    model = tiny_swav_model()
    keys = set(model.state_dict())
    trainer = create_swav_trainer(model, sgd(model), SwAVLoss(), compile_model={"backend": "eager", "dynamic": False})
    before = model.backbone.conv.weight.clone()
    trainer.run(fake_loader(2), max_epochs=1)
    assert math.isfinite(trainer.state.output)
    assert set(model.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints load into an uncompiled model
    assert not torch.equal(before, model.backbone.conv.weight)  # the compiled forward trained the model itself
    with pytest.raises(TypeError, match="compile_model must be a bool or a dict"):
        create_swav_trainer(model, sgd(model), SwAVLoss(), compile_model="max-autotune")


def test_ignites_own_prepare_batch_and_output_tools_work_with_the_defaults(tmp_path: Path):
    from ignite.contrib.engines import common
    from ignite.engine import _prepare_batch
    from ignite.metrics import RunningAverage

    trainer, to_save = trainer_with_queue(prepare_batch=_prepare_batch)
    RunningAverage(output_transform=lambda x: x).attach(trainer, "running_loss")
    common.setup_common_training_handlers(
        trainer, to_save=to_save, output_path=str(tmp_path), save_every_iters=4, with_pbars=False
    )
    trainer.run(fake_loader(), max_epochs=3)
    assert math.isfinite(trainer.state.metrics["running_loss"])
    saved = sorted(p.name for p in tmp_path.glob("training_checkpoint_*.pt"))
    assert saved and trainer.state.queue_in_use
    state = Checkpoint.load_objects  # the saved file holds the queue and loads back
    restored = SwAVQueueHandler(SwAVLoss(), queue_length=8, epoch_queue_starts=1)
    state({"queue_handler": restored}, torch.load(tmp_path / saved[-1], weights_only=True))
    assert restored.queue.rows is not None and restored.queue.rows.shape == (2, 8, 8)


def test_any_module_with_prototypes_trains_through_model_fn_and_wrappers():
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_swav_model()
            self.prototypes = self.inner.prototypes

        def forward(self, crops):
            embeddings, scores = self.inner(crops)
            return {"z": embeddings, "p": scores}

    model = DictModel()
    calls = []

    def model_fn(m, x):
        calls.append(len(x))
        return m(x)

    trainer = create_swav_trainer(
        model, sgd(model), SwAVLoss(), model_transform=lambda out: (out["z"], out["p"]), model_fn=model_fn
    )
    trainer.run(fake_loader(2), max_epochs=1)
    assert calls == [4, 4] and math.isfinite(trainer.state.output)

    # a prototype layer given explicitly, and one found through torch.compile's wrapper
    plain = tiny_swav_model()
    create_swav_trainer(plain.backbone, sgd(plain), SwAVLoss(), prototypes=plain.prototypes)
    compiled = torch.compile(tiny_swav_model(), backend="eager")
    trainer = create_swav_trainer(compiled, sgd(compiled), SwAVLoss())
    trainer.run(fake_loader(1), max_epochs=1)
    assert math.isfinite(trainer.state.output)


def test_gradient_accumulation_steps_the_optimizer_on_the_mean_of_the_micro_batch_gradients():
    batches = fake_loader(2)
    model = tiny_swav_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = create_swav_trainer(model, optimizer, SwAVLoss(), gradient_accumulation_steps=2)
    after_first = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED(once=1), lambda _: after_first.append(model.backbone.conv.weight.clone())
    )
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    start = model.backbone.conv.weight.detach().clone()
    trainer.run(batches, max_epochs=1)
    assert torch.equal(after_first[0], start)  # no step after the first micro-batch

    reference = tiny_swav_model()
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    ref_loss, ref_outputs = SwAVLoss(), []
    for crops, _ in batches:
        reference.prototypes.normalize_()
        embeddings, scores = reference(crops)
        loss = ref_loss(scores=scores, embeddings=embeddings, prototypes=reference.prototypes.weight)
        (loss / 2).backward()
        ref_outputs.append(loss.item())
    ref_optimizer.step()
    assert outputs == pytest.approx(ref_outputs, rel=1e-6)  # the undivided loss, as Ignite reports it
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
def test_the_grad_scaler_is_on_the_trainer_state_for_checkpoints(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # built, never run: no GPU is needed
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    model = tiny_swav_model()
    trainer = create_swav_trainer(model, sgd(model), SwAVLoss(), device="cuda", amp_mode="amp", scaler=True)
    assert isinstance(trainer.state.scaler, torch.amp.GradScaler)
    mine = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    trainer = create_swav_trainer(model, sgd(model), SwAVLoss(), device="cuda", amp_mode="amp", scaler=mine)
    assert trainer.state.scaler is mine


def test_a_device_this_machine_does_not_have_is_one_clear_error(monkeypatch):
    model = tiny_swav_model()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device='cuda', but no CUDA GPU is available here: use 'cpu'"):
        create_swav_trainer(model, sgd(model), SwAVLoss(), device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="device='cuda:7', but this machine has 2 CUDA GPU\\(s\\): cuda:0 to cuda:1"):
        create_swav_trainer(model, sgd(model), SwAVLoss(), device="cuda:7")
    with pytest.raises(ValueError, match="device='meta' holds no values"):
        create_swav_trainer(model, sgd(model), SwAVLoss(), device="meta")


def test_a_queue_handler_that_is_not_attached_to_the_trainer_is_named_once(caplog):
    model = tiny_swav_model()
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, sgd(model), loss_fn)
    evaluator = Engine(lambda e, b: None)
    SwAVQueueHandler(loss_fn, queue_length=8, epoch_queue_starts=0).attach(evaluator)  # the wrong engine
    with caplog.at_level(logging.WARNING, logger="ignite_swav.engine"):
        trainer.run(fake_loader(), max_epochs=2)
    assert caplog.text.count("SwAVQueueHandler that is not attached to this trainer") == 1
    caplog.clear()
    attached_model = tiny_swav_model()
    attached_loss = SwAVLoss()
    attached = create_swav_trainer(attached_model, sgd(attached_model), attached_loss)
    SwAVQueueHandler(attached_loss, queue_length=8, epoch_queue_starts=0).attach(attached)
    with caplog.at_level(logging.WARNING, logger="ignite_swav.engine"):
        attached.run(fake_loader(), max_epochs=1)
    assert "not attached" not in caplog.text


def shuffled_loader() -> torch.utils.data.DataLoader:
    """16 crop sets in shuffled batches of 4: the order depends on the random state a resume must restore."""
    crops = random_crops(16, sizes=(16, 16, 8, 8))
    return torch.utils.data.DataLoader(
        list(zip(zip(*[c for c in crops]), range(16))),
        batch_size=4,
        shuffle=True,
        collate_fn=lambda samples: ([torch.stack(c) for c in zip(*[s[0] for s in samples])], torch.arange(4)),
    )


def deterministic_trainer_recording_losses() -> tuple[Engine, dict, list]:
    trainer, to_save = trainer_with_queue(deterministic=True)
    losses: list = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output))
    return trainer, to_save, losses


def test_a_deterministic_run_resumes_from_its_checkpoint_with_the_same_losses(tmp_path: Path):
    from ignite.engine import DeterministicEngine

    from ignite_swav import load_checkpoint_file

    trainer, to_save, losses = deterministic_trainer_recording_losses()
    assert isinstance(trainer, DeterministicEngine)
    checkpoint = Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False), n_saved=None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    torch.manual_seed(3)
    trainer.run(shuffled_loader(), max_epochs=4)

    resumed, to_load, resumed_losses = deterministic_trainer_recording_losses()
    Checkpoint.load_objects(to_load, load_checkpoint_file(tmp_path / "checkpoint_8.pt"))
    Checkpoint.load_objects(to_load, str(tmp_path / "checkpoint_8.pt"))
    torch.manual_seed(3)  # Ignite's DeterministicEngine draws its seed from torch's generator at the start
    resumed.run(shuffled_loader(), max_epochs=4)
    assert resumed_losses == pytest.approx(losses[8:], rel=1e-5)


def test_a_deterministic_run_resumes_exactly_whatever_the_resumed_process_drew_before(tmp_path: Path):
    torch.manual_seed(3)
    trainer, to_save, losses = deterministic_trainer_recording_losses()
    saver = Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False), n_saved=None)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, saver)
    trainer.run(shuffled_loader(), max_epochs=4)

    resumed, to_load, resumed_losses = deterministic_trainer_recording_losses()
    torch.manual_seed(999)
    torch.randn(100)  # the resumed process used its generator otherwise: the run seed comes from the checkpoint
    Checkpoint.load_objects(to_load, str(tmp_path / "checkpoint_12.pt"))
    resumed.run(shuffled_loader(), max_epochs=4)
    assert resumed_losses == losses[12:]  # bit-equal, not approximately
    assert torch.equal(to_load["queue_handler"].queue.rows, to_save["queue_handler"].queue.rows)
    for a, b in zip(to_save["model"].parameters(), to_load["model"].parameters()):
        assert torch.equal(a, b)


def test_the_library_trains_exactly_as_the_reference_training_loop():
    from reference import reference_swav_training

    batches = [random_crops(4, sizes=(16, 16, 8, 8), seed=20 + i) for i in range(4)]
    settings = {"epochs": 4, "queue_length": 8, "epoch_queue_starts": 1, "freeze_prototypes_iters": 3}

    model = tiny_swav_model(seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(
        model, optimizer, loss_fn, freeze_prototypes_iters=settings["freeze_prototypes_iters"]
    )
    handler = SwAVQueueHandler(
        loss_fn, queue_length=settings["queue_length"], epoch_queue_starts=settings["epoch_queue_starts"]
    )
    handler.attach(trainer)
    losses, in_use = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: in_use.append(e.state.queue_in_use))
    trainer.run(batches, max_epochs=settings["epochs"])

    reference = tiny_swav_model(seed=3)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    ref_losses, ref_queue = reference_swav_training(reference, ref_optimizer, batches, **settings)

    assert in_use == [False] * 6 + [True] * 10  # the queue fills in epoch 2 and is used from its 3rd batch
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    assert torch.allclose(handler.queue.rows, ref_queue, atol=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=2e-5), name  # float32 rounding of 16 SGD steps


def _trained_with_every_handler() -> tuple[weakref.ReferenceType, weakref.ReferenceType]:
    model = tiny_swav_model(seed=0)
    loss_fn = SwAVLoss()
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), loss_fn)
    queue_handler = SwAVQueueHandler(loss_fn, queue_length=8, epoch_queue_starts=0)
    queue_handler.attach(trainer)
    monitor = SwAVHealthMonitor(loss_fn)
    monitor.attach(trainer)
    SwAVQueueGuard(queue_handler, monitor, {"model": model}).attach(trainer)
    probe = OnlineLinearProbe(model.backbone, num_classes=4)
    probe.attach(trainer)
    PreemptionHandler().attach(trainer)
    trainer.run([(random_crops(4, sizes=(16, 16, 8), seed=0), torch.arange(4))], max_epochs=2)
    return weakref.ref(model), weakref.ref(probe)


def _ignite_frees_an_engine_with_a_handler() -> bool:
    enabled = gc.isenabled()
    gc.disable()
    try:
        engine = Engine(lambda e, b: None)
        engine.add_event_handler(Events.STARTED, lambda e: None)
        freed = weakref.ref(engine)
        del engine
        return freed() is None
    finally:
        if enabled:
            gc.enable()


@pytest.mark.skipif(
    not _ignite_frees_an_engine_with_a_handler(),
    reason="this Ignite's Engine holds itself once it has a handler (0.5.1): no trainer on it is freed at once",
)
def test_the_trainer_and_its_handlers_free_the_model_without_the_garbage_collector():
    # As Ignite's create_supervised_trainer: no reference cycle of ours holds the model. One would keep a DDP model,
    # and its process group, alive past destroy_process_group until the collector runs, maybe at exit (an abort).
    gc.collect()
    gc.disable()
    try:
        model, probe = _trained_with_every_handler()
        assert model() is None, "a reference cycle of the trainer or of a handler kept the model"
        assert probe() is None, "the backbone's hook kept the probe"
    finally:
        gc.enable()


def test_the_backbone_does_not_keep_a_dropped_probe():
    model = tiny_swav_model(seed=0)
    probe = OnlineLinearProbe(model.backbone, num_classes=4)
    probe.attach(Engine(lambda e, b: None))
    dropped = weakref.ref(probe)
    del probe
    gc.collect()  # the engine may be a cycle of its own (Ignite 0.5.1); the backbone, alive, must not hold the probe
    assert dropped() is None, "the backbone's forward hook held the probe"
    model(random_crops(2, sizes=(16,)))  # the hook left on the backbone is harmless
