#!/usr/bin/env python
"""Pretrain SwAV with ignite-swav, then measure what it learned with a k-NN probe.

With no arguments it trains a ResNet-18 on scikit-learn's digits (shipped inside scikit-learn, no download)
on the CPU in a few minutes, and prints the k-NN top-1 of the pretrained network against the same network
at random initialisation and against raw pixels. The same script trains on CIFAR-10, STL-10 or an
ImageFolder, on one process or many (``--nproc-per-node``, torchrun, several nodes).

    python examples/train_swav.py                                   # digits, CPU
    python examples/train_swav.py --nproc-per-node 2 --backend gloo # 2 CPU processes
    torchrun --nproc-per-node 8 examples/train_swav.py --dataset cifar10 --data-dir data --backend nccl
    python examples/train_swav.py --resume-from runs/swav/swav_checkpoint_798.pt --epochs 60
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import (
    Checkpoint,
    CosineAnnealingScheduler,
    DiskSaver,
    ProgressBar,
    create_lr_scheduler_with_warmup,
)
from ignite.utils import manual_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2

from ignite_swav import (
    BatchedMultiCrop,
    MultiCropTransform,
    SwAVEvents,
    SwAVLoss,
    SwAVModel,
    SwAVProjectionHead,
    SwAVPrototypes,
    SwAVQueueHandler,
    collate_images,
    create_knn_evaluator,
    create_swav_trainer,
    load_checkpoint_file,
    multicrop_collate,
)
from ignite_swav.metrics import KNNAccuracy, extract_features

DATASETS = ("digits", "cifar10", "stl10", "imagefolder")
CHECKPOINT_PREFIX = "swav"
CROPS_FOR_ASSIGN = (0, 1)  # the two large crops
CHECKPOINT_KEYS = ("model", "optimizer", "trainer", "lr_scheduler", "queue_handler", "history")

# The SwAV recipe for real data sets (per process batch, global queue), and what differs per data set; every
# setting can be overridden on the command line.
_REAL_DATA_DEFAULTS: dict[str, Any] = {
    "epochs": 200,
    "batch_size": 256,
    "lr": 0.6,
    "epsilon": 0.05,
    "weight_decay": 1e-6,
    "warmup_epochs": 10,
    "num_prototypes": 3000,
    "feat_dim": 128,
    "hidden_dim": 2048,
    "queue_length": 3840,
    "epoch_queue_starts": 15,
    "freeze_prototypes_iters": 313,
    "small_stem": False,
    "num_workers": 4,
    "gpu_augment": False,
}
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "epochs": 42,
        "batch_size": 64,
        "lr": 0.03,
        "epsilon": 0.025,
        "weight_decay": 5e-4,
        "warmup_epochs": 2,
        "num_prototypes": 64,
        "feat_dim": 64,
        "hidden_dim": 512,
        "queue_length": 256,
        "epoch_queue_starts": 3,
        "freeze_prototypes_iters": 20,
        "small_stem": False,
        "eval_size": 32,
        "num_workers": 1,
        "gpu_augment": True,
    },
    "cifar10": _REAL_DATA_DEFAULTS | {"num_prototypes": 1000, "small_stem": True, "eval_size": 32},
    "stl10": _REAL_DATA_DEFAULTS | {"eval_size": 96},
    "imagefolder": _REAL_DATA_DEFAULTS
    | {"epochs": 100, "batch_size": 64, "freeze_prototypes_iters": 5005, "eval_size": 224, "num_workers": 8},
}


class ExampleError(Exception):
    """A problem with the command line, the data or a checkpoint, reported as one clear line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pretrain SwAV with ignite-swav and report k-NN top-1 (pretrained, random init, raw pixels).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default="digits", help="data set to pretrain on")
    add("--data-dir", type=Path, default=Path("data"), help="where the data set lies (or is downloaded to)")
    add("--download", action="store_true", help="download CIFAR-10 / STL-10 into --data-dir if missing")
    add("--output-dir", type=Path, default=Path("runs/swav"), help="checkpoints, results.json and the plot")
    add("--resume-from", type=Path, default=None, help="checkpoint to continue from, up to --epochs")
    add("--epochs", type=int, default=None, help="total epochs (digits: 42)")
    add("--batch-size", type=int, default=None, help="batch size per process (digits: 64)")
    add("--lr", type=float, default=None, help="peak learning rate of SGD (digits: 0.03)")
    add("--weight-decay", type=float, default=None, help="weight decay (digits: 5e-4)")
    add("--warmup-epochs", type=int, default=None, help="epochs of linear warm-up before the cosine decay")
    add("--arch", choices=("resnet18", "resnet50"), default="resnet18", help="torchvision backbone")
    add("--small-stem", action=argparse.BooleanOptionalAction, default=None, help="3x3 stem, no max-pool")
    add("--num-prototypes", type=int, default=None, help="number of prototypes")
    add("--feat-dim", type=int, default=None, help="width of the embeddings")
    add("--hidden-dim", type=int, default=None, help="hidden width of the projection head (0: none)")
    add("--queue-length", type=int, default=None, help="global queue length, 0 for none")
    add("--epoch-queue-starts", type=int, default=None, help="epochs trained before the queue is created")
    add("--freeze-prototypes-iters", type=int, default=None, help="first iterations with frozen prototypes")
    add("--temperature", type=float, default=0.1, help="softmax temperature of the loss")
    add("--epsilon", type=float, default=None, help="Sinkhorn regularisation (digits: 0.025, others 0.05)")
    add("--knn-k", type=int, default=20, help="neighbours of the k-NN probe")
    add("--eval-size", type=int, default=None, help="image size of the k-NN probe (digits: 32)")
    add("--eval-every", type=int, default=1, help="run the k-NN probe every N epochs")
    add("--nproc-per-node", type=int, default=None, help="processes to spawn on this node (idist.Parallel)")
    add("--backend", choices=("gloo", "nccl"), default=None, help="distributed backend (default: none, 1 process)")
    add(
        "--gpu-augment",
        "--batched-augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="multi-crop whole batches on the training device (GPU, or CPU) with BatchedMultiCrop, so that the "
        "DataLoader only loads images; --no-gpu-augment crops image by image in the workers (digits: on)",
    )
    add("--compile", action="store_true", help="torch.compile the model's forward (slow first steps)")
    add("--amp", action="store_true", help="mixed precision: bfloat16 on CPU, float16 with a GradScaler on CUDA")
    add("--num-workers", type=int, default=None, help="DataLoader worker processes per training process (digits: 1)")
    add("--seed", type=int, default=0, help="seed of the network's initialisation, the split and the data order")
    add("--max-iters-per-epoch", type=int, default=None, help=argparse.SUPPRESS)  # for quick tests
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line and fill the data set's defaults; bad values raise ExampleError."""
    args = build_parser().parse_args(argv)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    positive = ("epochs", "batch_size", "num_prototypes", "feat_dim", "knn_k", "eval_every")
    for key in positive:
        if getattr(args, key) < 1:
            raise ExampleError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for key in ("queue_length", "epoch_queue_starts", "freeze_prototypes_iters", "hidden_dim", "num_workers"):
        if getattr(args, key) < 0:
            raise ExampleError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.lr <= 0:
        raise ExampleError(f"--lr must be > 0, got {args.lr}")
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise ExampleError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    if args.backend is None and ((args.nproc_per_node or 1) > 1 or "WORLD_SIZE" in os.environ):
        args.backend = "nccl" if torch.cuda.is_available() else "gloo"
    if args.backend == "nccl" and not torch.cuda.is_available():
        raise ExampleError("--backend nccl needs CUDA GPUs; use --backend gloo on CPUs")
    return args


# ----------------------------------------------------------------------------------------------- data


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as ``(1, 8, 8)`` uint8 images with labels, through ``transform``."""

    def __init__(self, indices: list[int] | None = None, transform: Any = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
        labels = torch.as_tensor(digits.target)
        if indices is not None:
            images, labels = images[indices], labels[indices]
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def digits_split(seed: int) -> tuple[list[int], list[int]]:
    """Stratified 70/30 split of the digits' indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    train, heldout = train_test_split(list(range(len(target))), test_size=0.3, stratify=target, random_state=seed)
    return sorted(train), sorted(heldout)


@dataclass
class DataBundle:
    pretrain: Dataset  # gives (list of crops, label)
    reference: Dataset  # labelled images for the k-NN bank
    heldout: Dataset  # labelled images the k-NN probe scores
    multicrop: MultiCropTransform


def _eval_transform(size: int, multicrop: MultiCropTransform) -> v2.Compose:
    first = multicrop.crop_transforms[0].transforms
    normalize = next(t for t in first if isinstance(t, v2.Normalize))
    to_rgb = first[1]
    return v2.Compose(
        [
            v2.ToImage(),
            to_rgb,
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            normalize,
        ]
    )


def _torchvision_dataset(name: str, factory: Any, data_dir: Path, download: bool, **kwargs: Any) -> Dataset:
    layouts = {
        "cifar10": "cifar-10-batches-py/",
        "stl10": "stl10_binary/",
    }
    try:
        return factory(root=str(data_dir), download=download, **kwargs)
    except RuntimeError as error:
        if "not found" in str(error).lower() or "corrupted" in str(error).lower():
            raise ExampleError(
                f"{name} was not found in '{data_dir}' (expected {data_dir / layouts[name]}): pass --download to "
                f"fetch it (needs internet access), or --data-dir pointing at a folder that holds it"
            ) from None
        raise


def build_data(args: argparse.Namespace) -> DataBundle:
    """The pretraining, reference and held-out data sets of ``args.dataset``; with ``args.gpu_augment`` the
    pretraining set gives uint8 images and the crops are made on the training device."""
    from torchvision import datasets

    batched = bool(getattr(args, "gpu_augment", False))
    to_tensor = v2.PILToTensor() if batched else None
    if args.dataset == "digits":
        multicrop = MultiCropTransform.for_digits()
        evaluate = _eval_transform(args.eval_size, multicrop)
        train, heldout = digits_split(args.seed)
        return DataBundle(
            DigitsDataset(train, None if batched else multicrop),
            DigitsDataset(train, evaluate),
            DigitsDataset(heldout, evaluate),
            multicrop,
        )
    if args.dataset == "cifar10":
        multicrop = MultiCropTransform.for_cifar()
        evaluate = _eval_transform(args.eval_size, multicrop)
        make = datasets.CIFAR10
        pretrain = to_tensor or multicrop
        return DataBundle(
            _torchvision_dataset("cifar10", make, args.data_dir, args.download, train=True, transform=pretrain),
            _torchvision_dataset("cifar10", make, args.data_dir, False, train=True, transform=evaluate),
            _torchvision_dataset("cifar10", make, args.data_dir, False, train=False, transform=evaluate),
            multicrop,
        )
    if args.dataset == "stl10":
        multicrop = MultiCropTransform(
            size_crops=(96, 48), num_crops=(2, 4), min_scale_crops=(0.14, 0.05), max_scale_crops=(1.0, 0.14)
        )
        evaluate = _eval_transform(args.eval_size, multicrop)
        make = datasets.STL10
        pretrain = to_tensor or multicrop
        return DataBundle(
            _torchvision_dataset("stl10", make, args.data_dir, args.download, split="unlabeled", transform=pretrain),
            _torchvision_dataset("stl10", make, args.data_dir, False, split="train", transform=evaluate),
            _torchvision_dataset("stl10", make, args.data_dir, False, split="test", transform=evaluate),
            multicrop,
        )
    train_dir, val_dir = args.data_dir / "train", args.data_dir / "val"
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise ExampleError(
                f"imagefolder needs '{folder}': --data-dir must hold train/ and val/, each with one sub-folder of "
                "images per class"
            )
    multicrop = MultiCropTransform()
    evaluate = _eval_transform(args.eval_size, multicrop)
    return DataBundle(
        datasets.ImageFolder(str(train_dir), transform=to_tensor or multicrop),  # workers decode JPEG/PNG
        datasets.ImageFolder(str(train_dir), transform=evaluate),
        datasets.ImageFolder(str(val_dir), transform=evaluate),
        multicrop,
    )


def _shard(dataset: Dataset) -> Dataset:
    # Every rank takes every world_size-th sample: the ranks together see each sample exactly once.
    world_size = idist.get_world_size()
    return dataset if world_size == 1 else Subset(dataset, list(range(idist.get_rank(), len(dataset), world_size)))


def _eval_loader(dataset: Dataset, args: argparse.Namespace) -> DataLoader:
    return DataLoader(_shard(dataset), batch_size=256, shuffle=False, num_workers=args.num_workers)


# ---------------------------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace) -> SwAVModel:
    """ResNet backbone (torchvision, random init from ``args.seed``), projection head and prototypes."""
    from torchvision import models

    torch.manual_seed(args.seed)
    backbone = getattr(models, args.arch)()
    if args.small_stem:
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
    in_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    head = SwAVProjectionHead(in_dim, hidden_dim=args.hidden_dim, out_dim=args.feat_dim)
    return SwAVModel(backbone, head, SwAVPrototypes(args.feat_dim, args.num_prototypes))


def build_loss_and_queue_handler(args: argparse.Namespace) -> tuple[SwAVLoss, SwAVQueueHandler]:
    """The SwAV loss and the queue handler that feeds it; the training processes and the check of a
    ``--resume-from`` file build them alike, so the file is checked against the queue that will load it."""
    loss_fn = SwAVLoss(crops_for_assign=CROPS_FOR_ASSIGN, temperature=args.temperature, epsilon=args.epsilon)
    queue_handler = SwAVQueueHandler(
        loss_fn,
        batch_size=args.batch_size,
        epoch_queue_starts=args.epoch_queue_starts,
        crops_for_assign=CROPS_FOR_ASSIGN,
        feat_dim=args.feat_dim,
        queue_length=args.queue_length,
    )
    return loss_fn, queue_handler


MODEL_SETTINGS = ("arch", "small_stem", "feat_dim", "hidden_dim", "num_prototypes", "dataset", "eval_size", "seed")


class RunHistory:
    """Per-epoch records and the model settings of the run, saved in the checkpoint (plain numbers and
    strings), so that a resumed run keeps its history and ``linear_eval.py`` can rebuild the network."""

    def __init__(self, args: argparse.Namespace | None = None) -> None:
        self.records: list[dict[str, Any]] = []
        self.config: dict[str, Any] = {k: getattr(args, k) for k in MODEL_SETTINGS} if args is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records], "config": dict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        records = state.get("records") if isinstance(state, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("the checkpoint's history is not a list of per-epoch records")
        self.records = [dict(r) for r in records]
        self.config = dict(state.get("config", {}))


# ------------------------------------------------------------------------------------------- checking


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse an output directory that already holds another run's checkpoints, unless resuming."""
    if args.resume_from is not None or not args.output_dir.is_dir():
        return
    existing = sorted(p.name for p in args.output_dir.glob("*.pt"))
    if existing:
        raise ExampleError(
            f"--output-dir '{args.output_dir}' already holds checkpoints of another run ({', '.join(existing[:3])}"
            f"{', ...' if len(existing) > 3 else ''}): pass --resume-from one of them to continue that run, or "
            "choose another --output-dir"
        )


LOCK_NAME = ".swav_run.lock"


def _lock_owner(path: Path) -> tuple[int | None, str]:
    try:
        pid, host = (path.read_text().split("\n") + ["", ""])[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, ""


def _process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def output_dir_lock(output_dir: Path) -> Iterator[None]:
    """Hold ``output_dir/.swav_run.lock`` for the run, so that a second run pointed at the same directory is
    refused instead of interleaving its checkpoints. A lock left by a killed process of this host is taken
    over; one from another host is refused (delete the file if that run is really gone)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    host = socket.gethostname()
    while True:
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid, owner_host = _lock_owner(path)
            if pid is None or owner_host != host or _process_running(pid):
                raise ExampleError(
                    f"--output-dir '{output_dir}' is in use by another run (process {pid} on {owner_host or '?'}, "
                    f"lock file {path}): wait for it to end or choose another --output-dir; if that run is gone, "
                    "delete the lock file"
                ) from None
            logging.getLogger(__name__).warning("taking over %s: process %d that held it is not running", path, pid)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as lock_file:
            lock_file.write(f"{os.getpid()}\n{host}\n")
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def load_resume_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint of ``--resume-from``, read safely and checked against this run's model."""
    path = args.resume_from
    if not path.is_file():
        raise ExampleError(f"--resume-from '{path}' does not exist")
    try:
        checkpoint = load_checkpoint_file(path)
    except ValueError as error:
        raise ExampleError(str(error)) from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ExampleError(f"--resume-from '{path}' is not a checkpoint of this script: it lacks {missing}")
    try:
        build_model(args).load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        details = [line.strip() for line in str(error).splitlines()[1:3]]
        raise ExampleError(
            f"--resume-from '{path}' holds another model than --arch {args.arch} with --feat-dim {args.feat_dim}, "
            f"--num-prototypes {args.num_prototypes}, --hidden-dim {args.hidden_dim}: {first} {' '.join(details)}"
        ) from None
    # the queue is checked here too, so that a bad one is refused before any process starts or file is written
    _, handler = build_loss_and_queue_handler(args)
    try:
        handler.load_state_dict(checkpoint["queue_handler"])
    except (ValueError, TypeError) as error:
        raise ExampleError(f"--resume-from '{path}': {error}") from None
    return checkpoint


# ------------------------------------------------------------------------------------------- training


def _log(message: str) -> None:
    if idist.get_rank() == 0:
        print(message, flush=True)


def knn_top1(backbone: nn.Module, data: DataBundle, args: argparse.Namespace) -> float:
    """Weighted k-NN top-1 of ``backbone``'s features (all ranks take part).

    The standard protocol, for the pretrained and the randomly initialised network alike: eval mode with the
    network's own batch norm statistics.
    """
    evaluator = create_knn_evaluator(backbone, _eval_loader(data.reference, args), device=idist.device(), k=args.knn_k)
    evaluator.run(_eval_loader(data.heldout, args))
    return float(evaluator.state.metrics["knn_top1"])


def raw_pixel_knn_top1(data: DataBundle, args: argparse.Namespace) -> float:
    """k-NN top-1 on the evaluation images' pixels themselves (the same input the network sees)."""
    metric = KNNAccuracy(k=args.knn_k)
    metric.set_reference(*extract_features(nn.Flatten(), _eval_loader(data.reference, args)))
    # Every rank scores the whole (gathered) held-out set: the summed counts keep the same ratio.
    metric.update(extract_features(nn.Flatten(), _eval_loader(data.heldout, args)))
    return metric.compute()


def training(local_rank: int, config: dict[str, Any]) -> dict[str, Any]:
    """One process's part of the run (the function ``idist.Parallel`` launches); returns the results."""
    args = argparse.Namespace(**config)
    rank, world_size, device = idist.get_rank(), idist.get_world_size(), idist.device()
    data = build_data(args)
    model = build_model(args)
    manual_seed(args.seed + rank)  # other crops on every rank, the same network

    sampler = (
        DistributedSampler(data.pretrain, shuffle=True, drop_last=True, seed=args.seed) if world_size > 1 else None
    )
    loader: Any = DataLoader(
        data.pretrain,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
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

    model = idist.auto_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    loss_fn, queue_handler = build_loss_and_queue_handler(args)
    use_cuda = device.type == "cuda"
    trainer = create_swav_trainer(
        model,
        loss_fn,
        optimizer,
        device=device,
        freeze_prototypes_iters=args.freeze_prototypes_iters,
        amp_mode="amp" if args.amp else None,
        scaler=bool(args.amp and use_cuda),
        non_blocking=use_cuda,
        augment=BatchedMultiCrop.from_transform(data.multicrop) if args.gpu_augment else None,
        compile_model=args.compile,
    )
    queue_handler.attach(trainer)  # before the checkpoint: its end-of-epoch work runs first

    # Warm-up then cosine, stepped per epoch: the schedule does not depend on the number of processes,
    # so a run resumes on another world size at the same point of its schedule.
    cosine = CosineAnnealingScheduler(
        optimizer, "lr", args.lr, args.lr * 1e-3, cycle_size=max(2, args.epochs - args.warmup_epochs + 1)
    )
    lr_scheduler: Any = cosine
    if args.warmup_epochs >= 2:  # Ignite's warm-up needs at least 2 events
        lr_scheduler = create_lr_scheduler_with_warmup(
            cosine, warmup_start_value=args.lr * 0.1, warmup_duration=args.warmup_epochs
        )
    trainer.add_event_handler(Events.EPOCH_STARTED, lr_scheduler)
    if sampler is not None:
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: sampler.set_epoch(e.state.epoch - 1))

    history = RunHistory(args)
    backbone = model.module.backbone if isinstance(model, nn.parallel.DistributedDataParallel) else model.backbone
    epoch_stats: dict[str, float] = {}

    @trainer.on(Events.EPOCH_STARTED)
    def start_epoch(engine: Engine) -> None:
        epoch_stats.update(loss_sum=0.0, iterations=0, queue_used=0.0, start=time.perf_counter())

    @trainer.on(Events.ITERATION_COMPLETED)
    def accumulate(engine: Engine) -> None:
        epoch_stats["loss_sum"] += engine.state.output["loss"]
        epoch_stats["iterations"] += 1
        epoch_stats["queue_used"] = max(epoch_stats["queue_used"], float(engine.state.output["use_queue"]))

    @trainer.on(SwAVEvents.QUEUE_FIRST_USED)
    def queue_in_use(engine: Engine) -> None:
        _log(f"the queue is full and used from iteration {engine.state.iteration} (epoch {engine.state.epoch})")

    @trainer.on(Events.EPOCH_COMPLETED)
    def record_epoch(engine: Engine) -> None:
        seconds = time.perf_counter() - epoch_stats["start"]
        totals = idist.all_reduce(torch.tensor([epoch_stats["loss_sum"], epoch_stats["iterations"]], device=device))
        record = {
            "epoch": engine.state.epoch,
            "loss": float(totals[0] / totals[1]),
            "queue_used": bool(epoch_stats["queue_used"]),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "images_per_s": epoch_stats["iterations"] * args.batch_size * world_size / seconds,
        }
        if engine.state.epoch % args.eval_every == 0 or engine.state.epoch == args.epochs:
            record["knn_top1"] = knn_top1(backbone, data, args)
        history.records.append(record)
        knn = f", kNN top-1 {record['knn_top1']:.4f}" if "knn_top1" in record else ""
        _log(
            f"epoch {record['epoch']}/{args.epochs}: loss {record['loss']:.4f}{knn}, "
            f"queue {'used' if record['queue_used'] else 'not used'}, {record['images_per_s']:.0f} images/s"
        )

    to_save = {
        "model": model,
        "optimizer": optimizer,
        "trainer": trainer,
        "lr_scheduler": lr_scheduler,
        "queue_handler": queue_handler,
        "history": history,
    }
    checkpoint = Checkpoint(
        to_save,
        DiskSaver(args.output_dir, atomic=True, create_dir=True, require_empty=False),
        filename_prefix=CHECKPOINT_PREFIX,
        n_saved=2,
    )
    trainer.add_event_handler(Events.EPOCH_COMPLETED, checkpoint)

    if rank == 0:
        ProgressBar(persist=False, desc="SwAV").attach(trainer, output_transform=lambda out: {"loss": out["loss"]})

    if args.resume_from is not None:
        # main() has checked this file against the model and the queue before any process started
        _resume(trainer, to_save, load_checkpoint_file(args.resume_from), epoch_length, args)

    _log(
        f"SwAV on {args.dataset}: {len(data.pretrain)} images, {world_size} process(es) x batch {args.batch_size}, "
        f"{data.multicrop.total_crops} crops {data.multicrop.size_crops}, {args.num_prototypes} prototypes, "
        f"queue {queue_handler.queue_length or args.queue_length} from epoch {args.epoch_queue_starts + 1}, "
        f"device {device}, augmentation {'batched on the device' if args.gpu_augment else 'per image in workers'}"
    )
    trainer.run(loader, max_epochs=args.epochs, epoch_length=None if args.resume_from else epoch_length)

    results = {
        "dataset": args.dataset,
        "epochs": trainer.state.epoch,
        "world_size": world_size,
        "knn_top1": history.records[-1].get("knn_top1") if history.records else None,
        "knn_top1_random_init": knn_top1(build_model(args).backbone.to(device), data, args),
        "knn_top1_raw_pixels": raw_pixel_knn_top1(data, args),
        "images_per_s": _median([r["images_per_s"] for r in history.records]),
        "queue_used": any(r["queue_used"] for r in history.records),
        "history": history.records,
    }
    if rank == 0:
        _write_results(results, args.output_dir)
    return results


def _median(values: list[float]) -> float | None:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else None


def _resume(
    trainer: Engine, to_save: dict[str, Any], checkpoint: dict[str, Any], epoch_length: int, args: argparse.Namespace
) -> None:
    Checkpoint.load_objects(to_load=to_save, checkpoint=checkpoint)
    state = trainer.state
    if state.epoch >= args.epochs:
        raise ExampleError(
            f"the checkpoint is at epoch {state.epoch}, which is not before --epochs {args.epochs}: "
            "pass a larger --epochs to train further"
        )
    if state.epoch_length != epoch_length:
        # Another number of processes or batch size: iterations per epoch change. Epoch-end checkpoints
        # resume at the next epoch; the queue was resharded by its handler.
        if state.iteration % state.epoch_length != 0:
            raise ExampleError(
                "a checkpoint from the middle of an epoch resumes only with the same number of processes and batch size"
            )
        state.iteration = state.epoch * epoch_length
        state.epoch_length = epoch_length
    _log(f"resumed from '{args.resume_from}' at epoch {state.epoch} (iteration {state.iteration})")


def _write_results(results: dict[str, Any], output_dir: Path) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"kNN top-1 (k-NN on held-out images), after {results['epochs']} epochs:",
        f"  SwAV pretrained       {results['knn_top1']:.4f}",
        f"  same net, random init {results['knn_top1_random_init']:.4f}",
        f"  raw pixels            {results['knn_top1_raw_pixels']:.4f}",
        f"results in {output_dir / 'results.json'}",
    ]
    try:
        _plot(results["history"], output_dir / "history.png")
        lines.append(f"plot in {output_dir / 'history.png'}")
    except ImportError:
        lines.append("no plot: matplotlib is not installed (pip install matplotlib)")
    print("\n".join(lines), flush=True)


def _plot(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["epoch"] for r in history], [r["loss"] for r in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="SwAV loss", title="training loss")
    evaluated = [r for r in history if "knn_top1" in r]
    ax_knn.plot([r["epoch"] for r in evaluated], [r["knn_top1"] for r in evaluated], marker="o", color="C1")
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1", title="k-NN probe on held-out images")
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the example; returns the exit status (2 for a usage, data or checkpoint problem)."""
    logging.basicConfig(level=logging.WARNING)
    try:
        args = parse_args(argv)
        # under torchrun every process runs main(): the first one holds the lock for all
        lock = output_dir_lock(args.output_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()
        with lock:
            check_output_dir(args)
            build_data(args)  # a missing data set is reported here, before any process starts
            if args.resume_from is not None:
                load_resume_checkpoint(args)
            config = vars(args)
            with idist.Parallel(backend=args.backend, nproc_per_node=args.nproc_per_node) as parallel:
                parallel.run(training, config)
    except ExampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
