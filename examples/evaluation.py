"""The evaluations of ``train_swav.py``: k-NN top-1 (and the online probe in the same pass), the same on raw
pixels, and the clusters of the prototypes against k-means; every rank takes part."""

from __future__ import annotations

import argparse

import ignite.distributed as idist
from swav_data import DataBundle, require
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ignite_swav import KNNAccuracy, OnlineLinearProbe, assign_clusters, create_knn_evaluator, extract_features


def _shard(dataset: Dataset) -> Dataset:
    # Every rank takes every world_size-th sample: the ranks together see each sample exactly once (a
    # DistributedSampler would pad with repeated samples, which the k-NN would count twice).
    world_size = idist.get_world_size()
    return dataset if world_size == 1 else Subset(dataset, list(range(idist.get_rank(), len(dataset), world_size)))


def _eval_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    # Tensors in memory need no worker: starting one would cost more than it saves.
    workers = 0 if isinstance(dataset, TensorDataset) else args.num_workers
    return DataLoader(_shard(dataset), batch_size=256, shuffle=False, num_workers=workers)


def evaluate_features(
    backbone: nn.Module, data: DataBundle, args: argparse.Namespace, probe: OnlineLinearProbe | None = None
) -> dict[str, float]:
    """Weighted k-NN top-1 of ``backbone``'s features (all ranks take part), in eval mode with the network's
    own batch norm statistics: the standard protocol, for the pretrained and the random network alike; and, in
    the same pass over the held-out images, the online linear probe's top-1."""
    evaluator = create_knn_evaluator(backbone, _eval_loader(data.reference, args), device=idist.device(), k=args.knn_k)
    if probe is not None:
        probe.attach_metric(evaluator, "online_linear_top1")
    evaluator.run(_eval_loader(data.heldout, args))
    return {name: float(value) for name, value in evaluator.state.metrics.items()}


def knn_top1(backbone: nn.Module, data: DataBundle, args: argparse.Namespace) -> float:
    """The k-NN top-1 of :func:`evaluate_features`."""
    return evaluate_features(backbone, data, args)["knn_top1"]


def cluster_nmi(model: nn.Module, data: DataBundle, args: argparse.Namespace) -> dict[str, float | None]:
    """How well the prototypes cluster the held-out images: the normalised mutual information of their prototype
    ids (``assign_clusters``) with the labels, next to scikit-learn's k-means with as many clusters on the raw
    pixels of the same images (on small sets only: k-means on large images would take longer than training)."""
    metrics = require("sklearn.metrics", "the cluster figures")
    ids = assign_clusters(model, _eval_loader(data.heldout, args), device=idist.device())
    pixels, labels = extract_features(nn.Flatten(), _eval_loader(data.heldout, args))  # every rank's, gathered
    results: dict[str, float | None] = {"cluster_nmi": float(metrics.normalized_mutual_info_score(labels, ids))}
    results["cluster_nmi_kmeans_raw_pixels"] = None
    if pixels.numel() <= 50_000_000 and len(labels) >= args.num_prototypes:
        cluster = require("sklearn.cluster", "the cluster figures")
        kmeans = cluster.KMeans(n_clusters=args.num_prototypes, n_init=1, random_state=args.seed)
        pixel_ids = kmeans.fit_predict(pixels.numpy())
        results["cluster_nmi_kmeans_raw_pixels"] = float(metrics.normalized_mutual_info_score(labels, pixel_ids))
    return results


def raw_pixel_knn_top1(data: DataBundle, args: argparse.Namespace) -> float:
    """k-NN top-1 on the evaluation images' pixels themselves (the same input the network sees)."""
    metric = KNNAccuracy(k=args.knn_k)
    metric.set_reference(*extract_features(nn.Flatten(), _eval_loader(data.reference, args)))
    # Every rank scores the whole (gathered) held-out set: the summed counts keep the same ratio.
    metric.update(extract_features(nn.Flatten(), _eval_loader(data.heldout, args)))
    return metric.compute()
