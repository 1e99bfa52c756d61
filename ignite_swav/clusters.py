"""The cluster of new images: the prototype a trained SwAV model assigns to each."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ignite_swav._batches import split_batch
from ignite_swav._distributed import gather_rows, non_finite_on_any_rank, real_rows_of_rank, values_by_rank
from ignite_swav._validation import check_int, check_positive_float
from ignite_swav._wrappers import evaluating
from ignite_swav.modules import SwAVModel, unwrap_model
from ignite_swav.sinkhorn import sinkhorn

__all__ = ["assign_clusters"]


def _images_of(batch: Any) -> Any:
    return split_batch(batch)[0]


@torch.no_grad()
def assign_clusters(
    model: nn.Module,
    data: Iterable[Any],
    device: str | torch.device | None = None,
    balanced: bool = False,
    *,
    prepare_images: Callable[[Any], Tensor] = _images_of,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    head: int = 0,
) -> Tensor:
    """The prototype (cluster) id of every image of ``data``, by a trained :class:`SwAVModel`.

    ``data`` yields batches of ``(N, C, H, W)`` images, or ``(images, labels)`` pairs (the labels are ignored;
    ``prepare_images`` maps any other batch to its images). The model runs in eval mode (its mode is restored
    after) on the images moved to ``device``; each image's scores are its unit embedding against the
    L2-normalised prototypes. ``balanced=False``: the id is the highest-scoring prototype. ``balanced=True``: the
    argmax of SwAV's codes, a Sinkhorn-Knopp equipartition over all the images of the call (of all ranks), so that
    the clusters are of about equal sizes, as in training.

    In an ``idist`` group every rank passes its own shard of the images; the ids of all ranks are gathered in
    rank order (rank 0's images, then rank 1's, ...), the same on every rank. A model of several prototype heads
    (DeepCluster-v2, SeLa-v2) assigns by one: ``head`` (ids from 0 to K - 1 of that head).

    Returns:
        A ``LongTensor`` of prototype ids, one per image, on the CPU.

    Example:
        >>> import torch
        >>> from ignite_swav import SwAVModel, SwAVProjectionHead, SwAVPrototypes, assign_clusters
        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
        >>> model = SwAVModel(backbone, SwAVProjectionHead(8, 16, 4), SwAVPrototypes(4, 10))
        >>> ids = assign_clusters(model, [torch.randn(6, 3, 16, 16), torch.randn(2, 3, 16, 16)])
        >>> ids.shape, bool(((ids >= 0) & (ids < 10)).all())
        (torch.Size([8]), True)
    """
    swav = unwrap_model(model) if isinstance(model, nn.Module) else model
    if not isinstance(swav, SwAVModel):
        raise TypeError(f"model must be an ignite_swav.SwAVModel (possibly wrapped by DDP), got {type(model).__name__}")
    if not isinstance(balanced, bool):
        raise TypeError(f"balanced must be a bool, got {balanced!r}")
    epsilon = check_positive_float("epsilon", epsilon)
    sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, 1)
    heads = swav.prototypes.num_heads
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < heads:
        raise ValueError(f"head must be an integer from 0 to {heads - 1} (the model's prototype heads), got {head!r}")
    weight = swav.prototypes.weight.detach().float()
    prototypes = F.normalize(weight.view(heads, -1, weight.shape[1])[head], dim=1)
    with evaluating(swav):
        scores = []
        for index, batch in enumerate(data):
            images = prepare_images(batch)
            if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0:
                shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
                raise ValueError(
                    f"batch {index} of data holds no images: expected a (N, C, H, W) tensor or an (images, labels) "
                    f"pair, got {shape}"
                )
            embeddings = swav([images.to(device=device or prototypes.device)])[0][0]
            scores.append(F.normalize(embeddings.float(), dim=1) @ prototypes.to(embeddings.device).t())
    # a rank whose shard is empty (or all padding) takes part with no row: the equipartition is over the others'
    real = real_rows_of_rank(data)  # not the repeats of a padded DistributedSampler
    local = torch.cat(scores)[:real] if scores else prototypes.new_zeros(0, prototypes.shape[0])
    if sum(row[0] for row in values_by_rank([len(local)])) == 0:
        raise ValueError("data yielded no images (on any process): there is nothing to assign")
    if any(non_finite_on_any_rank([local])):  # NaN would win every argmax: every image in cluster 0, silently
        raise ValueError(
            "some images give NaN or infinite embeddings (on this rank or another one): check the images (a NaN "
            "pixel?) and the model's weights; no cluster was assigned"
        )
    if balanced:
        ids = sinkhorn(local, iterations=sinkhorn_iterations, epsilon=epsilon, max_abs_score=1.0).argmax(dim=1)
    else:
        ids = local.argmax(dim=1)
    return gather_rows(ids).cpu()
