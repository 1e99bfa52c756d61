#!/usr/bin/env python
"""SwAV's overhead on a full training step: ``create_swav_trainer``'s step (prototype normalisation, multi-crop
forward, SwAV loss with a full queue, backward, optimizer step, queue update) against the same model and
optimizer with a trivial loss (the mean of the scores). Interleaved, in one process, on the same crops.

    python benchmarks/step.py                                   # CPU: ResNet-18, 2x32 + 4x16 px crops, batch 64
    python benchmarks/step.py --device cuda --arch resnet50 --size-crops 224 96 --num-crops 2 6 \\
        --batch-sizes 64 256 --amp --channels-last [--compile] [--amp-dtype float16]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _machine import describe
from torch import nn
from torchvision import models

from ignite_swav import SwAVLoss, SwAVModel, SwAVProjectionHead, SwAVPrototypes, SwAVQueue, create_swav_trainer


def build_model(arch: str, feat_dim: int, num_prototypes: int) -> SwAVModel:
    backbone = getattr(models, arch)()
    width = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return SwAVModel(backbone, SwAVProjectionHead(width, 2048, feat_dim), SwAVPrototypes(feat_dim, num_prototypes))


def swav_step(model, optimizer, args, device, batch_size) -> Callable[[list[torch.Tensor]], None]:
    loss_fn = SwAVLoss(crops_for_assign=(0, 1))
    trainer = create_swav_trainer(
        model,
        optimizer,
        loss_fn,
        device=device,
        amp_mode="amp" if args.amp else None,
        amp_dtype=amp_dtype(args),
        scaler=amp_dtype(args) == torch.float16,
        compile_model=args.compile,
    )
    trainer.state.iteration = 1  # past any prototype freezing
    if args.queue_length:
        # a full queue, as in the second half of a run: every step scores it and pushes the batch into it
        queue = F.normalize(torch.randn(2, args.queue_length, args.feat_dim, device=device), dim=2)
        loss_fn.queue = SwAVQueue(args.queue_length)
        loss_fn.queue.rows = queue
    return lambda crops: trainer._process_function(trainer, crops)


def amp_dtype(args: argparse.Namespace) -> torch.dtype | None:
    return getattr(torch, args.amp_dtype) if args.amp else None


def trivial_step(model, optimizer, args, device) -> Callable[[list[torch.Tensor]], None]:
    forward = torch.compile(model) if args.compile else model
    # float16 needs loss scaling in both steps, so that the comparison stays like for like
    scaler = torch.amp.GradScaler(device.type) if amp_dtype(args) == torch.float16 else None

    def step(crops: list[torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype(args) or torch.float32, enabled=args.amp):
            _, scores = forward(crops)
            loss = torch.stack([s.float().mean() for s in scores]).mean()
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        loss.item()  # the trainer's output reads the loss too

    return step


def timed(step: Callable, crops: list[torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step(crops)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--device", default="cpu")
    add("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    add("--batch-sizes", type=int, nargs="+", default=[64])
    add("--size-crops", type=int, nargs="+", default=[32, 16])
    add("--num-crops", type=int, nargs="+", default=[2, 4])
    add("--num-prototypes", type=int, default=3000)
    add("--feat-dim", type=int, default=128)
    add("--queue-length", type=int, default=3840, help="rows of the full queue per assigned crop (0: none)")
    add("--amp", action="store_true", help="autocast (see --amp-dtype)")
    add("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"), help="float16 adds a GradScaler")
    add("--channels-last", action="store_true")
    add("--compile", action="store_true", help="torch.compile the model in both steps")
    add("--repeats", type=int, default=10)
    add("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(describe(device))
    print(
        f"{args.arch}, crops {args.num_crops} x {args.size_crops} px, K {args.num_prototypes}, queue "
        f"{args.queue_length}, amp {args.amp and args.amp_dtype}, channels_last {args.channels_last}, "
        f"compile {args.compile}; "
        f"median of {args.repeats} steps after {args.warmup} warm-up steps, interleaved"
    )
    print(f"{'batch':>5} {'trivial loss ms':>16} {'SwAV step ms':>13} {'overhead':>9}")
    for batch_size in args.batch_sizes:
        torch.manual_seed(0)
        model = build_model(args.arch, args.feat_dim, args.num_prototypes).to(device)
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        model = model.to(memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-6)
        crops = [
            torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
            for size, count in zip(args.size_crops, args.num_crops)
            for _ in range(count)
        ]
        steps = {
            "trivial": trivial_step(model, optimizer, args, device),
            "swav": swav_step(model, optimizer, args, device, batch_size),
        }
        times: dict[str, list[float]] = {name: [] for name in steps}
        for i in range(args.warmup + args.repeats):
            for name, step in steps.items():
                elapsed = timed(step, crops, device)
                if i >= args.warmup:
                    times[name].append(elapsed)
        trivial, swav = statistics.median(times["trivial"]), statistics.median(times["swav"])
        print(f"{batch_size:>5} {trivial * 1000:16.1f} {swav * 1000:13.1f} {100 * (swav / trivial - 1):8.1f}%")


if __name__ == "__main__":
    main()
