"""SwAV multi-crop augmentation of a whole batch at once, on the device where the batch lives.

The per-image pipeline (:class:`~ignite_swav.MultiCropTransform`) runs in DataLoader workers and is what bounds
SwAV's speed on a GPU; here every random parameter is still drawn per sample, but each step is one vectorised
operation over the batch: ``roi_align`` for the random resized crops, one per-sample 3x3 colour matrix for the
whole colour distortion, one grouped convolution pair for the blur.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import roi_align

from ignite_swav.transforms import MultiCropAugmentation, MultiCropSettings, blur_kernel_size, elastic_kernel_size

__all__ = ["BatchedMultiCrop", "collate_images"]

# ITU-R 601 luma, as torchvision's rgb_to_grayscale
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
_CROP_TRIES = 10  # torchvision's RandomResizedCrop draws at most 10 candidates before its fallback


def _image_batch(images: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """A float ``(B, C, H, W)`` batch of 0-255 values (images of several sizes padded at the bottom right),
    and each image's height and width."""
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
            raise ValueError(
                f"images must be a (B, C, H, W) batch with C 1 or 3 and B >= 1, got shape {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 (0-255), got {images.dtype}")
        batch = images.float()
        count, height, width = images.shape[0], images.shape[2], images.shape[3]
        heights = torch.full((count,), float(height), device=images.device)
        return batch, heights, torch.full((count,), float(width), device=images.device)
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence) or len(images) == 0:
        raise TypeError(
            f"images must be a uint8 (B, C, H, W) tensor or a non-empty list of (C, H, W) ones, got {images!r}"
        )
    for i, image in enumerate(images):
        if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(f"images[{i}] must be a (C, H, W) tensor with C 1 or 3, got {shape}")
        if image.dtype != torch.uint8:
            raise TypeError(f"images[{i}] must be uint8 (0-255), got {image.dtype}")
    channels = max(image.shape[0] for image in images)
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = torch.zeros(len(images), channels, height, width, device=images[0].device)
    for i, image in enumerate(images):
        # the padding repeats the last row and column: roi_align interpolates up to one pixel past a box's edge
        height_i, width_i = image.shape[1], image.shape[2]
        batch[i, :, :height_i, :width_i] = image
        batch[i, :, height_i:, :width_i] = image[:, -1:, :]
        batch[i, :, :, width_i:] = batch[i, :, :, width_i - 1 : width_i]
    heights = torch.tensor([float(image.shape[1]) for image in images], device=batch.device)
    widths = torch.tensor([float(image.shape[2]) for image in images], device=batch.device)
    return batch, heights, widths


def _uniform(count: int, low: float, high: float, device: torch.device) -> Tensor:
    return torch.rand(count, device=device) * (high - low) + low


def _gaussian_kernels(sigma: Tensor, half: int, dtype: torch.dtype) -> Tensor:
    """One normalised Gaussian of taps ``-half..half`` per entry of ``sigma``: ``(len(sigma), 2 * half + 1)``."""
    taps = torch.arange(-half, half + 1, device=sigma.device, dtype=dtype)
    kernels = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
    return kernels / kernels.sum(dim=1, keepdim=True)


def _separable_blur(x: Tensor, kernels: Tensor) -> Tensor:
    """Each channel of ``x`` ``(N, C, H, W)`` blurred along its rows, then its columns, by its row of ``kernels``
    ``(C, K)``, with reflect padding (the blur and the elastic warp's displacements)."""
    pad, groups = kernels.shape[1] // 2, x.shape[1]
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode="reflect"), kernels[:, None, None, :], groups=groups)
    return F.conv2d(F.pad(x, (0, 0, pad, pad), mode="reflect"), kernels[:, None, :, None], groups=groups)


def random_resized_boxes(heights: Tensor, widths: Tensor, scale: tuple[float, float]) -> Tensor:
    """Boxes ``(x1, y1, x2, y2)`` of random resized crops, one per image, drawn as torchvision's
    ``RandomResizedCrop`` draws them: area fraction uniform in ``scale``, log aspect ratio uniform in
    ``[log 3/4, log 4/3]``, the first of 10 candidates that fits, else the whole image at a clamped ratio.

    Example:
        >>> import torch
        >>> boxes = random_resized_boxes(torch.tensor([32.0, 8.0]), torch.tensor([32.0, 8.0]), (0.5, 1.0))
        >>> bool((boxes[:, 2] <= torch.tensor([32.0, 8.0])).all())
        True
    """
    count, device = heights.shape[0], heights.device
    area = (heights * widths)[:, None]
    target = area * (torch.rand(count, _CROP_TRIES, device=device) * (scale[1] - scale[0]) + scale[0])
    ratio = torch.exp(torch.rand(count, _CROP_TRIES, device=device) * (_LOG_RATIO[1] - _LOG_RATIO[0]) + _LOG_RATIO[0])
    crop_w, crop_h = torch.sqrt(target * ratio).round(), torch.sqrt(target / ratio).round()
    fits = (crop_w > 0) & (crop_w <= widths[:, None]) & (crop_h > 0) & (crop_h <= heights[:, None])
    first = fits.int().argmax(dim=1, keepdim=True)
    found = fits.any(dim=1)
    crop_w, crop_h = crop_w.gather(1, first).squeeze(1), crop_h.gather(1, first).squeeze(1)

    image_ratio = widths / heights
    low_ratio, high_ratio = math.exp(_LOG_RATIO[0]), math.exp(_LOG_RATIO[1])
    fallback_w = torch.where(image_ratio > high_ratio, (heights * high_ratio).round(), widths)
    fallback_h = torch.where(image_ratio < low_ratio, (widths / low_ratio).round(), heights)
    crop_w, crop_h = torch.where(found, crop_w, fallback_w), torch.where(found, crop_h, fallback_h)

    top = torch.where(
        found, torch.floor(torch.rand(count, device=device) * (heights - crop_h + 1)), ((heights - crop_h) / 2).floor()
    )
    left = torch.where(
        found, torch.floor(torch.rand(count, device=device) * (widths - crop_w + 1)), ((widths - crop_w) / 2).floor()
    )
    return torch.stack([left, top, left + crop_w, top + crop_h], dim=1)


class BatchedMultiCrop(MultiCropAugmentation):
    """SwAV's multi-crop augmentation of a whole uint8 batch on its own device (CUDA or CPU), vectorised.

    Same settings and presets as :class:`~ignite_swav.MultiCropTransform` (``BatchedMultiCrop.for_cifar()``,
    ``BatchedMultiCrop.from_transform(transform)``), and the same steps with their parameters drawn per
    sample: random resized crop (area and log-ratio as torchvision draws them; ``roi_align`` averages
    ``ceil(box / size)`` bilinear samples per output pixel, so a large box is antialiased), horizontal flip,
    colour jitter with probability 0.8 in a random order per sample, grayscale with probability 0.2, Gaussian
    blur with a per-sample sigma (reflect padding), a rotation by a per-sample angle when ``rotation`` is set and
    an elastic warp by per-sample displacements when ``elastic_alpha`` is set (both in one ``grid_sample``, black
    corners), normalisation. The output is what :class:`~ignite_swav.SwAVModel` takes: one float
    ``(B, 3, size, size)`` batch per crop, large crops first.

    Each colour step is one per-sample 3x3 map over the pixels, clamped to [0, 1] as torchvision clamps. One
    difference: the hue shift is a rotation of the chroma plane in YIQ space rather than a shift in HSV (same
    direction and angle; it keeps luma where HSV keeps the largest channel), because it is linear.
    ``tests/test_batched_transforms.py`` compares the two pipelines' statistics.

    Random numbers come from the device's default generator (``torch.manual_seed`` seeds it).

    Its arguments (``size_crops``, ``num_crops``, ``min_scale_crops``, ``max_scale_crops``, ``color_strength``,
    ``jitter``, ``flip_prob``, ``blur_prob``, ``blur_sigma``, ``mean``, ``std``, ``rotation``, ``elastic_alpha``,
    ``elastic_sigma``) are those of :class:`~ignite_swav.MultiCropTransform`.

    Example:
        >>> import torch
        >>> from ignite_swav import BatchedMultiCrop
        >>> augment = BatchedMultiCrop.for_cifar()
        >>> crops = augment(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
        >>> [tuple(c.shape) for c in crops][1:3]
        [(8, 3, 32, 32), (8, 3, 16, 16)]
    """

    @classmethod
    def from_transform(cls, transform: MultiCropAugmentation | MultiCropSettings) -> BatchedMultiCrop:
        """The batched version of ``transform`` (a :class:`~ignite_swav.MultiCropTransform`, or its
        :class:`~ignite_swav.MultiCropSettings`), same settings."""
        if isinstance(transform, MultiCropAugmentation):
            return cls(transform.settings)
        if isinstance(transform, MultiCropSettings):
            return cls(transform)
        raise TypeError(f"transform must be a MultiCropTransform or MultiCropSettings, got {type(transform).__name__}")

    def __call__(self, images: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """The crop batches of ``images``: a uint8 ``(B, C, H, W)`` tensor, or a list of uint8 ``(C, H, W)``
        tensors of any sizes (decoded images); ``C`` is 1 (gray, made RGB) or 3."""
        with torch.no_grad():
            batch, heights, widths = _image_batch(images)
            count = batch.shape[0]
            mean = torch.tensor(self.settings.mean, device=batch.device).view(1, 3, 1, 1)
            std = torch.tensor(self.settings.std, device=batch.device).view(1, 3, 1, 1)
            crops: list[Tensor] = []
            for size, repeats, low, high in zip(
                self.settings.size_crops,
                self.settings.num_crops,
                self.settings.min_scale_crops,
                self.settings.max_scale_crops,
            ):
                if repeats == 0:
                    continue
                # all crops of one size in one call: rows [k*B, (k+1)*B) are the k-th crop of every image
                owner = torch.arange(count, device=batch.device).repeat(repeats)
                boxes = random_resized_boxes(heights[owner], widths[owner], (low, high))
                rois = torch.cat([owner[:, None].to(boxes.dtype), boxes], dim=1)
                views = roi_align(batch, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
                views = self._colour(self._flip(views))
                views = self._warp(self._blur(views, size))
                crops.extend(views.sub_(mean).div_(std).chunk(repeats))
            return crops

    def _flip(self, views: Tensor) -> Tensor:
        if self.settings.flip_prob == 0:
            return views
        flip = torch.rand(views.shape[0], device=views.device) < self.settings.flip_prob
        return torch.where(flip[:, None, None, None], views.flip(-1), views)

    def _colour(self, views: Tensor) -> Tensor:
        """Colour jitter (each step one per-sample 3x3 map, clamped as torchvision clamps) and grayscale, on
        0-255 values; output in [0, 1]."""
        count, device = views.shape[0], views.device
        views = views.expand(-1, 3, -1, -1) / 255.0 if views.shape[1] == 1 else views / 255.0
        gray = torch.tensor(_GRAY_WEIGHTS, device=device)
        if max(self.settings.jitter_strengths) > 0:
            eye = torch.eye(3, device=device).expand(count, 3, 3)
            to_gray = torch.ones(3, 1, device=device) * gray  # every channel becomes the luma
            brightness, contrast, saturation, hue = self.settings.jitter_strengths
            jitter = torch.rand(count, device=device) < 0.8
            factors = [
                torch.where(jitter, _uniform(count, max(0.0, 1 - s), 1 + s, device), 1.0)
                if s > 0
                else torch.ones(count, device=device)
                for s in (brightness, contrast, saturation)
            ]
            angle = torch.where(jitter, _uniform(count, -hue, hue, device) * 2 * math.pi, 0.0)
            linear_maps = torch.stack(
                [
                    factors[0][:, None, None] * eye,
                    factors[1][:, None, None] * eye,
                    factors[2][:, None, None] * eye + (1 - factors[2])[:, None, None] * to_gray,
                    self._hue_matrix(-angle),  # minus: the direction of torchvision's hue shift
                ],
                dim=1,
            )
            order = torch.argsort(torch.rand(count, 4, device=device), dim=1)  # torchvision's random order
            rows = torch.arange(count, device=device)
            for step in range(4):
                operation = order[:, step]
                # contrast blends with the mean luma of the image as it is at this step
                contrast_shift = (1 - factors[1]) * (views.mean(dim=(2, 3)) @ gray)
                shift = torch.where(operation == 1, contrast_shift, 0.0)
                linear = linear_maps[rows, operation]
                views = torch.einsum("nij,njhw->nihw", linear, views).add_(shift[:, None, None, None]).clamp_(0, 1)
        chosen = (torch.rand(count, device=device) < 0.2).nonzero().squeeze(1)
        if chosen.numel() > 0:
            luma = torch.einsum("c,nchw->nhw", gray, views[chosen])
            views[chosen] = luma[:, None].expand(-1, 3, -1, -1)
        return views

    @staticmethod
    def _hue_matrix(angle: Tensor) -> Tensor:
        rgb_to_yiq = torch.tensor(_RGB_TO_YIQ, device=angle.device)
        rotation = torch.zeros(angle.shape[0], 3, 3, device=angle.device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotation[:, 0, 0] = 1
        rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
        return torch.linalg.inv(rgb_to_yiq) @ rotation @ rgb_to_yiq

    def _warp(self, views: Tensor) -> Tensor:
        # the rotation and the elastic displacements in one resampling (the per-image pipeline does two)
        s = self.settings
        if s.rotation == 0 and s.elastic_alpha == 0:
            return views
        count, _, height, width = views.shape
        if s.rotation > 0:
            angle = torch.deg2rad(_uniform(count, -s.rotation, s.rotation, views.device))
            cos, sin, zero = torch.cos(angle), torch.sin(angle), torch.zeros_like(angle)
            turn = torch.stack([torch.stack([cos, -sin, zero], dim=1), torch.stack([sin, cos, zero], dim=1)], dim=1)
        else:
            turn = torch.eye(2, 3, device=views.device).expand(count, 2, 3)
        grid = F.affine_grid(turn, list(views.shape), align_corners=False)
        if s.elastic_alpha > 0:
            grid = grid + self._displacements(count, height, width, views.device)
        return F.grid_sample(views, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # black corners

    def _displacements(self, count: int, height: int, width: int, device: torch.device) -> Tensor:
        # torchvision's ElasticTransform per crop: uniform noise in [-1, 1] for x and y, blurred (reflect padding),
        # times alpha / size in grid units
        s = self.settings
        sigma = torch.full((1,), s.elastic_sigma, device=device)  # made on the device: no copy from the host
        kernel = _gaussian_kernels(sigma, elastic_kernel_size(s.elastic_sigma) // 2, torch.float32)
        noise = _separable_blur(torch.rand(count * 2, 1, height, width, device=device) * 2 - 1, kernel)
        noise = noise.view(count, 2, height, width)
        noise[:, 0].mul_(s.elastic_alpha / width)
        noise[:, 1].mul_(s.elastic_alpha / height)
        return noise.permute(0, 2, 3, 1)

    def _blur(self, views: Tensor, size: int) -> Tensor:
        if self.settings.blur_prob == 0:
            return views
        count, device = views.shape[0], views.device
        chosen = (torch.rand(count, device=device) < self.settings.blur_prob).nonzero().squeeze(1)
        if chosen.numel() == 0:
            return views
        low, high = self.settings.blur_sigma
        sigma = _uniform(chosen.numel(), low, high, device)
        # reflect padding needs pad < size; tiny crops lose the kernel's outer taps
        pad = min(blur_kernel_size(size) // 2, size - 1)
        kernels = _gaussian_kernels(sigma, pad, views.dtype).repeat_interleave(3, dim=0)  # one per channel
        selected = _separable_blur(views[chosen].reshape(1, chosen.numel() * 3, size, size), kernels)
        views[chosen] = selected.reshape(chosen.numel(), 3, size, size)
        return views


def collate_images(batch: Sequence[Any]) -> Tensor | list[Tensor] | tuple[Tensor | list[Tensor], Tensor]:
    """Collate uint8 images for :class:`BatchedMultiCrop`: one ``(B, C, H, W)`` tensor when all images have the
    same shape, else the list of images (``BatchedMultiCrop`` pads them); ``(image, target)`` samples give
    ``(images, targets)``. The bytes of encoded files (1-D tensors, from ``torchvision.io.read_file``) stay a list,
    for :func:`~ignite_swav.prepare_image_batch` to decode on the device.

    Example:
        >>> import torch
        >>> from ignite_swav import collate_images
        >>> images, targets = collate_images([(torch.zeros(3, 8, 8, dtype=torch.uint8), 1)] * 4)
        >>> tuple(images.shape), targets.tolist()
        ((4, 3, 8, 8), [1, 1, 1, 1])
    """
    if len(batch) == 0:
        raise ValueError("collate_images got an empty batch")
    with_targets = isinstance(batch[0], (tuple, list))
    images = [sample[0] for sample in batch] if with_targets else list(batch)
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise TypeError(
                f"sample {i} is a {type(image).__name__}, not an image tensor: give the data set a transform that "
                "returns uint8 (C, H, W) tensors, such as torchvision.transforms.v2.PILToTensor()"
            )
    # encoded files' bytes (1-D) are never stacked: prepare_image_batch decodes them on the device
    same_shape = images[0].ndim > 1 and all(image.shape == images[0].shape for image in images)
    stacked: Tensor | list[Tensor] = torch.stack(images) if same_shape else images
    if with_targets:
        return stacked, torch.as_tensor([sample[1] for sample in batch])
    return stacked
