"""ignite-swav: SwAV self-supervised learning for PyTorch-Ignite."""

from ignite_swav.batched_transforms import BatchedMultiCrop, collate_images
from ignite_swav.checkpoint import DurableDiskSaver, load_checkpoint_file, load_objects
from ignite_swav.clusters import assign_clusters
from ignite_swav.decode import decode_images
from ignite_swav.engine import create_swav_trainer, prepare_image_batch, prepare_multicrop_batch, swav_training_step
from ignite_swav.evaluation import KNNAccuracy, create_knn_evaluator, extract_features, recalibrate_batchnorm
from ignite_swav.events import SwAVEvents
from ignite_swav.health import CollapseReport, SwAVHealthMonitor, diagnose
from ignite_swav.loss import SwAVLoss, SwAVLossStep
from ignite_swav.modules import SwAVModel, SwAVProjectionHead, SwAVPrototypes, unwrap_model
from ignite_swav.preemption import PreemptionHandler
from ignite_swav.pretrained import export_backbone, load_official_checkpoint
from ignite_swav.probe import OnlineLinearProbe
from ignite_swav.queue import SwAVQueue
from ignite_swav.queue_guard import QueueRetreat, SwAVQueueGuard
from ignite_swav.queue_handler import SwAVQueueHandler
from ignite_swav.releases import RELEASES, Release, download_release, resnet50_wide
from ignite_swav.schedules import create_swav_lr_scheduler
from ignite_swav.settings import check_settings
from ignite_swav.sinkhorn import sinkhorn
from ignite_swav.transforms import MultiCropSettings, MultiCropTransform, collate_crops

__version__ = "1.0.0rc1"

__all__ = [
    "BatchedMultiCrop",
    "CollapseReport",
    "DurableDiskSaver",
    "KNNAccuracy",
    "MultiCropSettings",
    "MultiCropTransform",
    "OnlineLinearProbe",
    "PreemptionHandler",
    "QueueRetreat",
    "RELEASES",
    "Release",
    "SwAVEvents",
    "SwAVHealthMonitor",
    "SwAVLoss",
    "SwAVLossStep",
    "SwAVModel",
    "SwAVProjectionHead",
    "SwAVPrototypes",
    "SwAVQueue",
    "SwAVQueueGuard",
    "SwAVQueueHandler",
    "__version__",
    "assign_clusters",
    "check_settings",
    "collate_crops",
    "collate_images",
    "create_knn_evaluator",
    "create_swav_lr_scheduler",
    "create_swav_trainer",
    "decode_images",
    "diagnose",
    "download_release",
    "export_backbone",
    "extract_features",
    "load_checkpoint_file",
    "load_objects",
    "load_official_checkpoint",
    "prepare_image_batch",
    "prepare_multicrop_batch",
    "recalibrate_batchnorm",
    "resnet50_wide",
    "sinkhorn",
    "swav_training_step",
    "unwrap_model",
]
