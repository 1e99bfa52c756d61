"""A tiny but complete SwAV run (model, optimizer, trainer, queue handler, torch RNG state) for the reliability
tests: built the same way in the test process and in the child processes that get killed."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from helpers import tiny_swav_model
from ignite.engine import Engine

from ignite_swav import BatchedMultiCrop, SwAVLoss, SwAVQueueHandler, create_swav_trainer

BATCH = 4
ITERATIONS_PER_EPOCH = 5
QUEUE_LENGTH = 8


class TorchRNGState:
    """The torch CPU generator as a checkpointable object: with it, the random crops after a resume are the
    ones the uninterrupted run would have drawn."""

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])


def images(seed: int = 0) -> list[torch.Tensor]:
    """One epoch of uint8 image batches, the same every epoch (a deterministic data order)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (BATCH, 3, 20, 20), dtype=torch.uint8, generator=generator)
        for _ in range(ITERATIONS_PER_EPOCH)
    ]


def build(seed: int = 0, epoch_queue_starts: int = 1) -> tuple[Engine, dict[str, Any], SwAVLoss]:
    model = tiny_swav_model(seed=seed)
    loss_fn = SwAVLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    augment = BatchedMultiCrop(
        size_crops=(16, 8), num_crops=(2, 2), min_scale_crops=(0.5, 0.2), max_scale_crops=(1, 0.5)
    )

    def output(x, y, y_pred, loss):
        return {"loss": loss.item(), "use_queue": loss_fn.queue_in_use}

    trainer = create_swav_trainer(
        model, optimizer, loss_fn, output_transform=output, freeze_prototypes_iters=2, augment=augment
    )
    handler = SwAVQueueHandler(
        loss_fn, queue_length=QUEUE_LENGTH, epoch_queue_starts=epoch_queue_starts, batch_size=BATCH, feat_dim=8
    )
    handler.attach(trainer)
    to_save = {
        "model": model,
        "optimizer": optimizer,
        "trainer": trainer,
        "queue_handler": handler,
        "rng": TorchRNGState(),
    }
    return trainer, to_save, loss_fn


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        hasher.update(str((value.dtype, tuple(value.shape))).encode())
        hasher.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            hasher.update(str(key).encode())
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            _feed(hasher, item)
    else:
        hasher.update(repr(value).encode())


def digest(to_save: Mapping[str, Any]) -> str:
    """A hash of every tensor and number the checkpoint holds (model, optimizer, trainer, queue, RNG)."""
    hasher = hashlib.sha256()
    for name in sorted(to_save):
        state = to_save[name].state_dict()
        if name == "trainer":
            state = {key: state[key] for key in ("iteration", "epoch_length", "max_epochs")}
        hasher.update(name.encode())
        _feed(hasher, state)
    return hasher.hexdigest()
