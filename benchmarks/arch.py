#!/usr/bin/env python
"""Training speed of the main job's backbones: images per second of a SwAV step (forward, loss, backward, SGD)
on MNIST-sized crops, for the example's ``small_resnet`` at a few widths and for ResNet-18 with a 3x3 stem.

    python benchmarks/arch.py                        # 2x28 px crops (the mnist5k preset), batch 64
    python benchmarks/arch.py --crops 28 28 14 14    # with two 14 px crops
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import describe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from models import SmallResNet  # noqa: E402

from ignite_swav import SwAVLoss, SwAVModel, SwAVProjectionHead, SwAVPrototypes  # noqa: E402


def small_resnet(widths: tuple[int, ...], pool_size: int = 2) -> tuple[torch.nn.Module, int]:
    backbone = SmallResNet(widths, pool_size)
    return backbone, backbone.out_features


def resnet18_small_stem() -> tuple[torch.nn.Module, int]:
    from torchvision.models import resnet18

    backbone = resnet18()
    backbone.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    backbone.maxpool = torch.nn.Identity()
    backbone.fc = torch.nn.Identity()
    return backbone, 512


def images_per_second(backbone: torch.nn.Module, width: int, crops: list[int], batch: int, steps: int) -> float:
    model = SwAVModel(backbone, SwAVProjectionHead(width, 512, 64), SwAVPrototypes(64, 100))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = SwAVLoss(epsilon=0.03)
    images = [torch.randn(batch, 3, size, size) for size in sorted(crops, reverse=True)]
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        model.prototypes.normalize_()
        embeddings, scores = model(images)
        loss = loss_fn(scores=scores, embeddings=embeddings, prototypes=model.prototypes.weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[28, 28], help="crop sizes of one image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    args = parser.parse_args()
    print(describe("cpu"))
    print(f"crops {args.crops}, batch {args.batch_size}, median of {args.steps} steps; images per second")
    torch.manual_seed(0)
    candidates = {
        "small_resnet 16-32-64-128 (the default)": lambda: small_resnet((16, 32, 64, 128)),
        "small_resnet 16-32-64-128, global pool": lambda: small_resnet((16, 32, 64, 128), pool_size=1),
        "small_resnet 16-32-64-256": lambda: small_resnet((16, 32, 64, 256)),
        "small_resnet 24-48-96-192": lambda: small_resnet((24, 48, 96, 192)),
        "small_resnet 32-64-128-256": lambda: small_resnet((32, 64, 128, 256)),
        "resnet18, 3x3 stem": resnet18_small_stem,
    }
    for name, build in candidates.items():
        backbone, width = build()
        rate = images_per_second(backbone, width, args.crops, args.batch_size, args.steps)
        print(f"{name:>40} {rate:8.1f}")


if __name__ == "__main__":
    main()
