#!/usr/bin/env python
"""What SwAV buys a user with few labels, measured as in the SwAV paper's semi-supervised table: the pretrained
backbone plus a linear head, all fine-tuned on a class-balanced fraction of the training split's labels, scored
on the held-out split; beside it, on the same labelled images with the same schedule, the same network from
random initialisation (supervised from scratch) and a logistic regression on the raw pixels.

    python examples/finetune.py --checkpoint runs/swav/swav_checkpoint_2700.pt --label-fraction 0.01 --seed 0
    python examples/finetune.py --checkpoint swav_800ep_pretrain.pth.tar --dataset imagefolder --data-dir data \\
        --label-fraction 0.1

It prints one JSON object (``--output`` writes it too): ``top1_swav``, ``top1_scratch``, ``top1_pixels``,
``label_fraction``, ``num_labels``, ``seed`` and the schedule. The held-out split is the pretraining run's (drawn by
its seed); the labelled images are drawn by ``--seed`` from the training split only, and the schedule's settings
were chosen on the training split (docs/main-job.md), never on the held-out images.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events, create_supervised_evaluator, create_supervised_trainer
from ignite.handlers import Checkpoint, ProgressBar
from ignite.metrics import Accuracy
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parent))

from linear_eval import backbones  # noqa: E402
from swav_config import DATASETS, ExampleError  # noqa: E402
from swav_data import require  # noqa: E402

from ignite_swav import DurableDiskSaver  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="train_swav.py's, or a facebookresearch/swav release"
    )
    parser.add_argument("--label-fraction", type=float, required=True, help="fraction of the training split's labels")
    parser.add_argument("--seed", type=int, default=0, help="draws the labelled images and the fine-tuning's crops")
    parser.add_argument("--dataset", choices=DATASETS, default=None, help="for a release (ours name their own)")
    parser.add_argument("--arch", default="resnet50", help="torchvision architecture of a release")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="data set folder (real data sets)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of each network (default 400)")
    parser.add_argument("--batch-size", type=int, default=64, help="labelled images per step (at most all of them)")
    parser.add_argument("--lr", type=float, default=0.01, help="the backbone's learning rate (the head's: 10x)")
    parser.add_argument("--output", type=Path, default=None, help="write the JSON object to this file too")
    parser.add_argument("--output-dir", type=Path, default=None, help="save the fine-tuned SwAV network here")
    parser.add_argument(
        "--select",
        type=int,
        default=0,
        metavar="N",
        help="choose settings: score on N other images of the training split, not on the held-out split",
    )
    return parser


def labelled_subset(labels: torch.Tensor, fraction: float, seed: int) -> list[int]:
    """A class-balanced fraction of the indices of ``labels``, drawn by ``seed``: ``round(fraction * N)`` images,
    as evenly over the classes as they divide (the classes that get one more are drawn too)."""
    classes = sorted(set(labels.tolist()))
    total = round(fraction * len(labels))
    if total < len(classes):
        raise ExampleError(
            f"--label-fraction {fraction:g} gives {total} labelled image(s) for {len(classes)} classes: at least one "
            f"per class is needed (at least {len(classes) / len(labels):.4g})"
        )
    generator = torch.Generator().manual_seed(seed)
    extra = set(torch.randperm(len(classes), generator=generator)[: total % len(classes)].tolist())
    chosen = []
    for position, label in enumerate(classes):
        members = (labels == label).nonzero().flatten()
        count = total // len(classes) + (position in extra)
        if count > len(members):
            raise ExampleError(f"--label-fraction {fraction:g}: class {label} has only {len(members)} images")
        chosen += members[torch.randperm(len(members), generator=generator)[:count]].tolist()
    return sorted(chosen)


class Shifted(Dataset):
    """The labelled images, each shifted by up to ``margin`` pixels at every read (the fine-tuning's augmentation)."""

    def __init__(self, images: Dataset, margin: int) -> None:
        self.images = images
        size = images[0][0].shape[-1]
        self.crop = v2.RandomCrop(size, padding=margin, padding_mode="edge")

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.images[index]
        return self.crop(image), int(label)


def finetune(
    backbone: nn.Module,
    labelled: Dataset,
    heldout: Dataset,
    num_classes: int,
    args: argparse.Namespace,
    name: str,
    output_dir: Path | None = None,
) -> float:
    """Top-1 on ``heldout`` of ``backbone`` plus a linear head, all trained on ``labelled`` (Ignite's trainer and
    evaluator; with ``output_dir``, Ignite's ``Checkpoint`` keeps the fine-tuned network); the same schedule for
    every network: ``args.steps`` steps of SGD, cosine to zero."""
    torch.manual_seed(args.seed)  # the head and the crops: the same for every network
    width = backbone(labelled[0][0].unsqueeze(0)).flatten(1).shape[1]
    model = nn.Sequential(backbone, nn.Flatten(), nn.Linear(width, num_classes))
    head = list(model[2].parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    groups = [{"params": body, "lr": args.lr}, {"params": head, "lr": 10 * args.lr}]
    optimizer = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    batch_size = min(args.batch_size, len(labelled))  # type: ignore[arg-type]
    loader = DataLoader(Shifted(labelled, margin=2), batch_size=batch_size, shuffle=True, drop_last=True)
    trainer = create_supervised_trainer(model, optimizer, nn.CrossEntropyLoss())
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: scheduler.step())
    if sys.stderr.isatty():
        ProgressBar(desc=name).attach(trainer)
    if output_dir is not None:
        saver = DurableDiskSaver(output_dir, require_empty=False)
        prefix = f"finetuned_{name}_{args.label_fraction:g}_seed{args.seed}"
        trainer.add_event_handler(Events.COMPLETED, Checkpoint({"model": model}, saver, filename_prefix=prefix))
    trainer.run(loader, max_epochs=math.ceil(args.steps / len(loader)), epoch_length=len(loader))
    evaluator = create_supervised_evaluator(model, metrics={"top1": Accuracy()})
    return float(evaluator.run(DataLoader(heldout, batch_size=256)).metrics["top1"])


def pixels_top1(labelled: Dataset, heldout: Dataset, seed: int) -> float:
    """Top-1 on ``heldout`` of a logistic regression on the raw (normalised) pixels of ``labelled``."""
    linear_model = require("sklearn.linear_model", "the raw-pixel baseline")

    def arrays(images: Dataset) -> tuple[Any, Any]:
        pairs = [images[i] for i in range(len(images))]  # type: ignore[arg-type]
        return torch.stack([p[0].flatten() for p in pairs]).numpy(), [int(p[1]) for p in pairs]

    classifier = linear_model.LogisticRegression(max_iter=2000, random_state=seed).fit(*arrays(labelled))
    features, labels = arrays(heldout)
    return float((classifier.predict(features) == labels).mean())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0 < args.label_fraction <= 1:
            raise ExampleError(f"--label-fraction must be in (0, 1], got {args.label_fraction:g}")
        if args.steps < 1 or args.batch_size < 1 or not args.lr > 0:
            raise ExampleError("--steps and --batch-size must be >= 1 and --lr > 0")
        backbone, random_backbone, data, dataset, epochs = backbones(args)
        train = data.reference  # the training split: the only images labels are drawn from
        labels = torch.tensor([int(train[i][1]) for i in range(len(train))])
        chosen = labelled_subset(labels, args.label_fraction, args.seed)
    except ExampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    labelled = Subset(train, chosen)
    num_classes = int(labels.max()) + 1
    scored = data.heldout
    if args.select:  # choosing the schedule's settings: the held-out split is not looked at
        order, taken = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)), set(chosen)
        scored = Subset(train, [i for i in order.tolist() if i not in taken][: args.select])
    top1_swav = finetune(backbone, labelled, scored, num_classes, args, "swav", args.output_dir)
    top1_scratch = finetune(random_backbone, labelled, scored, num_classes, args, "scratch")
    results = {
        "top1_swav": top1_swav,
        "top1_scratch": top1_scratch,
        "top1_pixels": pixels_top1(labelled, scored, args.seed),
        "scored_on": f"{args.select} other images of the training split" if args.select else "the held-out split",
        "label_fraction": args.label_fraction,
        "num_labels": len(chosen),
        "seed": args.seed,
        "dataset": dataset,
        "checkpoint": str(args.checkpoint),
        "epochs_pretrained": epochs,
        "steps": args.steps,
        "lr": args.lr,
    }
    print(json.dumps(results, indent=2))
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
