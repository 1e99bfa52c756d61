"""Small collectives shared by the package, through ``ignite.distributed`` (so every Ignite backend works).

On one process none of them communicates.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from ignite import distributed as idist
from torch import Tensor
from torch.utils.data import DistributedSampler


def all_reduce(tensor: Tensor, op: str = "SUM") -> Tensor:
    """``idist.all_reduce`` of a tensor, typed as the tensor it returns (Ignite's typing allows numbers too)."""
    return cast(Tensor, idist.all_reduce(tensor, op=op))


def all_gather(tensor: Tensor) -> Tensor:
    """``idist.all_gather`` of a tensor: the tensors of every rank concatenated along the first dimension."""
    return cast(Tensor, idist.all_gather(tensor))


def broadcast(tensor: Tensor, src: int = 0) -> Tensor:
    """``idist.broadcast`` of a tensor from rank ``src``."""
    return cast(Tensor, idist.broadcast(tensor, src=src))


def values_by_rank(values: list[int]) -> list[tuple[int, ...]]:
    """``values`` of every rank, in rank order (one all_gather; on one process, no collective)."""
    if idist.get_world_size() == 1:
        return [tuple(values)]
    gathered = all_gather(torch.tensor([values], device=idist.device()))
    return [tuple(row) for row in gathered.view(-1, len(values)).tolist()]


def check_same_on_every_rank(what: str, values: list[int], advice: str) -> None:
    """Raise a ``ValueError`` naming ``what`` and each rank's values when the ranks' ``values`` differ (one
    all_gather): called before a collective that would otherwise abort (gloo) or hang on unequal shapes."""
    by_rank = values_by_rank(values)
    if len(set(by_rank)) > 1:
        shown = [row[0] if len(row) == 1 else row for row in by_rank]
        raise ValueError(f"the {what} differs between processes ({shown}, by rank): {advice}")


def any_flag_on_any_rank(flags: Tensor) -> Tensor:
    """``flags`` (a float tensor of 0/1) combined with every other rank's by maximum; stays on the device."""
    return all_reduce(flags, op="MAX")


def non_finite_on_any_rank(tensors: list[Tensor]) -> list[bool]:
    """For each tensor, whether it holds a NaN or an infinity on this rank or any other rank (waits for the
    device: for error paths and one-off checks)."""
    flags = torch.stack([~torch.isfinite(t).all() for t in tensors]).to(torch.float32)
    return [bool(f) for f in any_flag_on_any_rank(flags).tolist()]


def max_over_ranks(values: Tensor) -> Tensor:
    """The element-wise maximum of ``values`` over the ranks (a new tensor on several ranks, ``values`` itself
    on one)."""
    return values if idist.get_world_size() == 1 else all_reduce(values.clone(), op="MAX")


def log_sum_over_ranks(log_values: Tensor) -> Tensor:
    """``log(sum_r exp(log_values_r))`` over the ranks, element-wise, without overflow: two all-reduces of the
    tensor (its maximum, then the sum of ``exp`` below it), so each rank sends O(numel) values whatever the
    world size."""
    if idist.get_world_size() == 1:
        return log_values  # not only the collectives: the exp and log around them would change nothing either
    top = all_reduce(log_values.clone(), op="MAX")
    total = all_reduce(torch.exp(log_values - top), op="SUM")
    return total.log_().add_(top)


def gather_rows(tensor: Tensor) -> Tensor:
    """The rows of every rank, in rank order; ranks may hold different numbers of rows."""
    # Not idist.all_gather_tensors_with_shapes: it indexes with a list, which torch deprecates (a warning per call).
    counts = all_gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = all_gather(padded.unsqueeze(0)).view(len(counts), *padded.shape)
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])


def real_rows_of_rank(loader: Any) -> int | None:
    """How many of the rows this rank's ``loader`` gives are real samples when its sampler is a
    ``DistributedSampler`` that pads the data set with repeated samples (``idist.auto_dataloader`` makes one),
    so that every sample is counted once over the ranks; ``None`` when nothing is padded."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    size = len(sampler.dataset)  # type: ignore[arg-type]
    if sampler.total_size <= size:
        return None
    # the padded index list repeats its head at its end: positions >= size are repeats, rank r takes r, r + W, ...
    return len(range(sampler.rank, size, sampler.num_replicas))
