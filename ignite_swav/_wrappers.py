"""The module inside the wrappers users put around a model: DDP and DataParallel (``.module``), torch.compile
(``._orig_mod``)."""

from __future__ import annotations

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
