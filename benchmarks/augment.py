#!/usr/bin/env python
"""Multi-crop augmentation throughput: the per-image pipeline (``MultiCropTransform`` in DataLoader workers)
against the batched one (``BatchedMultiCrop`` on the device, the workers only decode), and against decoding on
the device too (the workers only read the files' bytes, ``decode_images`` decodes the batch), in images per second;
with ``--train``, also SwAV training throughput fed by the batched augmentation against the same training
step fed with pre-made crops.

    python benchmarks/augment.py                                    # CPU, ImageNet recipe on 256x320 images
    python benchmarks/augment.py --preset cifar --image-size 32 32 --batch-size 256
    python benchmarks/augment.py --device cuda --workers 4 8 16 --batch-size 256 --train --arch resnet50
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from typing import Any

import torch
from _machine import describe
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ignite_swav import BatchedMultiCrop, MultiCropTransform, collate_crops, collate_images, prepare_image_batch


class JpegImages(Dataset):
    """Synthetic photos-like images stored as JPEG bytes; each item is decoded by PIL, then ``transform``."""

    def __init__(self, count: int, height: int, width: int, transform: Any) -> None:
        generator = torch.Generator().manual_seed(0)
        base = torch.rand(count, 3, 8, 8, generator=generator)
        images = torch.nn.functional.interpolate(base, size=(height, width), mode="bilinear") * 255
        noise = torch.randint(0, 24, images.shape, generator=generator)
        pixels = (images + noise).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        self.encoded = []
        for array in pixels:
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="JPEG", quality=90)
            self.encoded.append(buffer.getvalue())
        self.transform = transform

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, index: int) -> Any:
        if self.transform is None:  # the file's bytes, for decode_images on the device
            return torch.frombuffer(bytearray(self.encoded[index]), dtype=torch.uint8), 0
        return self.transform(Image.open(io.BytesIO(self.encoded[index])).convert("RGB"))


def settings(preset: str) -> MultiCropTransform:
    if preset == "cifar":
        return MultiCropTransform.for_cifar()
    if preset == "digits":
        return MultiCropTransform.for_digits()
    return MultiCropTransform()


def loader_rate(dataset: Dataset, batch_size: int, workers: int, collate: Any, batches: int, consume: Any) -> float:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        collate_fn=collate,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    iterator = iter(loader)
    consume(next(iterator))  # workers started, first batch ready
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        consume(batch)
        seen += batch_size
    return seen / (time.perf_counter() - start)


def train_rates(args: argparse.Namespace, device: torch.device, transform: MultiCropTransform) -> tuple[float, float]:
    """Images/s of training fed by loader + BatchedMultiCrop, and of the same step on pre-made crops."""
    from ignite.engine import Events
    from step import build_model

    from ignite_swav import SwAVLoss, create_swav_trainer

    augment = BatchedMultiCrop.from_transform(transform)
    rates = []
    for feed in ("pre-made crops", "batched augmentation"):
        torch.manual_seed(0)
        model = build_model(args.arch, 128, 3000).to(device).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        trainer = create_swav_trainer(
            model,
            optimizer,
            SwAVLoss(),
            device=device,
            amp_mode="amp" if args.amp else None,
            amp_dtype=torch.bfloat16 if args.amp else None,
            augment=augment if feed == "batched augmentation" else None,
            non_blocking=True,
        )
        if feed == "pre-made crops":
            images = torch.randint(0, 256, (args.batch_size, 3, *args.image_size), dtype=torch.uint8, device=device)
            crops = augment(images)
            data: Any = [crops] * (args.batches + 3)
        else:
            # the workers decode with PIL, or (--decode-on-device) only read the bytes, decoded by prepare_image_batch
            transform = None if args.decode_on_device else v2.PILToTensor()
            dataset = JpegImages(args.images, *args.image_size, transform=transform)
            data = DataLoader(
                dataset,
                batch_size=args.batch_size,
                shuffle=True,
                num_workers=max(args.workers),
                collate_fn=collate_images,
                drop_last=True,
                pin_memory=device.type == "cuda",
                persistent_workers=max(args.workers) > 0,
            )
        timings: list[float] = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _, t=timings: t.append(time.perf_counter()))
        trainer.run(data, max_epochs=1, epoch_length=args.batches + 3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter())
        # the first 3 steps warm up (workers, cudnn autotuning)
        rates.append(args.batch_size * args.batches / (timings[-1] - timings[2]))
    return rates[0], rates[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--device", default="cpu")
    add("--preset", choices=("imagenet", "cifar", "digits"), default="imagenet")
    add("--image-size", type=int, nargs=2, default=[256, 320], help="height width of the source images")
    add("--images", type=int, default=512, help="size of the synthetic JPEG data set")
    add("--batch-size", type=int, default=64)
    add("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers of the per-image pipeline")
    add("--batches", type=int, default=6, help="batches timed per configuration")
    add("--repeats", type=int, default=3)
    add("--train", action="store_true", help="also measure training throughput (see --arch)")
    add("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    add("--amp", action="store_true", help="bfloat16 autocast in --train")
    add("--train-only", action="store_true", help="only the training measurement of --train")
    add("--decode-on-device", action="store_true", help="in --train, decode the JPEGs on the device (nvJPEG on a GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    transform = settings(args.preset)
    augment = BatchedMultiCrop.from_transform(transform)
    print(describe(device))
    print(
        f"preset {args.preset}: crops {transform.num_crops} x {transform.size_crops} px from "
        f"{args.image_size[0]}x{args.image_size[1]} JPEGs decoded by PIL in the workers; batch {args.batch_size}; "
        f"median of {args.repeats} runs of {args.batches} batches (images/s)"
    )

    def synchronised(batch: Any) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def augmented(batch: Any) -> None:
        images, _ = prepare_image_batch(batch, device=device, non_blocking=True)  # decodes file bytes on the device
        augment(images)
        synchronised(batch)

    if not args.train_only:
        per_image = JpegImages(args.images, *args.image_size, transform=lambda image: (transform(image), 0))
        decoded = JpegImages(
            args.images, *args.image_size, transform=lambda image: (v2.functional.pil_to_tensor(image), 0)
        )
        file_bytes = JpegImages(args.images, *args.image_size, transform=None)
        for workers in args.workers:
            rates = [
                loader_rate(per_image, args.batch_size, workers, collate_crops, args.batches, synchronised)
                for _ in range(args.repeats)
            ]
            batched = [
                loader_rate(decoded, args.batch_size, workers, collate_images, args.batches, augmented)
                for _ in range(args.repeats)
            ]
            on_device = [
                loader_rate(file_bytes, args.batch_size, workers, collate_images, args.batches, augmented)
                for _ in range(args.repeats)
            ]
            print(
                f"{workers:>2} workers: per-image MultiCropTransform {statistics.median(rates):8.1f}   "
                f"PIL decode in workers + BatchedMultiCrop on {device.type} {statistics.median(batched):8.1f}   "
                f"bytes in workers + decode and BatchedMultiCrop on {device.type} {statistics.median(on_device):8.1f}"
            )
    images = torch.randint(0, 256, (args.batch_size, 3, *args.image_size), dtype=torch.uint8, device=device)
    augment(images)
    seconds = []  # the augmentation alone, on images already on the device
    for _ in range(args.repeats):
        synchronised(None)
        start = time.perf_counter()
        augment(images)
        synchronised(None)
        seconds.append(time.perf_counter() - start)
    print(f"BatchedMultiCrop alone on {device.type}: {args.batch_size / statistics.median(seconds):8.1f} images/s")
    if args.train:
        premade, fed = train_rates(args, device, transform)
        where = f"decode on {device.type}" if args.decode_on_device else "PIL decode in the workers"
        print(
            f"training {args.arch}: pre-made crops {premade:.1f} images/s, fed by {where} + BatchedMultiCrop "
            f"{fed:.1f} images/s ({100 * (fed / premade - 1):+.1f}%)"
        )


if __name__ == "__main__":
    main()
