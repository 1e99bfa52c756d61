"""Weighted k-nearest-neighbour accuracy, to watch the representations improve during pretraining."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F
from ignite import distributed as idist
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from torch import Tensor, nn

from ignite_swav._validation import check_int, check_positive_float

__all__ = ["KNNAccuracy", "create_knn_evaluator", "extract_features", "recalibrate_batchnorm"]


def _image_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"a labelled batch must be an (images, labels) pair, got {type(batch).__name__}")
    return batch[0], batch[1]


def _prepared(
    batch: Any, prepare_batch: Callable[[Any], tuple[Tensor, Tensor]], device: str | torch.device | None
) -> tuple[Tensor, Tensor]:
    images, labels = prepare_batch(batch)
    return (images.to(device) if device is not None else images), labels


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None = None,
    prepare_batch: Callable[[Any], tuple[Tensor, Tensor]] = _image_batch,
) -> tuple[Tensor, Tensor]:
    """L2-normalised backbone features and labels of every ``(images, labels)`` batch of ``loader``.

    In a distributed run the features of all ranks are gathered, so every rank returns the whole set. The
    backbone is put in eval mode and restored to its mode afterwards.
    """
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for batch in loader:
            images, targets = _prepared(batch, prepare_batch, device)
            features.append(F.normalize(backbone(images).flatten(1).float(), dim=1))
            labels.append(targets.to(features[-1].device))
    finally:
        backbone.train(was_training)
    if not features:
        raise ValueError("the loader gave no batch: features need at least one labelled image")
    return _gather_rows(torch.cat(features)), _gather_rows(torch.cat(labels).long())


def _gather_rows(tensor: Tensor) -> Tensor:
    """The rows of every rank, in rank order; ranks may hold different numbers of rows."""
    world_size = idist.get_world_size()
    if world_size == 1:
        return tensor
    counts = idist.all_gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = idist.all_gather(padded.unsqueeze(0)).view(world_size, *padded.shape)
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])


@torch.no_grad()
def recalibrate_batchnorm(
    backbone: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None = None,
    prepare_batch: Callable[[Any], tuple[Tensor, Tensor]] = _image_batch,
) -> nn.Module:
    """A copy of ``backbone`` in eval mode whose batch norm running statistics are those of ``loader``'s images.

    Multi-crop training leaves running statistics of augmented crops; re-estimating them on the images that
    are evaluated ("precise BN") is an alternative evaluation protocol: report which one you use, and use the
    same for every network you compare. The statistics are the average over all batches, then over ranks.
    The backbone itself is not changed. Without batch norm layers, the backbone
    is returned as it is.
    """
    layers = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return backbone
    copy = deepcopy(backbone)
    layers = [m for m in copy.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches
    copy.train()
    for batch in loader:
        copy(_prepared(batch, prepare_batch, device)[0])
    world_size = idist.get_world_size()
    for layer in layers:
        if world_size > 1:
            layer.running_mean.copy_(idist.all_reduce(layer.running_mean.clone()) / world_size)
            layer.running_var.copy_(idist.all_reduce(layer.running_var.clone()) / world_size)
    return copy.eval()


class KNNAccuracy(Metric):
    """Top-1 accuracy of weighted k-NN voting on cosine similarity against a labelled feature bank.

    Each sample's ``k`` most similar bank entries vote for their label with weight ``exp(similarity /
    temperature)`` (Wu et al. 2018, as used to monitor SwAV, DINO and others). Call :meth:`set_reference`
    with the bank before the evaluation (:func:`create_knn_evaluator` does it at every run). The counts are
    summed over ranks, and the bank is the same on every rank (gathered by :func:`extract_features`).

    ``update`` takes ``(features, labels)``: ``(N, F)`` features (normalised here) and ``(N,)`` labels.

    Args:
        k: number of neighbours.
        temperature: temperature of the vote weights.
        output_transform: maps the engine's output to ``(features, labels)``.
        device: where the counts live.

    Example:
        >>> import torch
        >>> from ignite_swav import KNNAccuracy
        >>> metric = KNNAccuracy(k=1)
        >>> metric.set_reference(torch.eye(2), torch.tensor([0, 1]))
        >>> metric.update((torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0])))
        >>> metric.compute()
        0.5
    """

    _state_dict_all_req_keys = ("_correct", "_count")

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        output_transform: Callable[[Any], Any] = lambda x: x,
        device: str | torch.device = "cpu",
    ) -> None:
        self.k = check_int("k", k, 1)
        self.temperature = check_positive_float("temperature", temperature)
        self._bank: Tensor | None = None
        self._bank_labels: Tensor | None = None
        super().__init__(output_transform=output_transform, device=device)

    def set_reference(self, features: Tensor, labels: Tensor) -> None:
        """Use ``features`` (``(M, F)``) with ``labels`` (``(M,)``) as the bank of neighbours."""
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0] or len(labels) == 0:
            raise ValueError(
                f"the reference needs (M, F) features and (M,) labels with M > 0, got {tuple(features.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self._bank = F.normalize(features.float(), dim=1)
        self._bank_labels = labels.long().to(features.device)
        self._num_classes = int(self._bank_labels.max()) + 1

    @reinit__is_reduced
    def reset(self) -> None:
        self._correct = torch.tensor(0, dtype=torch.long, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple[Tensor, Tensor]) -> None:
        if self._bank is None or self._bank_labels is None:
            raise RuntimeError("KNNAccuracy has no reference bank: call set_reference(features, labels) first")
        features, labels = output
        if features.ndim != 2 or features.shape[1] != self._bank.shape[1]:
            raise ValueError(f"features must be (N, {self._bank.shape[1]}) like the bank, got {tuple(features.shape)}")
        features = F.normalize(features.float(), dim=1).to(self._bank.device)
        similarity = features @ self._bank.t()
        k = min(self.k, self._bank.shape[0])
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(features.shape[0], self._num_classes, device=features.device)
        votes.scatter_add_(1, self._bank_labels[top_index], (top_similarity / self.temperature).exp())
        predicted = votes.argmax(dim=1)
        self._correct += (predicted == labels.to(predicted.device)).sum().to(self._device)
        self._count += labels.shape[0]

    @sync_all_reduce("_correct", "_count")
    def compute(self) -> float:
        if self._count == 0:
            raise NotComputableError("KNNAccuracy needs at least one sample before it can be computed")
        return self._correct.item() / self._count.item()


def create_knn_evaluator(
    backbone: nn.Module,
    reference_loader: Iterable[Any],
    device: str | torch.device | None = None,
    k: int = 20,
    temperature: float = 0.07,
    prepare_batch: Callable[[Any], tuple[Tensor, Tensor]] = _image_batch,
    metric_name: str = "knn_top1",
    recalibrate_bn: bool = False,
) -> Engine:
    """An evaluator that embeds ``reference_loader`` at the start of each run, then scores its own data.

    ``evaluator.run(heldout_loader)`` gives ``evaluator.state.metrics[metric_name]``: the weighted k-NN top-1
    of the held-out images against the reference bank, with the backbone as it is at that moment (in eval
    mode; with ``recalibrate_bn``, a copy whose batch norm statistics are re-estimated on the reference
    images, see :func:`recalibrate_batchnorm`).

    Example:
        .. code-block:: python

            evaluator = create_knn_evaluator(backbone, train_eval_loader, device=idist.device())

            @trainer.on(Events.EPOCH_COMPLETED)
            def knn(_):
                evaluator.run(heldout_loader)
                print(evaluator.state.metrics["knn_top1"])
    """
    metric = KNNAccuracy(k=k, temperature=temperature)
    # The network evaluated in this run (the backbone, or its recalibrated copy) and the backbone's mode.
    evaluated: dict[str, Any] = {"net": backbone, "was_training": backbone.training}

    @torch.no_grad()
    def step(engine: Engine, batch: Any) -> tuple[Tensor, Tensor]:
        images, labels = _prepared(batch, prepare_batch, device)
        return evaluated["net"](images).flatten(1).float(), labels

    evaluator = Engine(step)

    @evaluator.on(Events.STARTED)
    def embed_reference(_: Engine) -> None:
        evaluated["was_training"] = backbone.training
        net = recalibrate_batchnorm(backbone, reference_loader, device, prepare_batch) if recalibrate_bn else backbone
        evaluated["net"] = net.eval()
        metric.set_reference(*extract_features(net, reference_loader, device=device, prepare_batch=prepare_batch))

    @evaluator.on(Events.COMPLETED)
    def restore_mode(_: Engine) -> None:
        evaluated["net"] = backbone
        backbone.train(evaluated["was_training"])

    metric.attach(evaluator, metric_name)
    return evaluator
