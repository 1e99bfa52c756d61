"""A one-call SwAV trainer, following the conventions of ``ignite.engine.create_supervised_trainer``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, EventEnum, Events
from ignite.utils import convert_tensor
from torch import Tensor, nn
from torch.optim import Optimizer

from ignite_swav._validation import check_int
from ignite_swav.loss import SwAVLoss
from ignite_swav.modules import SwAVModel

__all__ = ["SwAVEvents", "create_swav_trainer", "prepare_image_batch", "prepare_multicrop_batch"]


class SwAVEvents(EventEnum):
    """Events fired by :func:`create_swav_trainer`'s engine.

    - ``QUEUE_FIRST_USED``: after the first iteration of a run whose codes used the queue.
    """

    QUEUE_FIRST_USED = "queue_first_used"


def prepare_multicrop_batch(
    batch: Sequence[Any], device: str | torch.device | None = None, non_blocking: bool = False
) -> list[Tensor]:
    """The list of crop batches of ``batch``, moved to ``device``; a ``(crops, target)`` pair loses its target.

    Example:
        >>> import torch
        >>> from ignite_swav import prepare_multicrop_batch
        >>> crops = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4)]
        >>> len(prepare_multicrop_batch((crops, torch.tensor([0, 1]))))
        2
    """
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[0], (tuple, list))
        and isinstance(batch[1], Tensor)
        and batch[1].ndim <= 1
    ):
        batch = batch[0]
    if isinstance(batch, Tensor) or not isinstance(batch, (tuple, list)) or not batch:
        raise TypeError(
            "a SwAV batch must be the list of crop batches, or a (crops, target) pair; "
            f"got {type(batch).__name__} (use ignite_swav.multicrop_collate in the DataLoader)"
        )
    return [convert_tensor(crop, device=device, non_blocking=non_blocking) for crop in batch]


def prepare_image_batch(
    batch: Any, device: str | torch.device | None = None, non_blocking: bool = False
) -> Tensor | list[Tensor]:
    """The raw images of ``batch`` moved to ``device``, for an on-device augmentation such as
    :class:`~ignite_swav.BatchedMultiCrop`: a ``(B, C, H, W)`` tensor or a list of ``(C, H, W)`` images, or
    either of them paired with a 1-D target tensor (which is dropped).

    Example:
        >>> import torch
        >>> from ignite_swav import prepare_image_batch
        >>> images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
        >>> prepare_image_batch((images, torch.arange(4))).shape
        torch.Size([4, 3, 8, 8])
    """
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and isinstance(batch[1], Tensor)
        and batch[1].ndim == 1
        and (isinstance(batch[0], (tuple, list)) or (isinstance(batch[0], Tensor) and batch[0].ndim == 4))
    ):
        batch = batch[0]
    if isinstance(batch, Tensor) and batch.ndim == 4:
        return convert_tensor(batch, device=device, non_blocking=non_blocking)
    if isinstance(batch, (tuple, list)) and batch and all(isinstance(i, Tensor) and i.ndim == 3 for i in batch):
        return [convert_tensor(image, device=device, non_blocking=non_blocking) for image in batch]
    described = f"a tensor of shape {tuple(batch.shape)}" if isinstance(batch, Tensor) else type(batch).__name__
    raise TypeError(
        "with augment=..., a batch must hold raw images: a (B, C, H, W) tensor or a list of (C, H, W) tensors, "
        f"alone or with a 1-D target tensor; got {described} (use ignite_swav.collate_images in the DataLoader)"
    )


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _autocast_dtype(amp_mode: str | None, amp_dtype: torch.dtype | None, device_type: str) -> torch.dtype | None:
    if amp_mode is None:
        if amp_dtype is not None:
            raise ValueError(f"amp_dtype={amp_dtype} is only used with amp_mode='amp'")
        return None
    if amp_mode != "amp":
        raise ValueError(f"amp_mode must be None or 'amp' (torch.autocast), got {amp_mode!r}")
    supported = {"cpu": (torch.bfloat16, torch.float16), "cuda": (torch.float16, torch.bfloat16)}
    if device_type not in supported:
        raise ValueError(f"amp_mode='amp' is not supported on device type '{device_type}'; use 'cpu' or 'cuda'")
    dtype = amp_dtype or supported[device_type][0]
    if dtype not in supported[device_type]:
        raise ValueError(
            f"amp_dtype={dtype} cannot be used by autocast on '{device_type}'; valid: {supported[device_type]}"
        )
    if device_type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError("amp_dtype=torch.bfloat16 is not supported by this GPU; use torch.float16 with scaler=True")
    return dtype


def create_swav_trainer(
    model: nn.Module,
    loss_fn: SwAVLoss,
    optimizer: Optimizer,
    device: str | torch.device | None = None,
    freeze_prototypes_iters: int = 0,
    amp_mode: str | None = None,
    amp_dtype: torch.dtype | None = None,
    scaler: bool | torch.amp.GradScaler = False,
    non_blocking: bool = False,
    prepare_batch: Callable[..., Any] | None = None,
    augment: Callable[[Any], list[Tensor]] | None = None,
    compile_model: bool | dict[str, Any] = False,
    model_transform: Callable[[Any], tuple[list[Tensor], list[Tensor]]] = lambda output: output,
    output_transform: Callable[..., Any] | None = None,
) -> Engine:
    """An Engine that trains SwAV: one iteration normalises the prototypes, runs the model and the loss,
    backpropagates, drops the prototype gradients while they are frozen, and steps the optimizer.

    The queue comes through ``loss_fn`` and a :class:`~ignite_swav.SwAVQueueHandler` attached to the returned
    engine. While ``engine.state.iteration <= freeze_prototypes_iters`` the prototype gradients are set to
    ``None`` after backward, so the optimizer does not touch them at all (no momentum, no weight decay); this
    is safe under DDP, which has already reduced the gradients. The engine registers
    :class:`SwAVEvents` and fires ``QUEUE_FIRST_USED`` after the first iteration of a run whose codes used the
    queue. The loss's Sinkhorn and softmax run in float32 whatever the autocast dtype.

    Args:
        model: a :class:`~ignite_swav.SwAVModel`, possibly wrapped by ``idist.auto_model`` (DDP).
        loss_fn: the :class:`~ignite_swav.SwAVLoss`.
        optimizer: the optimizer (SGD, or LARS for large batches: timm's ``timm.optim.Lars``).
        device: where the batch goes (``idist.device()`` in distributed runs).
        freeze_prototypes_iters: number of first iterations with frozen prototypes (SwAV: 5005 at batch 4096).
        amp_mode: ``None`` or ``"amp"`` for ``torch.autocast``.
        amp_dtype: autocast dtype; default bfloat16 on CPU and float16 on CUDA.
        scaler: ``True`` or a ``torch.amp.GradScaler`` for float16 on CUDA.
        non_blocking: passed to ``prepare_batch``.
        prepare_batch: ``(batch, device, non_blocking) -> crops`` (or ``-> images`` with ``augment``); the
            default is :func:`prepare_multicrop_batch`, or :func:`prepare_image_batch` with ``augment``.
        augment: makes the crops from the prepared batch on ``device``, outside autocast and without gradients,
            e.g. :class:`~ignite_swav.BatchedMultiCrop`; the DataLoader then only loads raw uint8 images
            (collated by :func:`~ignite_swav.collate_images`).
        compile_model: run the model's forward through ``torch.compile`` (``True``, or a dict of its keyword
            arguments such as ``{"mode": "max-autotune"}``); ``model`` itself, its state dict and checkpoints
            stay those of the uncompiled module.
        model_transform: maps the model's output to ``(embeddings, scores)``.
        output_transform: ``(crops, embeddings, scores, loss) -> output``; default
            ``{"loss": loss.item(), "use_queue": loss_fn.use_queue}``.

    Returns:
        The trainer engine.

    Example:
        The SwAV recipe's schedule comes from Ignite (linear warm-up, then cosine), and the queue from the handler:

        .. code-block:: python

            from ignite.engine import Events
            from ignite.handlers import CosineAnnealingScheduler, create_lr_scheduler_with_warmup
            from ignite_swav import SwAVLoss, SwAVQueueHandler, create_swav_trainer

            loss_fn = SwAVLoss()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.6, momentum=0.9, weight_decay=1e-6)
            trainer = create_swav_trainer(model, loss_fn, optimizer, freeze_prototypes_iters=5005)
            SwAVQueueHandler(loss_fn, batch_size=64, epoch_queue_starts=15, queue_length=3840).attach(trainer)
            steps = epochs * len(loader)
            cosine = CosineAnnealingScheduler(optimizer, "lr", 0.6, 0.0006, cycle_size=steps - warmup_steps)
            scheduler = create_lr_scheduler_with_warmup(cosine, 0.0, warmup_duration=warmup_steps)
            trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
            trainer.run(loader, max_epochs=epochs)
    """
    if not isinstance(model, nn.Module) or not isinstance(_unwrap(model), SwAVModel):
        raise TypeError(f"model must be an ignite_swav.SwAVModel (or DDP around one), got {type(model).__name__}")
    if not isinstance(loss_fn, SwAVLoss):
        raise TypeError(f"loss_fn must be an ignite_swav.SwAVLoss, got {type(loss_fn).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    freeze_prototypes_iters = check_int("freeze_prototypes_iters", freeze_prototypes_iters, 0)
    if augment is not None and not callable(augment):
        raise TypeError(f"augment must be callable (images -> list of crop batches), got {type(augment).__name__}")
    if prepare_batch is None:
        prepare_batch = prepare_multicrop_batch if augment is None else prepare_image_batch
    device_type = torch.device(device).type if device is not None else "cpu"
    autocast_dtype = _autocast_dtype(amp_mode, amp_dtype, device_type)

    grad_scaler: torch.amp.GradScaler | None = None
    if scaler is True or isinstance(scaler, torch.amp.GradScaler):
        if device_type != "cuda" or autocast_dtype != torch.float16:
            raise ValueError(
                f"scaler is for float16 autocast on CUDA (amp_mode='amp', device='cuda'); got device type "
                f"'{device_type}' and autocast dtype {autocast_dtype}"
            )
        grad_scaler = scaler if isinstance(scaler, torch.amp.GradScaler) else torch.amp.GradScaler("cuda")
    elif scaler is not False:
        raise TypeError(f"scaler must be a bool or a torch.amp.GradScaler, got {type(scaler).__name__}")

    if compile_model is True:
        forward: Callable[..., Any] = torch.compile(model)
    elif isinstance(compile_model, dict):
        forward = torch.compile(model, **compile_model)
    elif compile_model is False:
        forward = model
    else:
        raise TypeError(f"compile_model must be a bool or a dict of torch.compile arguments, got {compile_model!r}")

    prototypes = _unwrap(model).prototypes
    if output_transform is None:

        def output_transform(crops: list[Tensor], embeddings: list[Tensor], scores: list[Tensor], loss: Tensor):
            return {"loss": loss.item(), "use_queue": loss_fn.use_queue}

    def update(engine: Engine, batch: Any) -> Any:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        crops = prepare_batch(batch, device=device, non_blocking=non_blocking)
        if augment is not None:
            with torch.no_grad():
                crops = augment(crops)
        prototypes.normalize_()
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            embeddings, scores = model_transform(forward(crops))
            loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=prototypes.weight)
        if grad_scaler is not None:
            grad_scaler.scale(loss).backward()
        else:
            loss.backward()
        if engine.state.iteration <= freeze_prototypes_iters:
            for parameter in prototypes.parameters():
                parameter.grad = None
        if grad_scaler is not None:
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            optimizer.step()
        if loss_fn.use_queue and not queue_used_in_run[0]:
            queue_used_in_run[0] = True
            engine.fire_event(SwAVEvents.QUEUE_FIRST_USED)
        return output_transform(crops, embeddings, scores, loss)

    queue_used_in_run = [False]

    def reset_queue_used(_: Engine) -> None:
        queue_used_in_run[0] = False

    trainer = Engine(update)
    trainer.register_events(*SwAVEvents)
    trainer.add_event_handler(Events.STARTED, reset_queue_used)
    return trainer
