#!/usr/bin/env python
"""Linear probe of a SwAV checkpoint: frozen backbone, one linear layer on top. The checkpoint is one written
by train_swav.py, or a release of facebookresearch/swav (then name the data set and the architecture).

    python examples/linear_eval.py --checkpoint runs/swav/swav_checkpoint_1640.pt
    python examples/linear_eval.py --checkpoint swav_800ep_pretrain.pth.tar --dataset cifar10 --data-dir data

The backbone's features of the training split and of the held-out split are computed once (frozen, eval
mode, no augmentation); a linear classifier is trained on the training features by Ignite's supervised trainer
(Adam on mini-batches of 256) and its top-1 on the held-out features measured by Ignite's evaluator, next to the
same probe on the network at random initialisation and on the raw pixels.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import create_supervised_evaluator, create_supervised_trainer
from ignite.metrics import Accuracy
from ignite.utils import setup_logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from models import build_model  # noqa: E402
from swav_config import DATASETS, ExampleError, parse_args  # noqa: E402
from swav_data import DataBundle, build_data  # noqa: E402

from ignite_swav import (  # noqa: E402
    RELEASES,
    download_release,
    extract_features,
    load_checkpoint_file,
    load_objects,
    load_official_checkpoint,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint of train_swav.py, or a facebookresearch/swav release (its file, or its name: swav_800ep)",
    )
    parser.add_argument(
        "--dataset", choices=DATASETS, default=None, help="data set to probe on (for a release; ours name their own)"
    )
    parser.add_argument(
        "--arch", default=None, help="architecture of a release file (default: a named release's, else resnet50)"
    )
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="data set folder (real data sets)")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the linear classifier (default: 100)")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of the linear classifier, Adam (0.01)")
    parser.add_argument("--output", type=Path, default=None, help="write the figures to this JSON file")
    return parser


def is_release(checkpoint: Any) -> bool:
    """Whether a loaded checkpoint is a facebookresearch/swav release (flat, ``module.``-prefixed weights, or
    ``main_swav.py``'s ``{"state_dict": ...}``) rather than one of train_swav.py."""
    if not isinstance(checkpoint, dict):
        return False
    weights = checkpoint.get("state_dict", checkpoint)
    return isinstance(weights, dict) and any(str(k).startswith("module.") for k in weights)


def load_settings(
    path: Path, name: str = "--checkpoint", settings_required: bool = True
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The checkpoint and the run settings stored in it (``None`` for a release, or for a checkpoint of another
    Ignite run when ``settings_required`` is false); bad files raise ExampleError naming the argument ``name``."""
    if not path.is_file() and str(path) in RELEASES:  # a release by name: downloaded once into torch's hub cache
        path = download_release(str(path))
    if not path.is_file():
        raise ExampleError(f"{name} '{path}' does not exist")
    try:
        checkpoint = load_checkpoint_file(path)
    except ValueError as error:
        raise ExampleError(str(error)) from None
    if is_release(checkpoint):
        return checkpoint, None
    history = checkpoint.get("history") if isinstance(checkpoint, dict) else None
    config = history.get("config") if isinstance(history, dict) else None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or (settings_required and not config):
        kind = "written by train_swav.py" if settings_required else "with a SwAVModel's 'model' entry"
        raise ExampleError(f"{name} '{path}' is neither a checkpoint {kind} nor a facebookresearch/swav release")
    return checkpoint, config


def load_model(model: nn.Module, checkpoint: dict[str, Any], path: Path) -> None:
    """Load the checkpoint's weights into ``model`` (built from the checkpoint's settings); a model of another
    shape (a checkpoint of an earlier version of train_swav.py) raises ExampleError."""
    try:
        load_objects({"model": model}, {"model": checkpoint["model"]})
    except ValueError as error:
        raise ExampleError(
            f"--checkpoint '{path}' holds a model that train_swav.py does not build from its settings any more "
            f"(written by an earlier version?): {error}"
        ) from None


def train_linear(
    train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    lr: float,
    batch_size: int = 256,
) -> float:
    """Top-1 on ``heldout`` of a linear classifier trained on standardised ``train`` features: Ignite's supervised
    trainer (Adam, mini-batches of ``batch_size``) and evaluator (``Accuracy``)."""
    torch.manual_seed(0)
    features, labels = train
    mean, std = features.mean(0), features.std(0) + 1e-6
    classifier = nn.Linear(features.shape[1], int(labels.max()) + 1)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=1e-4)
    trainer = create_supervised_trainer(classifier, optimizer, F.cross_entropy)
    trainer.logger = setup_logger("linear_eval", level=logging.WARNING)
    generator = torch.Generator().manual_seed(0)
    standardised = TensorDataset((features - mean) / std, labels)
    trainer.run(DataLoader(standardised, batch_size=batch_size, shuffle=True, generator=generator), max_epochs=epochs)
    evaluator = create_supervised_evaluator(classifier, metrics={"top1": Accuracy()})
    evaluator.run(DataLoader(TensorDataset((heldout[0] - mean) / std, heldout[1]), batch_size=1024))
    return float(evaluator.state.metrics["top1"])


def linear_probe(backbone: nn.Module, data: DataBundle, epochs: int, lr: float) -> float:
    """Top-1 on the held-out split of a linear classifier on ``backbone``'s frozen features."""
    loaders = [DataLoader(d, batch_size=256) for d in (data.reference, data.heldout)]
    train, heldout = (extract_features(backbone, loader) for loader in loaders)
    return train_linear(train, heldout, epochs, lr)


def backbones(args: argparse.Namespace) -> tuple[nn.Module, nn.Module, DataBundle, str, int | None]:
    """The pretrained backbone, the same network at random initialisation, the data, the data set's name and the
    pretraining epochs (``None`` for a release) of ``--checkpoint``."""
    checkpoint, config = load_settings(args.checkpoint)
    dataset = args.dataset or (config or {}).get("dataset")
    if dataset is None:
        raise ExampleError(
            f"--checkpoint '{args.checkpoint}' is a facebookresearch/swav release, which names no data set: pass "
            "--dataset"
        )
    run_args = parse_args(
        ["--dataset", dataset, "--data-dir", str(args.data_dir), "--output-dir", str(args.checkpoint.parent)]
    )
    if config is None:
        release = RELEASES.get(str(args.checkpoint))
        try:
            model = load_official_checkpoint(checkpoint, arch=args.arch or (release.arch if release else None))
        except ValueError as error:
            raise ExampleError(f"--checkpoint '{args.checkpoint}': {error}") from None
        torch.manual_seed(0)
        random_backbone = copy.deepcopy(model.backbone)  # the same network, its weights drawn again
        for module in random_backbone.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        return model.backbone, random_backbone, build_data(run_args), dataset, None
    for key, value in config.items():
        setattr(run_args, key, value)
    data = build_data(run_args)
    model = build_model(run_args)
    random_backbone = build_model(run_args).backbone
    load_model(model, checkpoint, args.checkpoint)
    epochs = checkpoint["trainer"]["iteration"] // max(1, checkpoint["trainer"]["epoch_length"])
    return model.backbone, random_backbone, data, dataset, epochs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        backbone, random_backbone, data, dataset, epochs = backbones(args)
    except ExampleError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = {
        "linear_top1": linear_probe(backbone, data, args.epochs, args.lr),
        "linear_top1_random_init": linear_probe(random_backbone, data, args.epochs, args.lr),
        "linear_top1_raw_pixels": linear_probe(nn.Flatten(), data, args.epochs, args.lr),
        "checkpoint": str(args.checkpoint),
        "epochs_pretrained": epochs,
    }
    print(
        f"linear probe top-1 on the held-out split ({dataset}):\n"
        f"  SwAV pretrained       {results['linear_top1']:.4f}\n"
        f"  same net, random init {results['linear_top1_random_init']:.4f}\n"
        f"  raw pixels            {results['linear_top1_raw_pixels']:.4f}"
    )
    if args.output is not None:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
