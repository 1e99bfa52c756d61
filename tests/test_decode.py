"""decode_images and the encoded-bytes path of prepare_image_batch: what the workers read, decoded on the device."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ignite_swav import BatchedMultiCrop, collate_images, decode_images, prepare_image_batch


def encoded(image: Image.Image, fmt: str = "JPEG") -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def photo(height: int = 375, width: int = 500, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = np.kron(rng.integers(0, 256, (height // 25 + 1, width // 25 + 1, 3)), np.ones((25, 25, 1)))
    return Image.fromarray(smooth[:height, :width].astype(np.uint8))


def test_jpegs_decode_as_pil_decodes_them_and_pngs_exactly():
    images = [photo(seed=0), photo(375, 500, seed=1), photo(333, 500, seed=2)]
    data = [encoded(image) for image in images]
    decoded = decode_images(data)
    for tensor, raw in zip(decoded, data):
        pil = Image.open(io.BytesIO(raw.numpy().tobytes())).convert("RGB")
        pil = torch.from_numpy(np.array(pil)).permute(2, 0, 1)
        assert tensor.shape == pil.shape and tensor.dtype == torch.uint8
        assert (tensor.float() - pil.float()).abs().mean() < 2.0  # libjpeg's IDCT against PIL's: rounding only
    png = decode_images([encoded(images[0], "PNG")])[0]
    assert torch.equal(png, torch.from_numpy(np.asarray(images[0])).permute(2, 0, 1))


def test_gray_and_mixed_formats_come_out_rgb_in_order():
    gray = Image.fromarray(np.full((20, 30), 128, dtype=np.uint8))
    decoded = decode_images([encoded(gray), encoded(photo(40, 50), "PNG"), encoded(gray, "PNG")])
    assert [tuple(d.shape) for d in decoded] == [(3, 20, 30), (3, 40, 50), (3, 20, 30)]


def test_the_encoded_path_of_prepare_image_batch_feeds_batched_multicrop():
    samples = [(encoded(photo(375, 500, seed=i)), i % 2) for i in range(4)]
    images, labels = collate_images(samples)
    assert isinstance(images, list) and all(i.ndim == 1 for i in images)  # bytes are never stacked
    x, y = prepare_image_batch((images, labels), device="cpu")
    assert [tuple(i.shape) for i in x] == [(3, 375, 500)] * 4 and y.tolist() == [0, 1, 0, 1]
    crops = BatchedMultiCrop()(x)
    assert [tuple(c.shape) for c in crops] == [(4, 3, 224, 224)] * 2 + [(4, 3, 96, 96)] * 6


def test_bytes_that_are_not_an_image_are_named():
    good = encoded(photo(40, 50))
    with pytest.raises(ValueError, match=r"encoded\[1\] cannot be decoded"):
        decode_images([good, torch.tensor([0xFF, 0xD8, 1, 2, 3], dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"encoded\[0\] cannot be decoded"):
        decode_images([torch.tensor([1, 2, 3, 4], dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"encoded\[1\] must be the bytes of an image file.*\(2, 2\)"):
        decode_images([good, torch.zeros(2, 2, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="non-empty list of 1-D uint8 tensors"):
        decode_images([])
