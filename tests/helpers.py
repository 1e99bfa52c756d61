"""Small models and data for tests."""

from __future__ import annotations

import gc
from collections import Counter
from typing import Any, Callable

import ignite.distributed as idist
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision import models

from ignite_swav import SwAVLoss, SwAVModel, SwAVProjectionHead, SwAVPrototypes, SwAVQueue


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


def run_then_collect(local_rank: int, function: Callable[..., Any], *args: Any) -> None:
    """A spawned worker: ``function(local_rank, *args)``, then its reference cycles freed while the process group is
    whole, as examples/train_swav.py's ``training`` does and for its reason: a DDP model left in a cycle keeps the
    group's gloo threads alive to the interpreter's exit, where they can abort the process (pytorch/pytorch#190489)."""
    function(local_rank, *args)
    gc.collect()


def spawn_gloo(function: Callable[..., Any], *args: Any, nproc: int = 2) -> None:
    """``function(local_rank, *args)`` on ``nproc`` gloo processes (``idist.spawn``, through ``run_then_collect``)."""
    idist.spawn("gloo", run_then_collect, args=(function, *args), nproc_per_node=nproc)


def tiny_swav_model(feat_dim: int = 8, num_prototypes: int = 12, width: int = 16, seed: int = 0) -> SwAVModel:
    torch.manual_seed(seed)
    return SwAVModel(
        TinyBackbone(width),
        SwAVProjectionHead(width, hidden_dim=32, out_dim=feat_dim),
        SwAVPrototypes(feat_dim, num_prototypes),
    )


def queue_of(rows: torch.Tensor) -> SwAVQueue:
    """A started queue holding ``rows`` (its fill is read from them at the loss's next call)."""
    queue = SwAVQueue(rows.shape[1], num_crops=rows.shape[0])
    queue.rows = rows
    return queue


def random_crops(batch: int = 4, sizes=(16, 16, 8, 8, 8), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, s, s, generator=g) for s in sizes]


# The example on a few small batches of the small digits set, with a tiny model and the k-NN probe after the last
# epoch only: the code paths of a run, not its figures. Each test file adds its iterations and queue.
TINY_EXAMPLE_ARGS = ["--dataset", "digits", "--arch", "small_resnet", "--num-workers", "0", "--batch-size", "16"]
TINY_EXAMPLE_ARGS += ["--num-prototypes", "16"]
TINY_EXAMPLE_ARGS += ["--feat-dim", "16", "--hidden-dim", "32", "--eval-every", "100"]


class DispatchCounter(TorchDispatchMode):
    """Counts the aten operations dispatched while it is active, and the host synchronisations among them:
    ``aten::_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``, ``if t:``) and ``Tensor.tolist()``,
    which on the CPU reads memory without dispatching anything (on a GPU it copies to the host and waits)."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: Counter[str] = Counter()

    def __enter__(self) -> DispatchCounter:
        self._tolist = torch.Tensor.tolist
        counter, tolist = self.operations, self._tolist

        def counted_tolist(tensor: torch.Tensor):  # noqa: ANN202
            counter["tolist"] += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc_info) -> None:  # noqa: ANN002
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc_info)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.operations[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """Operations dispatched (``tolist`` calls not included)."""
        return sum(n for name, n in self.operations.items() if name != "tolist")

    @property
    def synchronisations(self) -> int:
        return self.operations["_local_scalar_dense"] + self.operations["tolist"]


def queue_breaking_step(loss_fn: SwAVLoss, seed: int = 1):
    """An engine's process function of a constructed run: two views of an image agree (a low loss) until the queue
    is in use, then they are unrelated random vectors, so the loss climbs towards ln K whenever the queue is in."""
    prototypes = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    g = torch.Generator().manual_seed(seed)

    def step(engine, batch):  # noqa: ANN001, ANN202
        z = F.normalize(torch.randn(8, 8, generator=g), dim=1)
        views = (
            [z, z] if not loss_fn.queue_in_use else [F.normalize(torch.randn(8, 8, generator=g), dim=1) for _ in "ab"]
        )
        return loss_fn(scores=[v @ prototypes.t() for v in views], embeddings=views, prototypes=prototypes).item()

    return step


def released_checkpoint(arch="resnet50", hidden=2048, out=128, prototypes=(3000,), seed=0, head=True):
    """A state dict in the layout of facebookresearch/swav's releases, from random weights: a torchvision
    backbone without fc, projection_head.0/1/3, prototypes (several heads as MultiPrototypes), keys prefixed
    'module.'."""
    torch.manual_seed(seed)
    backbone = getattr(models, arch)()
    width = backbone.fc.in_features
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    if head:
        state["projection_head.0.weight"] = torch.randn(hidden, width) / width**0.5
        state["projection_head.0.bias"] = torch.randn(hidden) * 0.1
        state["projection_head.1.weight"] = torch.rand(hidden) + 0.5
        state["projection_head.1.bias"] = torch.randn(hidden) * 0.1
        state["projection_head.1.running_mean"] = torch.randn(hidden) * 0.1
        state["projection_head.1.running_var"] = torch.rand(hidden) + 0.5
        state["projection_head.1.num_batches_tracked"] = torch.tensor(1000)
        state["projection_head.3.weight"] = torch.randn(out, hidden) / hidden**0.5
        state["projection_head.3.bias"] = torch.randn(out) * 0.1
        if len(prototypes) == 1:
            state["prototypes.weight"] = F.normalize(torch.randn(prototypes[0], out), dim=1)
        else:
            for i, k in enumerate(prototypes):
                state[f"prototypes.prototypes{i}.weight"] = F.normalize(torch.randn(k, out), dim=1)
    return {f"module.{k}": v for k, v in state.items()}
