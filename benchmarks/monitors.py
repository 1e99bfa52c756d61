#!/usr/bin/env python
"""What watching a run costs: the training-health monitor's per-iteration work (adding the loss's last step to
sums kept on the device) and the online linear probe's (one step of its classifier on the captured features),
against a whole training step; and the monitor's end-of-epoch work (one all-reduce and one read). Interleaved, in
one process, on the same crops.

    python benchmarks/monitors.py                     # the main job: small ResNet, 2x28 px, batch 64, K 100
    python benchmarks/monitors.py --setting cifar     # ResNet-18, 2x32 + 4x16 px, batch 64, K 3000, queue 3840
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _machine import describe
from ignite.engine import Engine
from torch import nn
from torchvision import models as torchvision_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from models import SmallResNet  # noqa: E402

from ignite_swav import (  # noqa: E402
    OnlineLinearProbe,
    SwAVHealthMonitor,
    SwAVLoss,
    SwAVModel,
    SwAVProjectionHead,
    SwAVPrototypes,
    SwAVQueue,
    create_swav_trainer,
)

SETTINGS = {
    "mnist": {"sizes": (28, 28), "prototypes": 100, "feat_dim": 64, "hidden": 512, "queue": 0},
    "cifar": {"sizes": (32, 32, 16, 16, 16, 16), "prototypes": 3000, "feat_dim": 128, "hidden": 2048, "queue": 3840},
}


def build(setting: dict) -> tuple[Engine, SwAVLoss, SwAVModel]:
    torch.manual_seed(0)
    if setting["sizes"][0] == 28:
        backbone: nn.Module = SmallResNet()
        width = backbone.out_features
    else:
        backbone = torchvision_models.resnet18()
        width = backbone.fc.in_features
        backbone.fc = nn.Identity()
    head = SwAVProjectionHead(width, setting["hidden"], setting["feat_dim"])
    model = SwAVModel(backbone, head, SwAVPrototypes(setting["feat_dim"], setting["prototypes"]))
    loss_fn = SwAVLoss()
    if setting["queue"]:
        loss_fn.queue = SwAVQueue(setting["queue"])
        loss_fn.queue.rows = F.normalize(torch.randn(2, setting["queue"], setting["feat_dim"]), dim=2)
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), loss_fn)
    trainer.state.iteration = 1_000  # past any prototype freezing
    return trainer, loss_fn, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="mnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    setting = SETTINGS[args.setting]
    print(describe("cpu"))
    generator = torch.Generator().manual_seed(0)
    crops = [torch.randn(args.batch_size, 3, s, s, generator=generator) for s in setting["sizes"]]
    trainer, loss_fn, model = build(setting)
    monitor = SwAVHealthMonitor(loss_fn)
    probe = OnlineLinearProbe(model.backbone, num_classes=10)
    probe.attach(Engine(lambda e, b: None))  # its hook on the backbone; its step is called by hand below
    trainer.state.batch = (crops, torch.randint(0, 10, (args.batch_size,), generator=generator))
    step = trainer._process_function

    def train_step() -> None:
        probe._arm(trainer)  # keep the features of this step's first backbone call, as during a run
        step(trainer, crops)

    train_step()  # warm up
    probe.train_step(trainer)
    steps, monitored, probed = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        train_step()
        steps.append(time.perf_counter() - start)
        start = time.perf_counter()
        monitor.iteration_completed(trainer)
        monitored.append(time.perf_counter() - start)
        start = time.perf_counter()
        probe.train_step(trainer)
        probed.append(time.perf_counter() - start)
    start = time.perf_counter()
    metrics = monitor.compute()
    end_of_epoch = time.perf_counter() - start
    step_ms, monitor_ms, probe_ms = (statistics.median(t) * 1000 for t in (steps, monitored, probed))
    print(
        f"setting {args.setting}: crops {setting['sizes']}, batch {args.batch_size}, K {setting['prototypes']}, "
        f"queue {setting['queue']}; median of {args.repeats} (ms)"
    )
    print(f"training step {step_ms:.2f}; per iteration: health monitor {monitor_ms:.3f}, online probe {probe_ms:.3f}")
    print(
        f"health monitor {100 * monitor_ms / step_ms:.2f}% of a step, online probe {100 * probe_ms / step_ms:.2f}% of "
        f"a step; the monitor's end of epoch (all-reduce + read) {end_of_epoch * 1000:.2f} ms once"
    )
    print("metrics " + ", ".join(f"{name} {value:.3f}" for name, value in metrics.items()))


if __name__ == "__main__":
    main()
