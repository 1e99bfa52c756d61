"""SwAV multi-crop augmentation on torchvision transforms, and the collate function that stacks crops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.data import default_collate
from torchvision.transforms import v2

from ignite_swav._validation import check_int

_LARGEST_CROP = 8192  # pixels a side: four times a 2048 px crop, far beyond any published multi-crop recipe

__all__ = ["MultiCropSettings", "MultiCropTransform", "collate_crops"]

_Augmentation = TypeVar("_Augmentation", bound="MultiCropAugmentation")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def blur_kernel_size(crop_size: int) -> int:
    """The Gaussian blur's kernel size for a crop of ``crop_size`` pixels: about 10% of the crop, odd, at least 3
    (SimCLR's and SwAV's choice: 23 px for 224 px crops); shared by the per-image and the batched augmentation."""
    return max(3, int(0.1 * crop_size) // 2 * 2 + 1)


def elastic_kernel_size(sigma: float) -> int:
    """The kernel size of the blur of an elastic warp's displacements: ``8 * sigma + 1``, odd, as torchvision's
    ``ElasticTransform`` draws it; shared by the per-image and the batched augmentation."""
    return int(8 * sigma + 1) | 1


def _check_per_size(name: str, value: Sequence[Any], count: int) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != count:
        raise ValueError(f"{name} must have one entry per crop size ({count}), got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class MultiCropSettings:
    """The validated settings of a SwAV multi-crop augmentation, and the usual presets: a frozen dataclass that
    :class:`MultiCropTransform` (per image, torchvision transforms, in DataLoader workers) and
    :class:`~ignite_swav.BatchedMultiCrop` (per batch, on the batch's device) are built from, so that one preset
    means the same augmentation in both. Its fields are the transforms' arguments (see
    :class:`MultiCropTransform`); sequences are kept as tuples, numbers as floats.

    Example:
        >>> from ignite_swav import BatchedMultiCrop, MultiCropSettings, MultiCropTransform
        >>> settings = MultiCropSettings.for_cifar()
        >>> settings.size_crops, settings.num_crops, settings.total_crops
        ((32, 16), (2, 4), 6)
        >>> MultiCropTransform(settings).settings == BatchedMultiCrop(settings).settings
        True
    """

    size_crops: Sequence[int] = (224, 96)
    num_crops: Sequence[int] = (2, 6)
    min_scale_crops: Sequence[float] = (0.14, 0.05)
    max_scale_crops: Sequence[float] = (1.0, 0.14)
    color_strength: float = 1.0
    jitter: Sequence[float] = (0.8, 0.8, 0.8, 0.2)
    flip_prob: float = 0.5
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    rotation: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 5.0

    def __post_init__(self) -> None:
        size_crops, num_crops = self.size_crops, self.num_crops
        if isinstance(size_crops, (str, bytes)) or not isinstance(size_crops, Sequence) or not size_crops:
            raise ValueError(f"size_crops must be a non-empty sequence of crop sizes, got {size_crops!r}")
        count = len(size_crops)
        sizes = tuple(check_int(f"size_crops[{i}]", s, 1) for i, s in enumerate(size_crops))
        for i, size in enumerate(sizes):
            if size > _LARGEST_CROP:  # a typing mistake that would exhaust memory before any message
                raise ValueError(f"size_crops[{i}] must be at most {_LARGEST_CROP} pixels, got {size}")
        counts = tuple(
            check_int(f"num_crops[{i}]", n, 0) for i, n in enumerate(_check_per_size("num_crops", num_crops, count))
        )
        if sum(counts) < 2:
            raise ValueError(f"num_crops must give at least 2 crops in all (SwAV compares views), got {num_crops}")
        low_scales = _check_per_size("min_scale_crops", self.min_scale_crops, count)
        high_scales = _check_per_size("max_scale_crops", self.max_scale_crops, count)
        for i, (low, high) in enumerate(zip(low_scales, high_scales)):
            if not 0 < low <= high <= 1:
                raise ValueError(
                    f"crop size {sizes[i]}: scales must satisfy 0 < min_scale_crops <= max_scale_crops <= 1,"
                    f" got ({low}, {high})"
                )
        if not 0 <= self.color_strength:
            raise ValueError(f"color_strength must be >= 0, got {self.color_strength}")
        if len(self.jitter) != 4 or min(self.jitter) < 0:
            raise ValueError(f"jitter must be 4 values >= 0 (brightness, contrast, saturation, hue), got {self.jitter}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"flip_prob must be a probability in [0, 1], got {self.flip_prob}")
        if not 0 <= self.blur_prob <= 1:
            raise ValueError(f"blur_prob must be a probability in [0, 1], got {self.blur_prob}")
        if len(self.blur_sigma) != 2 or not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (low, high) with 0 < low <= high, got {self.blur_sigma}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must have 3 entries (RGB), std > 0; got mean={self.mean}, std={self.std}")
        if not 0 <= self.rotation <= 180:  # also refuses NaN
            raise ValueError(f"rotation must be an angle in degrees in [0, 180], got {self.rotation}")
        if not 0 <= self.elastic_alpha < math.inf:
            raise ValueError(
                f"elastic_alpha must be a finite number >= 0 (0: no elastic warp), got {self.elastic_alpha}"
            )
        if not 0 < self.elastic_sigma < math.inf:
            raise ValueError(f"elastic_sigma must be a finite number > 0, got {self.elastic_sigma}")
        if self.elastic_alpha > 0:
            for size in sizes:  # the displacement's blur pads by half its kernel, which reflect padding keeps < size
                if elastic_kernel_size(self.elastic_sigma) // 2 >= size:
                    raise ValueError(
                        f"elastic_sigma must be less than {(2 * size - 1) / 8:g} for {size} px crops (the blur of "
                        "the displacements spans 8 sigma + 1 pixels, which must be less than twice the crop), "
                        f"got {self.elastic_sigma}"
                    )
        normalised = {
            "size_crops": sizes,
            "num_crops": counts,
            "min_scale_crops": tuple(float(v) for v in low_scales),
            "max_scale_crops": tuple(float(v) for v in high_scales),
            "color_strength": float(self.color_strength),
            "jitter": tuple(float(v) for v in self.jitter),
            "flip_prob": float(self.flip_prob),
            "blur_prob": float(self.blur_prob),
            "blur_sigma": tuple(float(v) for v in self.blur_sigma),
            "mean": tuple(float(v) for v in self.mean),
            "std": tuple(float(v) for v in self.std),
            "rotation": float(self.rotation),
            "elastic_alpha": float(self.elastic_alpha),
            "elastic_sigma": float(self.elastic_sigma),
        }
        for name, value in normalised.items():  # frozen: set once, here
            object.__setattr__(self, name, value)

    @property
    def jitter_strengths(self) -> tuple[float, float, float, float]:
        """Brightness, contrast, saturation and hue jitter at ``color_strength`` (torchvision caps hue at 0.5)."""
        strengths = [self.color_strength * j for j in self.jitter]
        return (strengths[0], strengths[1], strengths[2], min(strengths[3], 0.5))

    @property
    def total_crops(self) -> int:
        """Number of crops per image."""
        return sum(self.num_crops)

    @classmethod
    def for_cifar(cls, **overrides: Any) -> MultiCropSettings:
        """Settings for 32 px images (CIFAR-10): 2x32 px + 4x16 px crops, colour strength 0.5, no blur."""
        settings: dict[str, Any] = {
            "size_crops": (32, 16),
            "num_crops": (2, 4),
            "min_scale_crops": (0.25, 0.1),
            "max_scale_crops": (1.0, 0.25),
            "color_strength": 0.5,
            "blur_prob": 0.0,
            "mean": (0.4914, 0.4822, 0.4465),
            "std": (0.2470, 0.2435, 0.2616),
        }
        return cls(**(settings | overrides))

    @classmethod
    def for_small_images(cls, size: int = 64, **overrides: Any) -> MultiCropSettings:
        """Settings for small natural images (64-96 px: Tiny ImageNet, a folder of thumbnails): 2 x ``size`` +
        4 x ``size // 2`` px crops of 25-100% and 10-25% of the image, colour strength 0.5, no blur.

        ImageNet's small crops (5-14% of the image) are a few pixels at this size, and its blur erases them: the
        views share nothing the network can see, and SwAV sits at ``ln(K)`` (a 64 px ImageFolder with the ImageNet
        settings did). The scales are CIFAR-10's, which works at 32 px.

        Example:
            >>> from ignite_swav import MultiCropTransform
            >>> MultiCropTransform.for_small_images(96).size_crops
            (96, 48)
        """
        settings: dict[str, Any] = {
            "size_crops": (size, size // 2),
            "num_crops": (2, 4),
            "min_scale_crops": (0.25, 0.1),
            "max_scale_crops": (1.0, 0.25),
            "color_strength": 0.5,
            "blur_prob": 0.0,
        }
        return cls(**(settings | overrides))

    @classmethod
    def for_mnist(cls, **overrides: Any) -> MultiCropSettings:
        """Settings for 28 px gray digits (MNIST): two 28 px crops of 30-100% of the image, each turned by up to
        15 degrees either way and warped elastically (alpha 34, sigma 4 pixels), no flip, no colour.

        A mirrored digit is another symbol, and saturation and hue do nothing to gray images; brightness and
        contrast jitter stand in for the colour distortion; a digit tilted a little, or drawn with a wavering
        stroke, is the same digit, which a crop alone never shows (docs/main-job.md measures both on MNIST 5k).
        No small crops: measured on the 5,000-image MNIST subset, 2x28 + 2x14 px crops let the loss fall while
        the k-NN accuracy of the features fell too (from 0.79 to 0.60 in 10 epochs: the views matched on
        something other than the digit), where 2x28 px crops alone reached 0.91 in the same 10 epochs, at twice
        the images per second.
        """
        settings: dict[str, Any] = {
            "size_crops": (28,),
            "num_crops": (2,),
            "min_scale_crops": (0.3,),
            "max_scale_crops": (1.0,),
            "color_strength": 0.5,
            "jitter": (0.8, 0.8, 0.0, 0.0),
            "flip_prob": 0.0,
            "blur_prob": 0.0,
            "mean": (0.1307, 0.1307, 0.1307),
            "std": (0.3081, 0.3081, 0.3081),
            "rotation": 15.0,
            "elastic_alpha": 34.0,
            "elastic_sigma": 4.0,
        }
        return cls(**(settings | overrides))

    @classmethod
    def for_digits(cls, **overrides: Any) -> MultiCropSettings:
        """Settings for scikit-learn's 8x8 digits upscaled: 2x32 px + 2x16 px crops of large parts, no blur.

        Digits are small, centred and gray: the two views must stay close enough for a randomly initialised
        network to see that they are the same digit, or SwAV sits at ``ln(K)`` for a long time (large crops
        of 70-100% of the image, small ones of 42-70%, mild jitter); saturation and hue do nothing to gray
        images and cost most of the time; a mirrored digit is another symbol, so there is no flip. Two small
        crops, not four: at these sizes a ResNet's deep layers work on 1x1 and 2x2 maps, so a 16 px crop costs
        almost as much as a 32 px one, and on a CPU budget more steps teach more than more crops per step.
        """
        settings: dict[str, Any] = {
            "size_crops": (32, 16),
            "num_crops": (2, 2),
            "min_scale_crops": (0.7, 0.42),
            "max_scale_crops": (1.0, 0.7),
            "color_strength": 0.25,
            "jitter": (0.8, 0.8, 0.0, 0.0),
            "flip_prob": 0.0,
            "blur_prob": 0.0,
            "mean": (0.3, 0.3, 0.3),
            "std": (0.37, 0.37, 0.37),
        }
        return cls(**(settings | overrides))


class MultiCropAugmentation:
    """What the two multi-crop transforms share: built from a :class:`MultiCropSettings` (or its fields as
    keyword arguments), the same presets, and the settings' fields read through the transform
    (``transform.size_crops``)."""

    def __init__(self, settings: MultiCropSettings | None = None, **fields: Any) -> None:
        if settings is None:
            settings = MultiCropSettings(**fields)
        elif fields:
            raise TypeError(f"give a MultiCropSettings or its fields {sorted(fields)}, not both")
        elif not isinstance(settings, MultiCropSettings):
            raise TypeError(f"settings must be an ignite_swav.MultiCropSettings, got {type(settings).__name__}")
        #: the augmentation's settings (frozen)
        self.settings = settings
        self._build()

    def _build(self) -> None:
        """Each transform builds its pipeline from :attr:`settings` here."""

    def __getattr__(self, name: str) -> Any:
        # the settings' fields and properties, read through the transform: transform.size_crops, .total_crops
        settings = self.__dict__.get("settings")
        if settings is not None and not name.startswith("_") and hasattr(settings, name):
            return getattr(settings, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @classmethod
    def for_cifar(cls: type[_Augmentation], **overrides: Any) -> _Augmentation:
        """Built from :meth:`MultiCropSettings.for_cifar`."""
        return cls(MultiCropSettings.for_cifar(**overrides))

    @classmethod
    def for_small_images(cls: type[_Augmentation], size: int = 64, **overrides: Any) -> _Augmentation:
        """Built from :meth:`MultiCropSettings.for_small_images`."""
        return cls(MultiCropSettings.for_small_images(size, **overrides))

    @classmethod
    def for_mnist(cls: type[_Augmentation], **overrides: Any) -> _Augmentation:
        """Built from :meth:`MultiCropSettings.for_mnist`."""
        return cls(MultiCropSettings.for_mnist(**overrides))

    @classmethod
    def for_digits(cls: type[_Augmentation], **overrides: Any) -> _Augmentation:
        """Built from :meth:`MultiCropSettings.for_digits`."""
        return cls(MultiCropSettings.for_digits(**overrides))

    def __repr__(self) -> str:
        s = self.settings
        return (
            f"{type(self).__name__}(size_crops={s.size_crops}, num_crops={s.num_crops}, "
            f"min_scale_crops={s.min_scale_crops}, max_scale_crops={s.max_scale_crops})"
        )


class MultiCropTransform(MultiCropAugmentation):
    """SwAV's multi-crop augmentation: returns the list of crop tensors of one image, large crops first.

    Each crop: RandomResizedCrop (its size and scale range), horizontal flip, colour distortion (jitter of
    brightness, contrast and saturation ``0.8 * color_strength`` and hue ``0.2 * color_strength`` by default,
    with probability 0.8; grayscale with probability 0.2), Gaussian blur with probability ``blur_prob`` (sigma in
    ``blur_sigma``, kernel about 10% of the crop), a random rotation about the crop's centre when ``rotation`` is
    set, an elastic warp when ``elastic_alpha`` is set, then conversion to float and normalisation. Accepts PIL
    images and ``(C, H, W)`` uint8 tensors; one-channel images are turned into RGB.

    Small images: the crop sizes are output sizes, so 8 px digits upscaled to 32 px crops need nothing more
    than ``size_crops=(32, 16)``; :meth:`for_cifar` and :meth:`for_digits` give the usual settings without
    hand edits (no blur, which destroys 32 px images; smaller crops; data set statistics).

    Args:
        settings: a :class:`MultiCropSettings` (a preset: ``MultiCropSettings.for_cifar()``), or its fields as
            keyword arguments:
        size_crops: output size of each kind of crop.
        num_crops: how many crops of each size.
        min_scale_crops: smallest area fraction of the image each kind of crop covers.
        max_scale_crops: largest area fraction.
        color_strength: scales the colour jitter (1.0 as in SwAV, 0.5 for CIFAR in SimCLR).
        jitter: brightness, contrast, saturation and hue jitter at ``color_strength`` 1 (hue is capped at 0.5).
        flip_prob: probability of the horizontal flip (0 for images whose mirror means something else).
        blur_prob: probability of the Gaussian blur (0 disables it).
        blur_sigma: range of the blur's standard deviation.
        mean: per-channel mean for normalisation.
        std: per-channel standard deviation for normalisation.
        rotation: largest angle of the rotation, in degrees: each crop is turned by an angle drawn uniformly in
            ``[-rotation, rotation]``, bilinearly, the corners it uncovers black (0, the default, disables it;
            :meth:`for_mnist` turns digits by up to 15 degrees, as a tilted digit is the same digit).
        elastic_alpha: strength of an elastic warp after the rotation (torchvision's ``ElasticTransform``): each
            pixel moves by a random displacement, uniform noise blurred by a Gaussian of ``elastic_sigma`` pixels
            and scaled by ``elastic_alpha``, so that nearby pixels move together, as a pen's stroke wavers (0, the
            default, disables it).
        elastic_sigma: smoothness of the warp, in pixels (less than a quarter of the smallest crop).

    Example:
        >>> import torch
        >>> from ignite_swav import MultiCropTransform
        >>> transform = MultiCropTransform(size_crops=(32, 16), num_crops=(2, 4))
        >>> crops = transform(torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8))
        >>> [tuple(c.shape) for c in crops][1:3]
        [(3, 32, 32), (3, 16, 16)]
    """

    def _build(self) -> None:
        s = self.settings
        brightness, contrast, saturation, hue = s.jitter_strengths
        self.crop_transforms: list[v2.Compose] = []
        for size, n, low, high in zip(s.size_crops, s.num_crops, s.min_scale_crops, s.max_scale_crops):
            steps: list[Any] = [
                v2.ToImage(),
                v2.RGB(),  # grayscale images (digits, MNIST) become 3-channel
                v2.RandomResizedCrop(size, scale=(low, high), antialias=True),
                v2.RandomHorizontalFlip(p=s.flip_prob),
                v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=0.8),
                v2.RandomGrayscale(p=0.2),
            ]
            if s.blur_prob > 0:
                kernel = blur_kernel_size(size)
                steps.append(v2.RandomApply([v2.GaussianBlur(kernel, s.blur_sigma)], p=s.blur_prob))
            if s.rotation > 0:
                steps.append(v2.RandomRotation(s.rotation, interpolation=v2.InterpolationMode.BILINEAR, fill=0))
            if s.elastic_alpha > 0:
                steps.append(
                    v2.ElasticTransform(
                        s.elastic_alpha, s.elastic_sigma, interpolation=v2.InterpolationMode.BILINEAR, fill=0
                    )
                )
            steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(s.mean), list(s.std))]
            self.crop_transforms += [v2.Compose(steps)] * n

    def __call__(self, image: Any) -> list[Tensor]:
        """The crops of ``image`` (PIL image or ``(C, H, W)`` tensor), large crops first."""
        return [transform(image) for transform in self.crop_transforms]


def collate_crops(batch: Sequence[Any]) -> list[Tensor] | tuple[list[Tensor], Tensor]:
    """Collate samples of :class:`MultiCropTransform` crops into one ``(B, C, H, W)`` batch per crop.

    Each sample is either the list of crops of one image, or a ``(crops, target)`` pair (a torchvision data
    set with the transform); pairs give ``(crops, targets)``.

    Example:
        >>> import torch
        >>> from ignite_swav import collate_crops
        >>> samples = [([torch.zeros(3, 8, 8), torch.zeros(3, 4, 4)], 1) for _ in range(5)]
        >>> crops, targets = collate_crops(samples)
        >>> crops[1].shape, targets.tolist()
        (torch.Size([5, 3, 4, 4]), [1, 1, 1, 1, 1])
    """
    if len(batch) == 0:
        raise ValueError("collate_crops got an empty batch")
    first = batch[0]
    with_targets = isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], (list, tuple))
    samples = [sample[0] for sample in batch] if with_targets else list(batch)
    num_crops = len(samples[0])
    for i, crops in enumerate(samples):
        if len(crops) != num_crops:
            raise ValueError(
                f"sample {i} has {len(crops)} crops, sample 0 has {num_crops}: every sample needs the same"
            )
    # the checks above name the sample at fault; the stacking itself is torch's
    if with_targets:
        crops, targets = default_collate(list(batch))
        return crops, targets
    return default_collate(samples)
