"""A module evaluated without losing its mode (nor the modes of the modules inside it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def training_modes(module: nn.Module) -> dict[nn.Module, bool]:
    """The mode of ``module`` and of every module inside it (a frozen BatchNorm in a training model keeps its own)."""
    return {m: m.training for m in module.modules()}


def restore_modes(modes: dict[nn.Module, bool]) -> None:
    """Put every module of :func:`training_modes` back in its mode."""
    for module, training in modes.items():
        module.training = training


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, then every module inside it in the mode it had before (also when
    the block raises)."""
    modes = training_modes(module)
    module.eval()
    try:
        yield module
    finally:
        restore_modes(modes)
