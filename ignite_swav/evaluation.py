"""Weighted k-nearest-neighbour accuracy, to watch the representations improve during pretraining."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch
import torch.nn.functional as F
from ignite import distributed as idist
from ignite.engine import Engine, Events, _prepare_batch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from ignite_swav._distributed import all_reduce, gather_rows, real_rows_of_rank, values_by_rank
from ignite_swav._validation import check_int, check_positive_float, device_type_of, resolve_autocast_dtype
from ignite_swav._wrappers import evaluating, restore_modes, training_modes

__all__ = ["KNNAccuracy", "create_knn_evaluator", "extract_features", "recalibrate_batchnorm"]


def _features(
    backbone: nn.Module,
    images: Any,
    model_transform: Callable[[Any], Any],
    device_type: str,
    autocast_dtype: torch.dtype | None,
) -> Tensor:
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        output = model_transform(backbone(images))
    return F.normalize(output.flatten(1).float(), dim=1)


@torch.no_grad()
def _extract(
    backbone: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None,
    non_blocking: bool,
    prepare_batch: Callable[..., tuple[Any, Any]],
    model_transform: Callable[[Any], Any],
    amp_mode: str | None = None,
) -> tuple[Tensor, Tensor]:
    device_type, autocast_dtype = _autocast(amp_mode, device)
    features, labels = [], []
    for batch in loader:
        images, targets = prepare_batch(batch, device=device, non_blocking=non_blocking)
        features.append(_features(backbone, images, model_transform, device_type, autocast_dtype))
        labels.append(targets.to(features[-1].device))
    real = real_rows_of_rank(loader)  # without the repeated samples a padded DistributedSampler adds
    # a rank whose shard is empty (or all padding) still takes part: the width comes from the others
    width = features[0].shape[1] if features else 0
    counts = values_by_rank([sum(len(f) for f in features) if real is None else real, width])
    if sum(c[0] for c in counts) == 0:
        raise ValueError("the loader gave no batch (on any process): features need at least one labelled image")
    width = max(c[1] for c in counts)
    device = features[0].device if features else torch.device(device or "cpu")
    local_features = torch.cat(features)[:real] if features else torch.zeros(0, width, device=device)
    local_labels = torch.cat(labels).long()[:real] if labels else torch.zeros(0, dtype=torch.long, device=device)
    return gather_rows(local_features), gather_rows(local_labels)


def _autocast(amp_mode: str | None, device: str | torch.device | None) -> tuple[str, torch.dtype | None]:
    # the trainer's choice and checks: bfloat16 on the CPU, float16 on CUDA
    device_type = device_type_of(device)
    return device_type, resolve_autocast_dtype(amp_mode, None, device_type)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    prepare_batch: Callable[..., Any] = _prepare_batch,
    model_transform: Callable[[Any], Any] = lambda output: output,
) -> tuple[Tensor, Tensor]:
    """L2-normalised features (``model_transform(backbone(x))``, flattened) and labels of every batch of
    ``loader``, prepared by ``prepare_batch(batch, device, non_blocking) -> (x, y)`` as in Ignite.

    In a distributed run the features of all ranks are gathered, so every rank returns the whole set. The
    backbone is put in eval mode and restored to its mode afterwards.

    Example:
        >>> import torch
        >>> from ignite_swav import extract_features
        >>> loader = [(torch.randn(4, 6), torch.tensor([0, 1, 0, 1]))] * 2
        >>> features, labels = extract_features(torch.nn.Linear(6, 3), loader)
        >>> features.shape, labels.shape
        (torch.Size([8, 3]), torch.Size([8]))
    """
    with evaluating(backbone):
        return _extract(backbone, loader, device, non_blocking, prepare_batch, model_transform)


@torch.no_grad()
def recalibrate_batchnorm(
    backbone: nn.Module,
    loader: Iterable[Any],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    prepare_batch: Callable[..., Any] = _prepare_batch,
) -> nn.Module:
    """A copy of ``backbone`` in eval mode whose batch norm running statistics are those of ``loader``'s images.

    Multi-crop training leaves running statistics of augmented crops; re-estimating them on the images that
    are evaluated ("precise BN") is an alternative evaluation protocol: report which one you use, and use the
    same for every network you compare. The statistics are the average over all batches
    (``torch.optim.swa_utils.update_bn``) of every rank, as one process gets with the whole loader (ranks with
    more batches weigh more). The backbone itself is not changed. Without batch norm layers, the backbone is
    returned as it is.

    Example:
        >>> import torch
        >>> from ignite_swav import recalibrate_batchnorm
        >>> backbone = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
        >>> loader = [(torch.randn(8, 2) + 5, torch.zeros(8))] * 3
        >>> recalibrated = recalibrate_batchnorm(backbone, loader)
        >>> bool(recalibrated[1].running_mean.abs().sum() > 0), float(backbone[1].running_mean.abs().sum())
        (True, 0.0)
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
        return backbone
    copy = deepcopy(backbone)
    seen = [0]

    def images() -> Iterable[Any]:
        for batch in loader:
            seen[0] += 1
            yield prepare_batch(batch, device=device, non_blocking=non_blocking)[0]

    update_bn(images(), copy)  # each statistic: the average over this rank's batches
    if idist.get_world_size() > 1:
        # over the ranks, weighted by their numbers of batches: the average over all batches, as on one process
        # with the whole loader; a rank with no batch weighs nothing
        total = sum(row[0] for row in values_by_rank([seen[0]]))
        for layer in copy.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
                assert layer.running_mean is not None and layer.running_var is not None  # track_running_stats
                for statistic in (layer.running_mean, layer.running_var):
                    statistic.copy_(all_reduce(statistic * seen[0]) / max(total, 1))
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
        skip_unrolling: as in ``ignite.metrics.Metric``.

    Example:
        >>> import torch
        >>> from ignite_swav import KNNAccuracy
        >>> metric = KNNAccuracy(k=1)
        >>> metric.set_reference(torch.eye(2), torch.tensor([0, 1]))
        >>> metric.update((torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 0])))
        >>> metric.compute()
        0.5
    """

    _state_dict_all_req_keys = ("_correct", "_count", "_invalid")

    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        output_transform: Callable[[Any], Any] = lambda x: x,
        device: str | torch.device = "cpu",
        skip_unrolling: bool = False,
    ) -> None:
        self.k = check_int("k", k, 1)
        self.temperature = check_positive_float("temperature", temperature)
        self._bank: Tensor | None = None
        self._bank_labels: Tensor | None = None
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=skip_unrolling)

    def set_reference(self, features: Tensor, labels: Tensor) -> None:
        """Use ``features`` (``(M, F)``) with ``labels`` (``(M,)``) as the bank of neighbours."""
        if features.ndim != 2 or labels.ndim != 1 or features.shape[0] != labels.shape[0] or len(labels) == 0:
            raise ValueError(
                f"the reference needs (M, F) features and (M,) labels with M > 0, got {tuple(features.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if labels.is_floating_point():
            raise TypeError(f"the reference labels must be integers, got dtype {labels.dtype}")
        lowest, highest = torch.stack([labels.min(), labels.max()]).tolist()  # one read, once per evaluation
        if lowest < 0:
            raise ValueError(f"the reference labels must be >= 0 (class indices), got {lowest}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("the reference features hold NaN or infinite values (a diverged backbone?)")
        self._bank = F.normalize(features.float(), dim=1)
        self._bank_labels = labels.long().to(features.device)
        self._num_classes = int(highest) + 1

    @reinit__is_reduced
    def reset(self) -> None:
        self._correct = torch.tensor(0, dtype=torch.long, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)
        # NaN features or negative labels seen: kept on the device, read once by compute()
        self._invalid = torch.tensor(0, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple[Tensor, Tensor]) -> None:
        if self._bank is None or self._bank_labels is None:
            raise RuntimeError("KNNAccuracy has no reference bank: call set_reference(features, labels) first")
        features, labels = output
        if features.ndim != 2 or features.shape[1] != self._bank.shape[1]:
            raise ValueError(f"features must be (N, {self._bank.shape[1]}) like the bank, got {tuple(features.shape)}")
        invalid = (~torch.isfinite(features).all()) | (labels < 0).any()
        self._invalid |= invalid.to(device=self._device, dtype=torch.long)
        features = F.normalize(features.float(), dim=1).to(self._bank.device)
        similarity = features @ self._bank.t()
        k = min(self.k, self._bank.shape[0])
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(features.shape[0], self._num_classes, device=features.device)
        votes.scatter_add_(1, self._bank_labels[top_index], (top_similarity / self.temperature).exp())
        predicted = votes.argmax(dim=1)
        self._correct += (predicted == labels.to(predicted.device)).sum().to(self._device)
        self._count += labels.shape[0]

    @sync_all_reduce("_correct", "_count", "_invalid:MAX")
    def compute(self) -> float:
        if self._invalid.item():
            raise ValueError(
                "KNNAccuracy was given NaN or infinite features, or negative labels (on this rank or another one): "
                "no accuracy is computed from them"
            )
        if self._count == 0:
            raise NotComputableError("KNNAccuracy needs at least one sample before it can be computed")
        return self._correct.item() / self._count.item()


def create_knn_evaluator(
    backbone: nn.Module,
    reference_loader: Iterable[Any],
    device: str | torch.device | None = None,
    non_blocking: bool = False,
    prepare_batch: Callable[..., Any] = _prepare_batch,
    model_transform: Callable[[Any], Any] = lambda output: output,
    output_transform: Callable[[Any, Any, Any], Any] = lambda x, y, y_pred: (y_pred, y),
    amp_mode: str | None = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    metric_name: str = "knn_top1",
    recalibrate_bn: bool = False,
) -> Engine:
    """An evaluator that embeds ``reference_loader`` at the start of each run, then scores its own data, with
    the arguments of ``ignite.engine.create_supervised_evaluator`` followed by the k-NN settings.

    ``evaluator.run(heldout_loader)`` gives ``evaluator.state.metrics[metric_name]``: the weighted k-NN top-1
    (:class:`KNNAccuracy`) of the held-out images against the reference bank, with the backbone as it is at that
    moment (in eval mode; with ``recalibrate_bn``, a copy whose batch norm statistics are re-estimated on the
    reference images, see :func:`recalibrate_batchnorm`). Batches of both loaders go through
    ``prepare_batch(batch, device, non_blocking) -> (x, y)``; features are ``model_transform(backbone(x))``;
    the engine's output is ``output_transform(x, y, features)``, ``(features, y)`` by default.

    Args:
        backbone: the network whose features are evaluated (``SwAVModel.backbone``).
        reference_loader: labelled batches of the bank of neighbours.
        device: where the batches go.
        non_blocking: passed to ``prepare_batch``.
        prepare_batch: ``(batch, device, non_blocking) -> (x, y)``; Ignite's default takes ``(x, y)`` pairs.
        model_transform: maps the backbone's output to the features.
        output_transform: ``(x, y, y_pred) -> (features, labels)`` for the metric.
        amp_mode: ``None`` or ``"amp"`` (autocast: float16 on CUDA, bfloat16 on CPU).
        k: neighbours of the vote.
        temperature: temperature of the vote weights.
        metric_name: name of the metric in ``evaluator.state.metrics``.
        recalibrate_bn: evaluate a copy with batch norm statistics of the reference images.

    Example:
        >>> import torch
        >>> from ignite_swav import create_knn_evaluator
        >>> backbone = torch.nn.Identity()
        >>> reference = [(torch.eye(2), torch.tensor([0, 1]))]
        >>> evaluator = create_knn_evaluator(backbone, reference, k=1)
        >>> evaluator.run([(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([0, 1]))]).metrics["knn_top1"]
        1.0
    """
    device_type, autocast_dtype = _autocast(amp_mode, device)
    metric = KNNAccuracy(k=k, temperature=temperature)
    # The network evaluated in this run (the backbone, or its recalibrated copy) and the modes of its modules.
    evaluated: dict[str, Any] = {"net": backbone, "modes": training_modes(backbone)}

    @torch.no_grad()
    def step(engine: Engine, batch: Any) -> Any:
        x, y = prepare_batch(batch, device=device, non_blocking=non_blocking)
        y_pred = _features(evaluated["net"], x, model_transform, device_type, autocast_dtype)
        if evaluated["real_rows"] is not None:  # drop the repeated samples of a padded DistributedSampler
            keep = max(0, min(len(y), evaluated["real_rows"] - evaluated["rows_seen"]))
            evaluated["rows_seen"] += len(y)
            x, y, y_pred = x[:keep], y[:keep], y_pred[:keep]
        return output_transform(x, y, y_pred)

    evaluator = Engine(step)

    @evaluator.on(Events.STARTED)
    def embed_reference(engine: Engine) -> None:
        evaluated["real_rows"], evaluated["rows_seen"] = real_rows_of_rank(engine.state.dataloader), 0
        evaluated["modes"] = training_modes(backbone)
        net = backbone
        if recalibrate_bn:
            net = recalibrate_batchnorm(backbone, reference_loader, device, non_blocking, prepare_batch)
        evaluated["net"] = net.eval()
        metric.set_reference(
            *_extract(net, reference_loader, device, non_blocking, prepare_batch, model_transform, amp_mode)
        )

    @evaluator.on(Events.COMPLETED)
    def restore_mode(_: Engine) -> None:
        evaluated["net"] = backbone
        restore_modes(evaluated["modes"])

    metric.attach(evaluator, metric_name)
    return evaluator
