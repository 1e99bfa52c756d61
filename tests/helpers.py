"""Small models and data for tests."""

from __future__ import annotations

import torch
from torch import nn

from ignite_swav import SwAVModel, SwAVProjectionHead, SwAVPrototypes


class TinyBackbone(nn.Module):
    """A conv net that works on any image size: conv, ReLU, global average pooling."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def tiny_swav_model(feat_dim: int = 8, num_prototypes: int = 12, width: int = 16, seed: int = 0) -> SwAVModel:
    torch.manual_seed(seed)
    return SwAVModel(
        TinyBackbone(width),
        SwAVProjectionHead(width, hidden_dim=32, out_dim=feat_dim),
        SwAVPrototypes(feat_dim, num_prototypes),
    )


def random_crops(batch: int = 4, sizes=(16, 16, 8, 8, 8), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


# The example on a few small batches of the small digits set, with a tiny model and the k-NN probe after the last
# epoch only: the code paths of a run, not its figures. Each test file adds its iterations and queue.
TINY_EXAMPLE_ARGS = ["--dataset", "digits", "--num-workers", "0", "--batch-size", "16", "--num-prototypes", "16"]
TINY_EXAMPLE_ARGS += ["--feat-dim", "16", "--hidden-dim", "32", "--eval-every", "100"]
