import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import random_crops, tiny_swav_model
from ignite.engine import Events
from ignite.handlers import Checkpoint, DiskSaver

from ignite_swav import (
    BatchedMultiCrop,
    SwAVEvents,
    SwAVLoss,
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


def trainer_with_queue(seed: int = 0):
    """A trainer with a queue of 8 rows from the second epoch; returns it and its objects to checkpoint."""
    model = tiny_swav_model(seed=seed)
    loss_fn = SwAVLoss()
    optimizer = sgd(model)
    trainer = create_swav_trainer(model, loss_fn, optimizer)
    handler = SwAVQueueHandler(loss_fn, batch_size=4, epoch_queue_starts=1, feat_dim=8, queue_length=8)
    handler.attach(trainer)
    return trainer, {"model": model, "optimizer": optimizer, "trainer": trainer, "queue_handler": handler}


def test_a_run_with_queue_and_checkpoint_over_several_epochs(tmp_path: Path):
    trainer, to_save = trainer_with_queue()
    trainer.add_event_handler(Events.EPOCH_COMPLETED, Checkpoint(to_save, DiskSaver(tmp_path, require_empty=False)))
    outputs, first_use = [], []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.add_event_handler(SwAVEvents.QUEUE_FIRST_USED, lambda e: first_use.append(e.state.iteration))
    trainer.run(fake_loader(), max_epochs=3)

    assert all(math.isfinite(o["loss"]) for o in outputs)
    assert [o["use_queue"] for o in outputs] == [False] * 6 + [True] * 2 + [True] * 4
    assert first_use == [7]
    assert (tmp_path / "checkpoint_12.pt").exists()

    # resume from the checkpoint into other objects: the queue is back and used at once
    trainer2, to_load = trainer_with_queue(seed=1)
    Checkpoint.load_objects(to_load, tmp_path / "checkpoint_12.pt")
    assert torch.equal(to_load["queue_handler"].queue, to_save["queue_handler"].queue)
    for a, b in zip(to_save["model"].parameters(), to_load["model"].parameters()):
        assert torch.equal(a, b)
    resumed = []
    trainer2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: resumed.append(e.state.output["use_queue"]))
    trainer2.run(fake_loader(), max_epochs=4)
    assert resumed == [True] * 4


def test_prototypes_are_frozen_for_the_first_iterations_and_then_train():
    model = tiny_swav_model()
    optimizer = sgd(model, lr=0.5)
    trainer = create_swav_trainer(model, SwAVLoss(), optimizer, freeze_prototypes_iters=3)
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


def test_no_freeze_trains_the_prototypes_at_once():
    model = tiny_swav_model()
    start = F.normalize(model.prototypes.weight.detach().clone(), dim=1)
    trainer = create_swav_trainer(model, SwAVLoss(), sgd(model, lr=0.5))
    trainer.run(fake_loader(1), max_epochs=1)
    assert (model.prototypes.weight - start).abs().max() > 1e-3


def test_bfloat16_autocast_on_cpu_trains_with_a_float32_loss():
    model = tiny_swav_model()
    losses = []
    trainer = create_swav_trainer(model, SwAVLoss(), sgd(model), amp_mode="amp", amp_dtype=torch.bfloat16)

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        losses.append(engine.state.output["loss"])

    trainer.run(fake_loader(3, with_targets=False), max_epochs=1)
    assert all(math.isfinite(v) for v in losses)
    # same first step in float32, up to bfloat16's precision
    reference = tiny_swav_model()
    ref_trainer = create_swav_trainer(reference, SwAVLoss(), sgd(reference))
    ref_trainer.run(fake_loader(1, with_targets=False), max_epochs=1)
    assert math.isclose(losses[0], ref_trainer.state.output["loss"], rel_tol=0.05)


def test_custom_output_and_model_transforms():
    model = tiny_swav_model()
    seen = {}

    def output_transform(crops, embeddings, scores, loss):
        seen["n"] = (len(crops), len(embeddings), len(scores))
        return loss.item()

    trainer = create_swav_trainer(
        model, SwAVLoss(), sgd(model), model_transform=lambda out: (out[0], out[1]), output_transform=output_transform
    )
    trainer.run(fake_loader(1), max_epochs=1)
    assert isinstance(trainer.state.output, float)
    assert seen["n"] == (4, 4, 4)


def test_prepare_batch_accepts_crops_or_a_crops_target_pair():
    crops = random_crops(2, sizes=(8, 4))
    assert all(a is b for a, b in zip(prepare_multicrop_batch(crops), crops))
    assert all(a is b for a, b in zip(prepare_multicrop_batch((crops, torch.tensor([3, 4]))), crops))
    with pytest.raises(TypeError, match="list of crop batches, or a \\(crops, target\\) pair; got Tensor"):
        prepare_multicrop_batch(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"freeze_prototypes_iters": -1}, ValueError, "freeze_prototypes_iters must be an integer >= 0, got -1"),
        ({"amp_mode": "apex"}, ValueError, "amp_mode must be None or 'amp'"),
        ({"amp_mode": "amp", "device": "meta"}, ValueError, "not supported on device type 'meta'"),
        ({"amp_mode": "amp", "amp_dtype": torch.float64}, ValueError, "amp_dtype=torch.float64 cannot be used"),
        ({"amp_dtype": torch.bfloat16}, ValueError, "only used with amp_mode='amp'"),
        ({"amp_mode": "amp", "scaler": True}, ValueError, "scaler is for float16 autocast on CUDA"),
        ({"scaler": 1}, TypeError, "scaler must be a bool or a torch.amp.GradScaler"),
    ],
)
def test_bad_settings_are_refused(kwargs, error, message):
    model = tiny_swav_model()
    with pytest.raises(error, match=message):
        create_swav_trainer(model, SwAVLoss(), sgd(model), **kwargs)


def test_the_model_loss_and_optimizer_types_are_checked():
    model = tiny_swav_model()
    with pytest.raises(TypeError, match="model must be an ignite_swav.SwAVModel"):
        create_swav_trainer(model.backbone, SwAVLoss(), sgd(model))
    with pytest.raises(TypeError, match="loss_fn must be an ignite_swav.SwAVLoss"):
        create_swav_trainer(model, torch.nn.MSELoss(), sgd(model))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        create_swav_trainer(model, SwAVLoss(), None)


def test_a_crop_list_that_disagrees_with_crops_for_assign_is_named():
    model = tiny_swav_model()
    trainer = create_swav_trainer(model, SwAVLoss(crops_for_assign=(0, 4)), sgd(model))
    with pytest.raises(ValueError, match=r"crops_for_assign=\(0, 4\) names crop\(s\) \[4\].*given 4 crops"):
        trainer.run(fake_loader(1), max_epochs=1)


def test_non_contiguous_crop_sizes_are_named():
    model = tiny_swav_model()
    trainer = create_swav_trainer(model, SwAVLoss(), sgd(model))
    with pytest.raises(ValueError, match="must be contiguous"):
        trainer.run([random_crops(2, sizes=(16, 8, 16))], max_epochs=1)


def test_on_device_augmentation_makes_the_crops_from_raw_images():
    model = tiny_swav_model()
    augment = BatchedMultiCrop(
        size_crops=(16, 8), num_crops=(2, 2), min_scale_crops=(0.5, 0.2), max_scale_crops=(1, 0.5)
    )
    seen = []

    def output_transform(crops, embeddings, scores, loss):
        seen.append([tuple(c.shape) for c in crops])
        return loss.item()

    trainer = create_swav_trainer(model, SwAVLoss(), sgd(model), augment=augment, output_transform=output_transform)
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    batches = [(images, torch.arange(4)), images, [images[0], images[1, :, :12], images[2], images[3]]]
    trainer.run(batches, max_epochs=1)
    assert seen == [[(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2] * 3
    assert math.isfinite(trainer.state.output)


def test_prepare_image_batch_refuses_crops_and_other_things():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    assert prepare_image_batch([images[0], images[1]])[1].shape == (3, 8, 8)
    with pytest.raises(TypeError, match=r"raw images.*got a tensor of shape \(3, 8, 8\)"):
        prepare_image_batch(images[0])
    with pytest.raises(TypeError, match="raw images.*got dict"):
        prepare_image_batch({"image": images})
    model = tiny_swav_model()
    with pytest.raises(TypeError, match="augment must be callable"):
        create_swav_trainer(model, SwAVLoss(), sgd(model), augment="gpu")


def test_compile_model_runs_the_forward_through_torch_compile_and_keeps_plain_checkpoints():
    model = tiny_swav_model()
    keys = set(model.state_dict())
    trainer = create_swav_trainer(model, SwAVLoss(), sgd(model), compile_model={"backend": "eager", "dynamic": False})
    before = model.backbone.conv.weight.clone()
    trainer.run(fake_loader(2), max_epochs=1)
    assert math.isfinite(trainer.state.output["loss"])
    assert set(model.state_dict()) == keys  # no "_orig_mod." prefix: checkpoints load into an uncompiled model
    assert not torch.equal(before, model.backbone.conv.weight)  # the compiled forward trained the model itself
    with pytest.raises(TypeError, match="compile_model must be a bool or a dict"):
        create_swav_trainer(model, SwAVLoss(), sgd(model), compile_model="max-autotune")
