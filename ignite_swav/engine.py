"""A one-call SwAV trainer, following the conventions of ``ignite.engine.create_supervised_trainer``."""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from ignite import distributed as idist
from ignite.engine import DeterministicEngine, Engine, Events
from ignite.utils import convert_tensor
from torch import Tensor, nn
from torch.optim import Optimizer

from ignite_swav._batches import split_batch
from ignite_swav._distributed import all_reduce, check_same_on_every_rank, values_by_rank
from ignite_swav._validation import check_int, check_nonnegative_float, device_type_of, resolve_autocast_dtype
from ignite_swav._verdict import (
    StateGuard,
    Verdicts,
    fill_momentum_buffers,
    poison_gradients_where,
    skips_on_device,
)
from ignite_swav.decode import decode_images, is_encoded_batch
from ignite_swav.events import SwAVEvents
from ignite_swav.loss import SwAVLoss
from ignite_swav.settings import check_settings

__all__ = ["create_swav_trainer", "prepare_image_batch", "prepare_multicrop_batch", "swav_training_step"]


class _AgreedStop:
    """``terminate()`` that never stops one process alone: on several processes a call (Ignite's ``TimeLimit``, a
    handler whose condition holds on one rank) is a request, combined with every other process's in the next
    step's verdict (or at the next epoch's start, where they meet) and carried out by all of them at the same
    iteration; a process that stopped alone would leave the others waiting in the next collective. On one process
    it stops at once, as Ignite's."""

    def __init__(self, process_function: Callable[[Engine, Any], Any]) -> None:
        super().__init__(process_function)  # type: ignore[call-arg]
        self.stop_request: bool | str = False

    def terminate(self, skip_completed: bool = False) -> None:
        if idist.get_world_size() > 1:
            self.stop_request = "skip_completed" if skip_completed else (self.stop_request or True)
            return
        self._terminate(skip_completed)

    def carry_out_stop(self, code: float) -> None:
        """Carry out a stop every process agreed on (``code`` 2: without ``COMPLETED``)."""
        self.stop_request = False
        self._terminate(code >= 2)

    def _terminate(self, skip_completed: bool) -> None:
        # Ignite 0.5.1's terminate() takes no argument (skip_completed came in 0.5.2): passed only when asked for
        if skip_completed:
            Engine.terminate(cast(Engine, self), skip_completed=True)
        else:
            Engine.terminate(cast(Engine, self))

    def _forget_stop(self, _: Any = None) -> None:
        """``STARTED``: a run starts without the request of an earlier run that ended before agreeing on it."""
        self.stop_request = False

    def _agree_on_stop(self, _: Any = None) -> None:
        """``EPOCH_STARTED``: the requests of every process, combined (one all-reduce and one read per epoch)."""
        if idist.get_world_size() == 1:
            return
        code = 2.0 if self.stop_request == "skip_completed" else 1.0 if self.stop_request else 0.0
        agreed = float(all_reduce(torch.tensor([code], device=idist.device()), op="MAX").item())
        if agreed:
            self.carry_out_stop(agreed)


class _SwAVEngine(_AgreedStop, Engine):
    """The trainer of :func:`create_swav_trainer`: Ignite's ``Engine`` with a ``terminate()`` agreed by every
    process."""


class _ResumableDeterministicEngine(_AgreedStop, DeterministicEngine):
    """Ignite's ``DeterministicEngine`` (each epoch reseeded from a run seed, the data order reproducible), made to
    resume exactly and to load with ``torch.load(weights_only=True)``.

    Ignite draws the run seed from torch's generator when the run starts, so a resumed process that used the
    generator differently before ``run`` (building a probe while loading, say) would draw another one; and it
    stores numpy's random state as a numpy array, which the weights-only unpickler refuses. Here the seed of
    every rank is gathered when the run starts and saved in ``state_dict`` (rank 0's checkpoint holds all of
    them), restored on load when the number of processes is the same; numpy's state is saved as a tensor.
    """

    def __init__(self, process_function: Callable[[Engine, Any], Any]) -> None:
        super().__init__(process_function)
        self._seeds: list[int] | None = None
        self._restored_seeds: list[int] | None = None
        self._pending_rng_states: Any = None
        self.add_event_handler(Events.GET_BATCH_COMPLETED, self._restore_rng_states_after_first_batch)

    def _setup_engine(self) -> None:
        # Resuming in the middle of a pass over the data, Ignite restores the saved random state before the first
        # batch is drawn, but the batch sampler draws its order lazily, at that first batch: from the restored
        # state instead of the run's. The state is restored once that batch is drawn instead.
        rng_states = getattr(self.state, "rng_states", None)
        length = self._get_data_length(self.state.dataloader) if self.state.dataloader is not None else None
        if rng_states is not None and length and self.state.iteration % length > 0:
            self._pending_rng_states = rng_states
            self.state.rng_states = None  # type: ignore[attr-defined]  # DeterministicEngine's state attribute
        super()._setup_engine()

    def _restore_rng_states_after_first_batch(self) -> None:
        if self._pending_rng_states is not None:
            states, self._pending_rng_states = self._pending_rng_states, None
            # the layout of Ignite's DeterministicEngine: Python's, torch's, then numpy's state
            random.setstate(states[0])
            torch.set_rng_state(states[1].cpu())
            if len(states) > 2:  # saved where numpy was installed (torch does not require it)
                import numpy

                numpy.random.set_state(states[2])

    def _init_run(self) -> None:
        super()._init_run()
        seeds = self._restored_seeds
        if seeds is not None and len(seeds) == idist.get_world_size():
            self.state.seed = int(seeds[idist.get_rank()])
        self._restored_seeds = None
        self._seeds = [row[0] for row in values_by_rank([int(self.state.seed or 0)])]

    def state_dict(self) -> Any:
        state = super().state_dict()
        rng_states = list(state.get("rng_states") or [])
        if len(rng_states) > 2 and not isinstance(rng_states[2][1], Tensor):
            name, keys, *rest = rng_states[2]
            rng_states[2] = (name, torch.from_numpy(keys.astype("int64")), *rest)
        state["rng_states"] = rng_states
        if self._seeds is not None:
            state["seeds"] = list(self._seeds)
        return state

    def load_state_dict(self, state_dict: Any) -> None:
        state_dict = dict(state_dict)
        seeds = state_dict.pop("seeds", None)
        super().load_state_dict(state_dict)
        self._restored_seeds = [int(s) for s in seeds] if isinstance(seeds, (list, tuple)) else None
        rng_states = getattr(self.state, "rng_states", None)
        if rng_states is not None and len(rng_states) > 2 and isinstance(rng_states[2][1], Tensor):
            name, keys, *rest = rng_states[2]
            self.state.rng_states = [*rng_states[:2], (name, keys.numpy().astype("uint32"), *rest)]  # type: ignore[attr-defined]


def _to(tensor: Tensor, device: str | torch.device | None, non_blocking: bool) -> Tensor:
    # Ignite's convert_tensor, typed as the tensor it returns for a tensor
    return cast(Tensor, convert_tensor(tensor, device=device, non_blocking=non_blocking))


def prepare_multicrop_batch(
    batch: Sequence[Any], device: str | torch.device | None = None, non_blocking: bool = False
) -> tuple[list[Tensor], Tensor | None]:
    """``(crops, target)`` of a multi-crop batch, moved to ``device``: the list of crop batches, and the target
    tensor of a ``(crops, target)`` pair or ``None`` when the batch is the list of crops alone.

    The default ``prepare_batch`` of :func:`create_swav_trainer`; it follows the contract of Ignite's
    ``prepare_batch`` functions, ``(batch, device, non_blocking) -> (x, y)``.

    Example:
        >>> import torch
        >>> from ignite_swav import prepare_multicrop_batch
        >>> crops = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4)]
        >>> x, y = prepare_multicrop_batch((crops, torch.tensor([0, 1])))
        >>> len(x), y.tolist()
        (2, [0, 1])
        >>> prepare_multicrop_batch(crops)[1] is None
        True
    """
    crops, target = split_batch(batch)
    if isinstance(crops, Tensor) or not isinstance(crops, (tuple, list)) or not crops:
        raise TypeError(
            "a SwAV batch must be the list of crop batches, or a (crops, target) pair; "
            f"got {type(crops).__name__} (use ignite_swav.collate_crops in the DataLoader)"
        )
    x = [_to(crop, device, non_blocking) for crop in crops]
    return x, None if target is None else _to(target, device, non_blocking)


def prepare_image_batch(
    batch: Any, device: str | torch.device | None = None, non_blocking: bool = False
) -> tuple[Tensor | list[Tensor], Tensor | None]:
    """``(images, target)`` of a batch of raw images, moved to ``device``, for an on-device augmentation such as
    :class:`~ignite_swav.BatchedMultiCrop`: the images are a ``(B, C, H, W)`` tensor or a list of ``(C, H, W)``
    images, alone (target ``None``) or paired with a 1-D target tensor. A list of 1-D uint8 tensors is taken
    for the bytes of encoded image files (``torchvision.io.read_file``) and decoded on ``device`` by
    :func:`~ignite_swav.decode_images`: the DataLoader workers then only read files.

    Example:
        >>> import torch
        >>> from ignite_swav import prepare_image_batch
        >>> images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
        >>> x, y = prepare_image_batch((images, torch.arange(4)))
        >>> x.shape, y.tolist()
        (torch.Size([4, 3, 8, 8]), [0, 1, 2, 3])
    """
    images, target = split_batch(batch)
    y = None if target is None else _to(target, device, non_blocking)
    if is_encoded_batch(images):  # file bytes: decoded together on the device (nvJPEG on a GPU)
        return decode_images(images, device), y
    if isinstance(images, Tensor) and images.ndim == 4:
        return _to(images, device, non_blocking), y
    if isinstance(images, (tuple, list)) and images and all(isinstance(i, Tensor) and i.ndim == 3 for i in images):
        return [_to(image, device, non_blocking) for image in images], y
    described = f"a tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
    raise TypeError(
        "with augment=..., a batch must hold raw images: a (B, C, H, W) tensor, a list of (C, H, W) tensors or of "
        "encoded files' bytes (1-D uint8 tensors), "
        f"alone or with a 1-D target tensor; got {described} (use ignite_swav.collate_images in the DataLoader)"
    )


def _find_prototypes(model: nn.Module) -> nn.Module | None:
    # Through the wrappers users put around a model: DDP / DataParallel (.module), torch.compile (._orig_mod).
    seen = 0
    while seen < 8:
        layer = getattr(model, "prototypes", None)
        if isinstance(layer, nn.Module):
            return layer
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return None
        model, seen = inner, seen + 1
    return None


def _prototype_weight(layer: nn.Module) -> Tensor:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise TypeError(
            f"prototypes must be a layer with a (num_prototypes, feat_dim) weight, such as "
            f"ignite_swav.SwAVPrototypes or a bias-free nn.Linear; got {type(layer).__name__}"
        )
    return weight


def _num_heads(layer: nn.Module) -> int:
    """The prototype heads of a layer: a ``SwAVPrototypes``' ``num_heads``, 1 for any other layer."""
    return int(getattr(layer, "num_heads", 1))


def _check_positional_types(model: Any, optimizer: Any, loss_fn: Any) -> None:
    order = "create_swav_trainer(model, optimizer, loss_fn, ...) takes Ignite's order"
    if isinstance(optimizer, SwAVLoss) and isinstance(loss_fn, Optimizer):
        raise TypeError(f"{order}: optimizer and loss_fn were swapped (got a SwAVLoss as optimizer)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{order}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{order}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(loss_fn, SwAVLoss):
        raise TypeError(f"{order}: loss_fn must be an ignite_swav.SwAVLoss, got {type(loss_fn).__name__}")


def create_swav_trainer(
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: SwAVLoss,
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    prepare_batch: Callable[..., tuple[Any, Any]] | None = None,
    model_transform: Callable[[Any], Any] = lambda output: output,
    output_transform: Callable[[Any, Any, Any, Tensor], Any] = lambda x, y, y_pred, loss: loss.item(),
    deterministic: bool = False,
    amp_mode: str | None = None,
    scaler: bool | torch.amp.GradScaler = False,
    gradient_accumulation_steps: int = 1,
    model_fn: Callable[[Any, Any], Any] = lambda model, x: model(x),
    *,
    freeze_prototypes_iters: int = 0,
    freeze_prototypes_epochs: float | None = None,
    prototypes: nn.Module | None = None,
    augment: Callable[[Any], list[Tensor]] | None = None,
    compile_model: bool | dict[str, Any] = False,
    amp_dtype: torch.dtype | None = None,
) -> Engine:
    """A trainer for SwAV with the arguments and contracts of ``ignite.engine.create_supervised_trainer``.

    One iteration: ``x, y = prepare_batch(batch, device, non_blocking)`` (``x`` the list of crop batches, or
    raw images turned into crops by ``augment``), L2-normalise the prototypes, ``y_pred =
    model_transform(model_fn(model, x))`` which must be ``(embeddings, scores)`` (one tensor per crop each),
    ``loss = loss_fn(scores=..., embeddings=..., prototypes=...)``, backward, drop the prototype gradients
    while they are frozen, step the optimizer, and return ``output_transform(x, y, y_pred, loss)``
    (``loss.item()`` by default, as in Ignite). The loss's Sinkhorn and softmax run in float32 whatever the
    autocast dtype. The queue comes through ``loss_fn`` and a :class:`~ignite_swav.SwAVQueueHandler` attached
    to the returned engine. The engine registers :class:`SwAVEvents` and fires ``QUEUE_FIRST_USED`` after the
    first iteration of a run whose codes used the queue.

    Non-finite values stop the step after the backward pass and before the optimizer touches the weights (the
    one host synchronisation of the step besides the output's ``loss.item()``); the queue is never written
    with them.

    Args:
        model: any ``nn.Module`` whose output, through ``model_transform``, is ``(embeddings, scores)``, such as
            :class:`~ignite_swav.SwAVModel`, possibly wrapped by ``idist.auto_model`` (DDP).
        optimizer: the optimizer (SGD, or LARS for large batches: ``timm.optim.Lars``).
        loss_fn: the :class:`~ignite_swav.SwAVLoss`.
        device: where the batch goes (``idist.device()`` in distributed runs); the model is not moved.
        non_blocking: passed to ``prepare_batch``.
        prepare_batch: ``(batch, device, non_blocking) -> (x, y)``; default :func:`prepare_multicrop_batch`, or
            :func:`prepare_image_batch` with ``augment``. Ignite's own ``_prepare_batch`` works on
            ``(crops, target)`` batches.
        model_transform: maps the model's output to ``(embeddings, scores)``.
        output_transform: ``(x, y, y_pred, loss) -> output``; default ``loss.item()``.
        deterministic: return an ``ignite.engine.DeterministicEngine``: every epoch reseeded from a run seed and the
            data order reproducible, so that a run resumed from a checkpoint (on the same number of processes)
            trains exactly as the uninterrupted run; the run seeds of all ranks are saved in its ``state_dict``.
            On CUDA it turns on ``torch.use_deterministic_algorithms`` (warn only), which can be slower.
        amp_mode: ``None`` or ``"amp"`` for ``torch.autocast``.
        scaler: ``True`` (a ``GradScaler`` is created and put on ``trainer.state.scaler``, for checkpoints) or a
            ``torch.amp.GradScaler`` (also put there), for float16 autocast on CUDA.
        gradient_accumulation_steps: optimizer step every this many iterations, as in Ignite (the loss is divided
            by it for the backward pass, and ``output_transform`` gets the undivided loss). For SwAV it means
            that each micro-batch gets its own codes (its Sinkhorn balances that micro-batch, joined by the
            queue) and is pushed into the queue on its own: the codes are those of the smaller batch.
        model_fn: ``(model, x) -> model output``.
        freeze_prototypes_iters: number of first iterations whose optimizer steps leave the prototypes untouched
            (no gradient, so no momentum or weight decay either). The SwAV recipes freeze them for one epoch:
            5005 iterations at global batch 256 on ImageNet, 313 at 4096.
        freeze_prototypes_epochs: the same in epochs, fractions allowed (``round(epochs * epoch_length)``
            iterations, from the run's epoch length): ``1`` is the recipes' one epoch whatever the batch size and
            number of processes. Give this or ``freeze_prototypes_iters``, not both.
        prototypes: the prototype layer (a module with a ``(K, D)`` ``weight``); default the model's
            ``prototypes`` attribute, found through DDP and ``torch.compile`` wrappers.
        augment: makes the crops from the prepared images on ``device``, outside autocast and without
            gradients, e.g. :class:`~ignite_swav.BatchedMultiCrop`; the DataLoader then only loads raw uint8
            images (collated by :func:`~ignite_swav.collate_images`).
        compile_model: run the model and the loss's computation through ``torch.compile`` (``True``, or a dict of
            its keyword arguments such as ``{"mode": "max-autotune"}``); ``model`` itself, its state dict and
            checkpoints stay those of the uncompiled module. The loss's computation compiles without a graph
            break; the step's own breaks are torch's (``zero_grad``, ``backward``, ``optimizer.step``:
            docs/internals.md).
        amp_dtype: autocast dtype; default bfloat16 on CPU and float16 on CUDA.

    Returns:
        The trainer engine (a ``DeterministicEngine`` with ``deterministic=True``).

    Example:
        >>> import torch
        >>> from ignite.engine import Events
        >>> from ignite_swav import SwAVLoss, SwAVModel, SwAVProjectionHead, SwAVPrototypes, create_swav_trainer
        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
        >>> model = SwAVModel(backbone, SwAVProjectionHead(8, 16, 4), SwAVPrototypes(4, 10))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> trainer = create_swav_trainer(model, optimizer, SwAVLoss(), freeze_prototypes_iters=1)
        >>> crops = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
        >>> state = trainer.run([(crops, torch.arange(4))] * 3, max_epochs=1)
        >>> isinstance(state.output, float)
        True

        The SwAV recipe's schedule is :func:`~ignite_swav.create_swav_lr_scheduler` (Ignite's schedulers: a linear
        warm-up, then a cosine, set every iteration), and the queue comes from
        :class:`~ignite_swav.SwAVQueueHandler`:

        .. code-block:: python

            schedule = create_swav_lr_scheduler(optimizer, 0.6, epochs, len(loader), final_lr=0.0006)
            trainer.add_event_handler(Events.ITERATION_STARTED, schedule)
            SwAVQueueHandler(loss_fn, queue_length=3840, epoch_queue_starts=15).attach(trainer)
    """
    _check_positional_types(model, optimizer, loss_fn)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {deterministic!r}")
    device_type = device_type_of(device)
    autocast_dtype = resolve_autocast_dtype(amp_mode, amp_dtype, device_type)
    grad_scaler: torch.amp.GradScaler | None = None
    if scaler is True or isinstance(scaler, torch.amp.GradScaler):
        if autocast_dtype != torch.float16:
            raise ValueError(
                f"scaler is for float16 autocast (amp_mode='amp', amp_dtype=torch.float16; the default on CUDA); got "
                f"autocast dtype {autocast_dtype} on device type '{device_type}'"
            )
        grad_scaler = scaler if isinstance(scaler, torch.amp.GradScaler) else torch.amp.GradScaler(device_type)
    elif scaler is not False:
        raise TypeError(f"scaler must be a bool or a torch.amp.GradScaler, got {type(scaler).__name__}")
    forward: Callable[..., Any]
    if compile_model is True or isinstance(compile_model, dict):
        options = compile_model if isinstance(compile_model, dict) else {}
        forward = _compiled(model, options)
        loss_fn.compile(**options)
    elif compile_model is False:
        forward = model
    else:
        raise TypeError(f"compile_model must be a bool or a dict of torch.compile arguments, got {compile_model!r}")
    update = swav_training_step(
        model,
        optimizer,
        loss_fn,
        device,
        non_blocking,
        prepare_batch,
        model_transform,
        output_transform,
        gradient_accumulation_steps,
        model_fn if forward is model else lambda _, x: model_fn(forward, x),
        freeze_prototypes_iters=freeze_prototypes_iters,
        freeze_prototypes_epochs=freeze_prototypes_epochs,
        prototypes=prototypes,
        augment=augment,
        autocast_dtype=autocast_dtype,
        scaler=grad_scaler,
    )
    trainer: _AgreedStop = _ResumableDeterministicEngine(update) if deterministic else _SwAVEngine(update)
    engine = cast(Engine, trainer)
    # first on their events: a stop is agreed before the epoch's handlers run, and the last step's verdict is read
    # before any handler (a checkpoint) of the epoch's or the run's end looks at the model
    # the class's functions, not the engine's bound methods: an engine holding itself is a reference cycle, which
    # keeps the model (and a DDP model's process group) alive until the garbage collector runs, maybe at exit
    engine.add_event_handler(Events.STARTED, _AgreedStop._forget_stop)
    engine.add_event_handler(Events.STARTED, _check_epoch_length)
    prototype_layer = cast(nn.Module, prototypes or _find_prototypes(model))
    # per head: each head's equipartition spreads the batch over its own K prototypes
    prototype_count = _prototype_weight(prototype_layer).shape[0] // _num_heads(prototype_layer)
    warnings = _SettingsWarnings(loss_fn, prototype_count, freeze_prototypes_iters, freeze_prototypes_epochs)
    engine.add_event_handler(Events.STARTED, warnings)
    engine.add_event_handler(Events.EPOCH_STARTED, _AgreedStop._agree_on_stop)
    attach_verdict_reads(engine, update.settle)  # type: ignore[attr-defined]  # set by swav_training_step
    engine.register_events(*SwAVEvents)
    _attach_queue_events(engine, loss_fn)
    if grad_scaler is not None:
        engine.state.scaler = grad_scaler  # type: ignore[attr-defined]  # as Ignite does, for checkpoints
    return engine


class _SettingsWarnings:
    """``STARTED``: the known-bad settings of the run (:func:`~ignite_swav.check_settings`), logged once each by rank
    0, with what the engine knows when the run starts: its loader's batch size and data set, its epochs."""

    def __init__(
        self, loss_fn: SwAVLoss, num_prototypes: int, freeze_prototypes_iters: int, freeze_epochs: float | None
    ) -> None:
        self.loss_fn, self.num_prototypes = loss_fn, num_prototypes
        self.freeze, self.freeze_epochs = freeze_prototypes_iters, freeze_epochs
        self.said: set[str] = set()

    def __call__(self, engine: Engine) -> None:
        loader = engine.state.dataloader
        batch_size = getattr(loader, "batch_size", None)
        if not isinstance(batch_size, int):  # not a DataLoader: the batch is not known before the first step
            return
        dataset = getattr(loader, "dataset", None)
        data_length = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
        warnings = check_settings(
            self.loss_fn,
            batch_size=batch_size,
            num_prototypes=self.num_prototypes,
            data_length=data_length,
            epochs=engine.state.max_epochs,
            freeze_prototypes_iters=_frozen_iterations(self.freeze, self.freeze_epochs, engine.state.epoch_length),
        )
        for warning in warnings:
            if warning not in self.said and idist.get_rank() == 0:
                logging.getLogger("ignite_swav.settings").warning(warning)
            self.said.add(warning)


def _check_epoch_length(engine: Engine) -> None:
    """``STARTED``: refuse, on every process, epochs of other lengths (a process that ran out of batches first
    would leave the others waiting in the next collective)."""
    if idist.get_world_size() > 1:
        check_same_on_every_rank(
            "epoch length",
            [engine.state.epoch_length or 0],
            "every process must run the same number of iterations per epoch: give each its shard through "
            "idist.auto_dataloader or a DistributedSampler (drop_last=True), or pass the same epoch_length to run()",
        )


def attach_verdict_reads(engine: Engine, settle: Callable[[Engine], None]) -> None:
    """Read the last deferred verdict of a :func:`swav_training_step` (its ``settle``) at the end of every epoch and
    of the run, so that a refused last step raises there at the latest (once per engine)."""
    if engine.has_event_handler(settle, Events.EPOCH_COMPLETED):
        return
    for event in (Events.EPOCH_COMPLETED, Events.TERMINATE, Events.COMPLETED):
        engine.add_event_handler(event, settle)


def _compiled(model: nn.Module, options: dict[str, Any]) -> Callable[..., Any]:
    """``torch.compile(model, **options)``, whose refusal (now) or compiler failure (at the first call) is one line
    naming the fix."""
    try:
        compiled = torch.compile(model, **options)
    except (RuntimeError, TypeError, ValueError) as error:  # an unknown backend or mode, a bad option
        raise ValueError(
            f"compile_model={options or True!r}: torch.compile refused it ({_first_line(error)}); pass "
            "compile_model=False, or options torch.compile accepts"
        ) from None

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            raise ValueError(
                f"torch.compile could not compile the model ({_first_line(error)}): pass compile_model=False, or "
                "compile_model={'backend': 'eager'} to find the operation it fails on"
            ) from None

    return forward


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def _attach_queue_events(trainer: Engine, loss_fn: SwAVLoss) -> None:
    """Fire ``QUEUE_FIRST_USED`` after the first iteration of a run whose codes used the queue, and say once when the
    loss has a queue handler that is not attached to this trainer (its queue would never be created)."""
    queue_used_in_run, warned = [False], [False]

    def reset(_: Engine) -> None:
        queue_used_in_run[0] = False

    def check_handler(engine: Engine) -> None:
        handler = loss_fn.queue_handler
        if handler is not None and not warned[0] and not handler.is_attached(engine):
            warned[0] = True
            logging.getLogger(__name__).warning(
                "the loss has a SwAVQueueHandler that is not attached to this trainer: its queue is never created "
                "or managed; call handler.attach(trainer)"
            )

    def first_use(engine: Engine) -> None:
        if loss_fn.queue_in_use and not queue_used_in_run[0]:
            queue_used_in_run[0] = True
            engine.fire_event(SwAVEvents.QUEUE_FIRST_USED)

    trainer.add_event_handler(Events.STARTED, reset)
    trainer.add_event_handler(Events.STARTED, check_handler)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, first_use)


def swav_training_step(
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: SwAVLoss,
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    prepare_batch: Callable[..., tuple[Any, Any]] | None = None,
    model_transform: Callable[[Any], Any] = lambda output: output,
    output_transform: Callable[[Any, Any, Any, Tensor], Any] = lambda x, y, y_pred, loss: loss.item(),
    gradient_accumulation_steps: int = 1,
    model_fn: Callable[[Any, Any], Any] = lambda model, x: model(x),
    *,
    freeze_prototypes_iters: int = 0,
    freeze_prototypes_epochs: float | None = None,
    prototypes: nn.Module | None = None,
    augment: Callable[[Any], list[Tensor]] | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> Callable[[Engine, Any], Any]:
    """The update function of one SwAV iteration, as ``ignite.engine.supervised_training_step`` returns one: the
    step of :func:`create_swav_trainer`, for an ``Engine`` of your own.

    The arguments are :func:`create_swav_trainer`'s (see there); the autocast dtype (``None``: no autocast) and a
    ``GradScaler`` are given as they are, not as ``amp_mode`` and ``scaler=True``. Events (``QUEUE_FIRST_USED``) are
    the engine's business: :func:`create_swav_trainer` adds them.

    Example:
        >>> import torch
        >>> from ignite.engine import Engine
        >>> from ignite_swav import SwAVLoss, SwAVModel, SwAVProjectionHead, SwAVPrototypes, swav_training_step
        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
        >>> model = SwAVModel(backbone, SwAVProjectionHead(8, 16, 4), SwAVPrototypes(4, 10))
        >>> step = swav_training_step(model, torch.optim.SGD(model.parameters(), lr=0.1), SwAVLoss())
        >>> crops = [torch.randn(4, 3, 16, 16)] * 2
        >>> isinstance(Engine(step).run([crops] * 2, max_epochs=1).output, float)
        True
    """
    _check_positional_types(model, optimizer, loss_fn)
    for name, function in (("model_transform", model_transform), ("output_transform", output_transform)):
        if not callable(function):
            raise TypeError(f"{name} must be callable, got {type(function).__name__}")
    if not callable(model_fn):
        raise TypeError(f"model_fn must be callable, got {type(model_fn).__name__}")
    if prepare_batch is not None and not callable(prepare_batch):
        raise TypeError(
            f"prepare_batch must be callable (batch, device, non_blocking) -> (x, y), got {type(prepare_batch)}"
        )
    accumulation = check_int("gradient_accumulation_steps", gradient_accumulation_steps, 1)
    freeze_prototypes_iters = check_int("freeze_prototypes_iters", freeze_prototypes_iters, 0)
    freeze_epochs = _check_freeze_epochs(freeze_prototypes_iters, freeze_prototypes_epochs)
    if augment is not None and not callable(augment):
        raise TypeError(f"augment must be callable (images -> list of crop batches), got {type(augment).__name__}")
    prepare: Callable[..., tuple[Any, Any]] = prepare_batch or (
        prepare_multicrop_batch if augment is None else prepare_image_batch
    )
    device_type = device_type_of(device)
    if prototypes is None:
        prototypes = _find_prototypes(model)
        if prototypes is None:
            raise TypeError(
                f"the model ({type(model).__name__}) has no 'prototypes' layer: pass prototypes=<the layer whose "
                "weight rows are the prototypes> (a SwAVPrototypes or a bias-free nn.Linear)"
            )
    prototype_layer = prototypes
    prototype_weight = _prototype_weight(prototype_layer)
    if autocast_dtype == torch.float16 and scaler is None:
        raise ValueError(
            "float16 autocast needs a GradScaler: without loss scaling float16 gradients underflow to zero and the "
            "step fails without a word; pass scaler=True (create_swav_trainer) or a torch.amp.GradScaler, or use "
            "amp_dtype=torch.bfloat16"
        )
    heads = _num_heads(prototype_layer)  # several heads: the loss takes (H, K, D)
    loss_prototypes = prototype_weight if heads == 1 else prototype_weight.view(heads, -1, prototype_weight.shape[1])
    guard = StateGuard(model, extra=[prototype_weight])
    parameters = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): name for name, p in model.named_parameters()}
    verdicts = Verdicts(loss_fn, guard, [names.get(id(p), "?") for p in parameters])
    window: dict[str, Tensor] = {}
    engines_read: weakref.WeakSet[Engine] = weakref.WeakSet()

    def update(engine: Engine, batch: Any) -> Any:
        if engine not in engines_read:  # an Engine of the user's own: the last verdict is read at its ends too
            engines_read.add(engine)
            attach_verdict_reads(engine, verdicts.settle_previous)  # not through update: it would hold itself
        iteration = engine.state.iteration
        opens, closes = (iteration - 1) % accumulation == 0, iteration % accumulation == 0
        if opens:
            optimizer.zero_grad(set_to_none=True)
        model.train()
        x, y = prepare(batch, device=device, non_blocking=non_blocking)
        crops = x
        if augment is not None:
            with torch.no_grad():
                crops = augment(x)
        guard.save()  # a refused step puts back what the forward pass changes in place
        with torch.no_grad():
            prototype_weight.copy_(F.normalize(prototype_weight, dim=1))
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            y_pred = model_transform(model_fn(model, crops))
            embeddings, scores = _embeddings_and_scores(y_pred)
            loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=loss_prototypes, check_finite=False)
            scaled = loss / accumulation if accumulation > 1 else loss
        if scaler is not None:
            scaler.scale(scaled).backward()
        else:
            scaled.backward()
        # The step's verdict, on the device: the loss's checks, the gradients' (GradScaler checks its own) and a stop
        # asked for by one process, combined over the processes where they meet anyway, after the backward pass.
        step = verdicts.decide(engine, loss_fn, None if scaler is not None else parameters)
        verdicts.settle_previous(engine)  # the previous step's, read now that this step's work is queued
        refused = step.refused
        window["refused"] = refused if opens else window["refused"] | refused
        step.commit()
        if closes:
            frozen = _frozen_iterations(freeze_prototypes_iters, freeze_epochs, engine.state.epoch_length)
            if iteration <= (frozen or 0):
                for parameter in prototype_layer.parameters():
                    parameter.grad = None
            if scaler is not None:
                fill_momentum_buffers(optimizer)
                poison_gradients_where(window["refused"], parameters)  # GradScaler then skips the update itself
                scaler.step(optimizer)
                scaler.update()
                verdicts.defer(step)
            elif skips_on_device(optimizer):
                optimizer.found_inf = window["refused"].float()  # type: ignore[attr-defined]  # as GradScaler passes it
                optimizer.step()
                # None rather than del (torch.compile loses an attribute set and deleted in one frame), and no
                # try block around the step (a graph break inside one cannot resume)
                optimizer.found_inf = None  # type: ignore[attr-defined]
                verdicts.defer(step)
            else:  # an optimizer that cannot skip on the device: the verdict is read now (the step's one wait)
                verdicts.settle(engine, step)
                optimizer.step()
        else:
            verdicts.defer(step)
        return output_transform(crops if augment is not None else x, y, y_pred, loss)

    update.settle = verdicts.settle_previous  # type: ignore[attr-defined]  # for the engine's epoch and run ends
    return update


def _check_freeze_epochs(freeze_prototypes_iters: int, freeze_prototypes_epochs: object) -> float | None:
    """``freeze_prototypes_epochs`` as a float (``None`` when not given), or raise when it is bad or given with
    ``freeze_prototypes_iters``."""
    if freeze_prototypes_epochs is None:
        return None
    epochs = check_nonnegative_float("freeze_prototypes_epochs", freeze_prototypes_epochs)
    if freeze_prototypes_iters:
        raise ValueError(
            f"give freeze_prototypes_iters ({freeze_prototypes_iters}) or freeze_prototypes_epochs "
            f"({freeze_prototypes_epochs}), not both"
        )
    return epochs


def _frozen_iterations(iters: int, epochs: float | None, epoch_length: int | None) -> int | None:
    """The iterations whose steps leave the prototypes as they are: ``iters``, or ``epochs`` of ``epoch_length``
    (``None`` while the epoch length is not known)."""
    if epochs is None:
        return iters
    return None if epoch_length is None else round(epochs * epoch_length)


def _embeddings_and_scores(y_pred: Any) -> tuple[list[Tensor], list[Tensor]]:
    if not (isinstance(y_pred, (tuple, list)) and len(y_pred) == 2):
        raise TypeError(
            "the model's output (through model_transform) must be an (embeddings, scores) pair of lists of "
            f"tensors, one per crop; got {type(y_pred).__name__}"
        )
    return y_pred[0], y_pred[1]
