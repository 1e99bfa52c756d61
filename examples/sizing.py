"""The settings of ``train_swav.py`` that the user did not give, sized from the data set it is given and from this
machine: an ImageFolder's defaults are ImageNet's (3000 prototypes, a queue of 3840, 224/96 px crops), which a
folder of a few hundred thumbnails cannot use."""

from __future__ import annotations

import argparse
import os

from swav_config import CROP_KEYS, ExampleError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SMALL_IMAGES = 96  # px: at or below, ImageNet's small crops (5-14% of the image) are a few pixels


def size_for_data(args: argparse.Namespace) -> list[str]:
    """Set what the user did not (no flag, no ``--recipe``) from the data set and the machine; returns, a line
    each, what was chosen and why."""
    chosen = []
    given = set(getattr(args, "given", ()))
    cores = os.cpu_count() or 1
    if "num_workers" not in given and args.num_workers > cores:
        chosen.append(f"{cores} loader workers, not {args.num_workers}: this machine has {cores} cores")
        args.num_workers = cores
    if args.dataset != "imagefolder" or args.recipe:
        return chosen
    files = sorted(p for p in (args.data_dir / "train").rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        return chosen  # the data set's own check names what is missing
    from PIL import Image

    with Image.open(files[0]) as first:
        side = min(first.size)
    count, global_batch = len(files), args.batch_size * int(os.environ.get("WORLD_SIZE", args.nproc_per_node or 1))
    if side <= SMALL_IMAGES and not given & set(CROP_KEYS):
        size = max(32, side - side % 8)
        args.size_crops, args.num_crops = [size, size // 2], [2, 4]
        args.min_scale_crops, args.max_scale_crops = [0.25, 0.1], [1.0, 0.25]
        chosen.append(
            f"crops 2x{size} + 4x{size // 2} px of 25-100% and 10-25% of the image (MultiCropTransform."
            f"for_small_images): the images are {side} px, where ImageNet's small crops are a few pixels"
        )
        if "eval_size" not in given:
            args.eval_size = size
    if "num_prototypes" not in given:
        prototypes = max(10, min(args.num_prototypes, count // 10))
        if prototypes != args.num_prototypes:
            chosen.append(f"{prototypes} prototypes, not {args.num_prototypes}: about one for 10 of the {count} images")
            args.num_prototypes = prototypes
    if "queue_length" not in given and args.queue_length:
        queue = 0 if count < 20 * global_batch else min(args.queue_length, count // 4 // global_batch * global_batch)
        if queue != args.queue_length:
            why = f"an epoch is {count // global_batch} steps" if queue == 0 else f"a quarter of the {count} images"
            chosen.append(f"a queue of {queue} rows, not {args.queue_length}: {why}")
            args.queue_length = queue
    if not given & {"freeze_prototypes_iters", "freeze_prototypes_epochs"}:
        epoch = max(1, count // global_batch)
        if epoch < args.freeze_prototypes_iters:
            chosen.append(f"prototypes frozen for {epoch} iterations (one epoch), not {args.freeze_prototypes_iters}")
            args.freeze_prototypes_iters = epoch
    return chosen


def size_and_say(args: argparse.Namespace) -> None:
    """:func:`size_for_data`, and the lines that say what was chosen (by the first process only)."""
    chosen = size_for_data(args)
    if chosen and int(os.environ.get("RANK", "0")) == 0:
        lines = "\n".join(f"  {line}" for line in chosen)
        print(f"sized for the data (pass a flag to choose otherwise):\n{lines}", flush=True)


def check_batch_fits(args: argparse.Namespace, size: int) -> None:
    """Refuse a batch larger than the data set, in the launching process (before any worker starts)."""
    world_size = int(os.environ.get("WORLD_SIZE", args.nproc_per_node or 1))
    if size < args.batch_size * world_size:
        raise ExampleError(
            f"--batch-size {args.batch_size} x {world_size} process(es) is larger than the data set ({size} "
            "images): no full batch"
        )
