"""The modules users hand us: the module inside their wrappers (DDP and DataParallel ``.module``, torch.compile
``._orig_mod``), and a module evaluated without losing its mode."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from torch import nn


def unwrap_model(module: nn.Module) -> nn.Module:
    """``module`` without its DDP / DataParallel / ``torch.compile`` wrappers (a few levels at most)."""
    for _ in range(8):
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = cast(nn.Module, module.module)
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = cast(nn.Module, module._orig_mod)
        else:
            break
    return module


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block, then in the mode it had before (also when the block raises)."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
