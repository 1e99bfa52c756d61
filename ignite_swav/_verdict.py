"""The verdict of a training step, decided on the device: what the step must undo when it is refused, the check of
its gradients, and its flags read on the host without stalling the device."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from ignite import distributed as idist
from ignite.engine import Engine
from torch import Tensor, nn
from torch.optim import Optimizer

from ignite_swav._distributed import all_reduce
from ignite_swav.loss import SwAVLoss
from ignite_swav.modules import unwrap_model

# The buffers a forward pass changes in place: BatchNorm's (and InstanceNorm's, when it tracks them) statistics.
_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class StateGuard:
    """The tensors a step changes outside the optimizer's update (BatchNorm running statistics in the forward pass,
    the prototypes' normalisation before it): saved before the step, put back where the step is refused.

    Everything happens on the device (one concatenation per dtype to save, a ``torch.where`` and a grouped copy to
    restore), so the verdict never has to be read for it. The buffers are looked up at every step: moving the model
    after building the trainer replaces them.
    """

    def __init__(self, model: nn.Module, extra: Iterable[Tensor] = ()) -> None:
        self.model = model
        self.extra = list(extra)
        self._saved: dict[torch.dtype, tuple[list[Tensor], Tensor]] = {}  # the tensors, and their values

    def _tensors(self) -> dict[torch.dtype, list[Tensor]]:
        groups: dict[torch.dtype, list[Tensor]] = {}
        named = unwrap_model(self.model).named_buffers()
        buffers = [b for name, b in named if name.rsplit(".", 1)[-1] in _RUNNING_STATISTICS]
        for tensor in [*buffers, *self.extra]:
            groups.setdefault(tensor.dtype, []).append(tensor)
        return groups

    @torch.no_grad()
    def save(self) -> None:
        """Keep a copy of the tensors as they are now."""
        self._saved = {
            dtype: (tensors, torch.cat([t.view(-1) for t in tensors])) for dtype, tensors in self._tensors().items()
        }

    @torch.no_grad()
    def restore_where(self, refused: Tensor) -> None:
        """Put the saved values back where ``refused`` (a boolean on the device) is true; nothing is read."""
        for tensors, saved in self._saved.values():
            views = [t.view(-1) for t in tensors]
            kept = torch.where(refused, saved, torch.cat(views))
            torch._foreach_copy_(views, kept.split([v.numel() for v in views]))

    @torch.no_grad()
    def restore(self) -> None:
        """Put the saved values back."""
        for tensors, saved in self._saved.values():
            views = [t.view(-1) for t in tensors]
            torch._foreach_copy_(views, saved.split([v.numel() for v in views]))


def nonfinite_gradients(parameters: list[nn.Parameter]) -> Tensor:
    """One flag per parameter with a gradient (in order), true where that gradient holds a NaN or an infinity,
    computed on the device: the largest magnitude of each (no overflow, unlike a 2-norm), by grouped kernels."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0, dtype=torch.bool)
    return torch.stack(torch._foreach_norm(grads, float("inf"))).isfinite().logical_not_()


class HostCopy:
    """The values of a small device tensor on the host, without waiting for them when it is taken: an asynchronous
    copy into pinned memory on CUDA, read once the copy is done (by then the device has long finished it, as the
    next step's work is queued behind it); on the CPU the tensor itself, read without a dispatched operation."""

    def __init__(self, tensor: Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.detach()

    def values(self) -> list[float]:
        """The values (waits for the copy when it is not done yet; on devices other than CUDA and the CPU, a plain
        copy to the host)."""
        if self._event is not None:
            self._event.synchronize()
        host = self._host if self._host.device.type == "cpu" else self._host.cpu()
        return [float(v) for v in host.numpy().reshape(-1)]


def skips_on_device(optimizer: Optimizer) -> bool:
    """Whether ``optimizer.step()`` skips its update when given a ``found_inf`` flag, as torch's fused SGD, Adam and
    AdamW do for GradScaler (no host synchronisation), and can do so now."""
    fused = isinstance(optimizer, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)) and all(
        group.get("fused") for group in optimizer.param_groups
    )
    return fused and fill_momentum_buffers(optimizer)


def fill_momentum_buffers(optimizer: Optimizer) -> bool:
    """Before a fused SGD's first step that may be skipped: zero momentum buffers (torch creates them uninitialised
    in that step, and a skipped step leaves them so). With dampening 0 a zero buffer gives exactly the first
    step's update; returns False when that does not hold (dampening), so that the step is decided on the host."""
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    for group in optimizer.param_groups:
        if group["momentum"] == 0 or not group.get("fused"):
            continue
        missing = [p for p in group["params"] if optimizer.state.get(p, {}).get("momentum_buffer") is None]
        if missing and group["dampening"] != 0:
            return False
        for parameter in missing:
            optimizer.state[parameter]["momentum_buffer"] = torch.zeros_like(parameter)
    return True


@torch.no_grad()
def poison_gradients_where(refused: Tensor, parameters: list[nn.Parameter]) -> None:
    """Make the smallest gradient infinite where ``refused`` (on the device), so that GradScaler skips the step."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        smallest = min(grads, key=lambda g: g.numel())
        smallest.add_(torch.where(refused, float("inf"), 0.0).to(smallest.dtype))


class StepVerdict:
    """One step's verdict: its flags over all processes (the loss's checks, the gradients', a stop request), the
    loss's pending push, and this process's per-parameter gradient flags (for the message)."""

    def __init__(
        self, flags: Tensor, pending: Any, gradient_flags: Tensor | None, gradient_names: list[str], loss_fn: SwAVLoss
    ) -> None:
        self.flags, self.pending, self.loss_fn = flags, pending, loss_fn
        self.gradient_flags, self.gradient_names = gradient_flags, gradient_names
        self.refused = flags[:_STOP].any()
        self.counted = 0

    def commit(self) -> None:
        """Push the loss's embeddings into the queue where the step is accepted (decided on the device)."""
        self.counted = self.loss_fn._commit(self.pending, self.refused.logical_not())


_STOP = -1  # the flags' last entry: 0, or a stop asked for by a process (1; 2 with skip_completed)


class Verdicts:
    """The training step's verdicts: decided on the device, read on the host at once (an optimizer that cannot skip
    its update on the device) or one step later, or at the end of the epoch or run at the latest."""

    def __init__(self, loss_fn: SwAVLoss, guard: StateGuard, names: list[str]) -> None:
        self.loss_fn, self.guard, self.names = loss_fn, guard, names
        self._pending: tuple[StepVerdict, HostCopy] | None = None
        self._constants: dict[torch.device, Tensor] = {}

    def decide(self, engine: Engine, loss_fn: SwAVLoss, parameters: list[nn.Parameter] | None) -> StepVerdict:
        pending = loss_fn._take_pending()
        assert pending is not None, "the step called its loss with check_finite=False just before"
        device = pending.flags.device
        if device not in self._constants:
            self._constants[device] = torch.tensor([0.0, 1.0, 2.0], device=device)
        gradient_flags = nonfinite_gradients(parameters) if parameters is not None else None
        # the names of the parameters those flags are of (those with a gradient in this step), for the message
        with_grad = [name for name, p in zip(self.names, parameters or []) if p.grad is not None]
        bad_gradients = (
            gradient_flags.any().float().to(device).view(1)
            if gradient_flags is not None and gradient_flags.numel()
            else self._constants[device][:1]
        )
        request = getattr(engine, "stop_request", False)  # create_swav_trainer's engine: a stop asked for
        code = 2 if request == "skip_completed" else 1 if request else 0
        stop = self._constants[device][code : code + 1]
        flags = torch.cat([pending.flags, bad_gradients, stop])
        if idist.get_world_size() > 1:
            flags = all_reduce(flags, op="MAX")
        step = StepVerdict(flags, pending, gradient_flags, with_grad, loss_fn)
        self.guard.restore_where(step.refused)
        return step

    def defer(self, step: StepVerdict) -> None:
        self._pending = (step, HostCopy(step.flags))
        last = self.loss_fn.last_step
        if last is not None:
            self.loss_fn.last_step = last._replace(accepted=step.refused.logical_not())

    def settle_previous(self, engine: Engine) -> None:
        """Read the deferred verdict (if any): raise its error, or stop the run on every process if asked."""
        if self._pending is not None:
            step, host = self._pending
            self._pending = None
            self._act(engine, step, host.values())

    def settle(self, engine: Engine, step: StepVerdict) -> None:
        """Read this step's verdict now (a wait for the device)."""
        self._pending = None
        last = self.loss_fn.last_step
        if last is not None:
            self.loss_fn.last_step = last._replace(accepted=step.refused.logical_not())
        self._act(engine, step, [float(v) for v in step.flags.tolist()])

    def _act(self, engine: Engine, step: StepVerdict, values: list[float]) -> None:
        if any(values[:_STOP]):
            self.guard.restore()  # a step under way when an earlier one is found bad: it changes nothing either
            self.loss_fn._uncount(step.pending, step.counted)  # its push was skipped on the device
            if any(values[:4]):  # the loss's own checks: its message names the crop (a collective: every rank is here)
                self.loss_fn._raise_bad_values(step.pending)
            raise ValueError(self._gradient_message(step))
        carry_out_stop = getattr(engine, "carry_out_stop", None)  # create_swav_trainer's engine
        if values[_STOP] and callable(carry_out_stop):
            carry_out_stop(values[_STOP])

    def _gradient_message(self, step: StepVerdict) -> str:
        flags = step.gradient_flags
        bad = [n for n, f in zip(step.gradient_names, flags.tolist() if flags is not None else []) if f]
        where = f"in {', '.join(bad[:3])}{' and others' if len(bad) > 3 else ''}" if bad else "on another process"
        return (
            f"non-finite gradients (NaN or inf) {where}: the step was refused before the optimizer changed any weight "
            "(the model's output was finite); lower the learning rate, clip the gradients, or train without "
            "autocast (bfloat16's range is float32's but its precision is 3 digits)"
        )
