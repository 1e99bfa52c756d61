"""The model pieces of ``train_swav.py``: the backbones, the SwAV model, its optimizer, loss and queue handler, and
the learning rate schedule; used by the training script, ``linear_eval.py`` and the benchmarks."""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from ignite.engine import Engine, Events
from swav_data import require
from torch import nn
from torchvision.models.resnet import BasicBlock

from ignite_swav import (
    SwAVLoss,
    SwAVModel,
    SwAVProjectionHead,
    SwAVPrototypes,
    SwAVQueueGuard,
    SwAVQueueHandler,
    create_swav_lr_scheduler,
)

CROPS_FOR_ASSIGN = (0, 1)  # the two large crops


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
) -> dict[str, Any]:
    """The reference's learning rate, set every iteration (linear warm-up, then cosine to ``final_lr``). Returns
    the scheduler, for the checkpoint: resumed on another number of processes, ``load_objects(...,
    epoch_length=...)`` steps it to the same fraction of the run."""
    scheduler = create_swav_lr_scheduler(
        optimizer,
        args.lr,
        args.epochs,
        epoch_length,
        final_lr=args.final_lr,
        warmup_epochs=args.warmup_epochs,
        warmup_start_lr=args.warmup_start_lr,
    )
    trainer.add_event_handler(Events.ITERATION_STARTED, scheduler)
    return {"lr_scheduler": scheduler}


def attach_queue_guard(trainer: Engine, objects: dict[str, Any], args: argparse.Namespace) -> None:
    """With a queue and ``--queue-guard on``: when the monitor blames the queue, back to just before it came in."""
    if args.queue_guard != "on" or objects["queue_handler"].requested_queue_length == 0:
        return
    guard = SwAVQueueGuard(objects["queue_handler"], objects["health"], objects, logger=logging.getLogger("train_swav"))
    guard.attach(trainer)
    objects["queue_guard"] = guard
