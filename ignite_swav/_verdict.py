"""The verdict of a training step, decided on the device: what the step must undo when it is refused, the check of
its gradients, and its flags read on the host without stalling the device."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ignite_swav._wrappers import unwrap_model

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
