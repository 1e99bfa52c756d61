#!/usr/bin/env python
"""Write the backbone of a SwAV checkpoint as a plain state dict, for torchvision or timm.

    python examples/export_backbone.py runs/swav/swav_checkpoint_2700.pt backbone.pt
    python examples/export_backbone.py runs/in1k/swav_checkpoint_500400.pt resnet50.pt --format timm --arch resnet50
    python examples/export_backbone.py swav_800ep_pretrain.pth.tar resnet50.pt   # a facebookresearch/swav release

The checkpoint is one of train_swav.py, any Ignite ``Checkpoint`` with a SwAVModel's ``"model"`` entry (as
``create_swav_trainer`` runs write them), or a release of facebookresearch/swav. With ``--arch`` the weights are
first loaded into that torchvision (or timm) model, and a mismatch stops before anything is written; for
train_swav.py's torchvision backbones with the standard stem, the architecture is the run's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from linear_eval import is_release, load_settings  # noqa: E402
from swav_config import ExampleError  # noqa: E402

from ignite_swav import export_backbone, load_official_checkpoint  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "checkpoint",
        type=Path,
        help="a checkpoint of train_swav.py or of any Ignite run, or a facebookresearch/swav release",
    )
    parser.add_argument("output", type=Path, help="the file to write (a torch.save'd state dict)")
    parser.add_argument(
        "--format", choices=("torchvision", "timm"), default="torchvision", help="(default: torchvision)"
    )
    parser.add_argument(
        "--arch",
        default=None,
        help="check the weights against this torchvision (or timm) model first (default: the run's own torchvision "
        "architecture, resnet50 for a release, none for the small ResNet)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # any Ignite Checkpoint of a SwAVModel (create_swav_trainer's runs), not only train_swav.py's
        checkpoint, config = load_settings(args.checkpoint, "checkpoint", settings_required=False)
        arch = args.arch
        if is_release(checkpoint):
            source = load_official_checkpoint(checkpoint, arch=arch or "resnet50")
            arch = arch or "resnet50"
        else:
            source = checkpoint
            if arch is None and config and config.get("arch") != "small_resnet" and not config.get("small_stem"):
                arch = config.get("arch")
        if args.output.parent != Path("") and not args.output.parent.is_dir():
            raise ExampleError(f"output '{args.output}': the folder '{args.output.parent}' does not exist")
        state = export_backbone(source, args.output, format=args.format, arch=arch)
    except (ExampleError, ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    checked = f", checked against {args.format}'s {arch}" if arch else ""
    print(f"wrote the backbone ({len(state)} tensors{checked}) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
