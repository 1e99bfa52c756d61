"""Decoding a batch of encoded images on the training device: the workers only read file bytes, and a GPU
decodes the whole batch (JPEG with nvJPEG), where PIL in the workers would bound the data path."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

__all__ = ["decode_images"]

_JPEG_MAGIC = (0xFF, 0xD8)


def is_encoded_batch(images: object) -> bool:
    """Whether ``images`` is a non-empty list of 1-D uint8 tensors: the bytes of encoded image files, as
    ``torchvision.io.read_file`` reads them and :func:`~ignite_swav.collate_images` collates them."""
    return (
        isinstance(images, (list, tuple))
        and len(images) > 0
        and all(isinstance(i, Tensor) and i.ndim == 1 and i.dtype == torch.uint8 for i in images)
    )


def decode_images(encoded: Sequence[Tensor], device: str | torch.device | None = None) -> list[Tensor]:
    """Decode a batch of encoded images into uint8 ``(3, H, W)`` tensors on ``device`` (RGB; gray images made RGB).

    JPEGs are decoded together by ``torchvision.io.decode_jpeg`` on ``device``: on a CUDA device, by nvJPEG on the
    GPU; on the CPU, by libjpeg. Other formats (PNG, ...) are decoded on the CPU, then moved. The input is the
    files' bytes (1-D uint8 tensors, on the CPU), e.g. from an ``ImageFolder`` whose ``loader`` reads a file's
    bytes into a tensor. (torchvision 0.29 deprecates its decoders in favour of TorchCodec; they work as before,
    and their deprecation warning is not repeated here at every batch.)

    Raises:
        ValueError: an entry is not the bytes of an image, or cannot be decoded (the message names it).

    Example:
        >>> import io
        >>> import torch
        >>> from PIL import Image
        >>> from ignite_swav import decode_images
        >>> buffer = io.BytesIO()
        >>> Image.new("RGB", (40, 30), (200, 10, 10)).save(buffer, format="JPEG")
        >>> encoded = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        >>> [tuple(image.shape) for image in decode_images([encoded, encoded])]
        [(3, 30, 40), (3, 30, 40)]
    """
    if isinstance(encoded, Tensor) or not isinstance(encoded, Sequence) or len(encoded) == 0:
        raise ValueError(
            f"encoded must be a non-empty list of 1-D uint8 tensors (file bytes), got {type(encoded).__name__}"
        )
    for index, data in enumerate(encoded):
        if not isinstance(data, Tensor) or data.ndim != 1 or data.dtype != torch.uint8 or data.numel() < 2:
            shape = f"{tuple(data.shape)} {data.dtype}" if isinstance(data, Tensor) else type(data).__name__
            raise ValueError(f"encoded[{index}] must be the bytes of an image file (a 1-D uint8 tensor), got {shape}")
    target = torch.device(device) if device is not None else torch.device("cpu")
    cpu_bytes = [data.cpu() for data in encoded]  # decode_jpeg reads the bytes from the host, whatever the device
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
        return _decode(cpu_bytes, target)


def _decode(cpu_bytes: list[Tensor], target: torch.device) -> list[Tensor]:
    jpeg = [i for i, data in enumerate(cpu_bytes) if tuple(data[:2].tolist()) == _JPEG_MAGIC]
    decoded: list[Tensor | None] = [None] * len(cpu_bytes)
    if jpeg:
        try:
            images = decode_jpeg([cpu_bytes[i] for i in jpeg], mode=ImageReadMode.RGB, device=target)
        except RuntimeError as error:
            bad = _first_undecodable([cpu_bytes[i] for i in jpeg])
            where = f"encoded[{jpeg[bad]}]" if bad is not None else "a JPEG of the batch"
            raise ValueError(f"{where} cannot be decoded ({str(error).splitlines()[0][:160]})") from None
        for i, image in zip(jpeg, images):
            decoded[i] = image
    for i, data in enumerate(cpu_bytes):
        if decoded[i] is None:
            try:
                decoded[i] = decode_image(data, mode=ImageReadMode.RGB).to(target)
            except RuntimeError as error:
                raise ValueError(f"encoded[{i}] cannot be decoded ({str(error).splitlines()[0][:160]})") from None
    return [image for image in decoded if image is not None]


def _first_undecodable(jpegs: list[Tensor]) -> int | None:
    # on the CPU, one by one: which file of a refused batch is damaged (an error path only)
    for index, data in enumerate(jpegs):
        try:
            decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            return index
    return None
