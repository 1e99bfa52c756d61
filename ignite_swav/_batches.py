"""One rule for what a batch holds, shared by the trainer, the online probe and the cluster assignment."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """``(data, target)`` of a batch: a ``(data, target)`` pair, as torchvision data sets and our collates give
    (the data a list of crops or images, or a ``(N, C, H, W)`` tensor; the target a 1-D or scalar tensor), or the
    data alone (target ``None``). A list of two crop batches is data, not a pair: its second item is 4-D."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor) and batch[1].ndim <= 1:
        if isinstance(batch[0], (tuple, list)) or (isinstance(batch[0], Tensor) and batch[0].ndim == 4):
            return batch[0], batch[1]
    return batch, None
