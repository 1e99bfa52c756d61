import dataclasses
import math

import pytest
import torch
from torch.nn import functional as F
from torchvision.transforms import v2

from ignite_swav import BatchedMultiCrop, MultiCropSettings, MultiCropTransform, collate_images
from ignite_swav.batched_transforms import random_resized_boxes

PLAIN = {"color_strength": 0.0, "flip_prob": 0.0, "blur_prob": 0.0, "mean": (0, 0, 0), "std": (1, 1, 1)}


def one_size(size: int, count: int, min_scale: float = 0.14, **settings) -> BatchedMultiCrop:
    """Crops of one size only."""
    return BatchedMultiCrop(
        size_crops=(size,), num_crops=(count,), min_scale_crops=(min_scale,), max_scale_crops=(1.0,), **settings
    )


def smooth_images(count: int, height: int, width: int) -> torch.Tensor:
    """Colourful images with structure: random 4x4 colour fields upscaled."""
    base = torch.rand(count, 3, 4, 4)
    return (F.interpolate(base, size=(height, width), mode="bilinear") * 255).round().to(torch.uint8)


def test_crop_batches_in_the_order_and_shapes_the_model_takes():
    augment = BatchedMultiCrop(size_crops=(32, 16), num_crops=(2, 3))
    crops = augment(torch.randint(0, 256, (5, 3, 40, 48), dtype=torch.uint8))
    assert [tuple(c.shape) for c in crops] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 and c.is_contiguous() for c in crops)
    assert augment.total_crops == 5


def test_gray_images_and_images_of_several_sizes():
    augment = BatchedMultiCrop.for_digits()
    crops = augment(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    images = [torch.randint(0, 256, shape, dtype=torch.uint8) for shape in [(3, 30, 50), (1, 64, 20), (3, 8, 8)]]
    crops = one_size(24, 2)(images)
    assert [tuple(c.shape) for c in crops] == [(3, 3, 24, 24)] * 2


def test_padded_images_are_cropped_inside_their_own_area():
    # a white 8x8 image next to a black 64x64 one: the padding (zeros) must never show in its crops
    images = [torch.full((3, 8, 8), 255, dtype=torch.uint8), torch.zeros(3, 64, 64, dtype=torch.uint8)]
    crops = one_size(16, 4, min_scale=0.05, **PLAIN)(images)
    for crop in crops:
        assert torch.allclose(crop[0], torch.ones_like(crop[0]), atol=1e-3)  # gray weights sum to 0.9999
        assert torch.equal(crop[1], torch.zeros_like(crop[1]))


def test_same_settings_as_the_per_image_transform():
    transform = MultiCropTransform.for_cifar(flip_prob=0.3)
    augment = BatchedMultiCrop.from_transform(transform)
    assert augment.settings == transform.settings == MultiCropSettings.for_cifar(flip_prob=0.3)
    assert BatchedMultiCrop.for_cifar(flip_prob=0.3).settings == transform.settings
    assert BatchedMultiCrop.from_transform(transform.settings).settings is transform.settings
    assert augment.size_crops == (32, 16) and augment.total_crops == 6  # the settings read through the transform


def test_the_settings_are_one_frozen_value_given_to_either_transform():
    settings = MultiCropSettings(
        size_crops=[32, 16], num_crops=[2, 4], min_scale_crops=[0.3, 0.1], max_scale_crops=[1, 0.3]
    )
    assert settings.size_crops == (32, 16) and settings.max_scale_crops == (1.0, 0.3)  # tuples and floats
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.flip_prob = 0.0
    assert MultiCropTransform(settings).settings is settings and BatchedMultiCrop(settings).settings is settings
    assert (
        MultiCropTransform(
            size_crops=(32, 16), num_crops=(2, 4), min_scale_crops=(0.3, 0.1), max_scale_crops=(1.0, 0.3)
        ).settings
        == settings
    )  # the fields as keywords, as in 0.2
    with pytest.raises(TypeError, match=r"give a MultiCropSettings or its fields \['flip_prob'\], not both"):
        MultiCropTransform(settings, flip_prob=0.0)
    with pytest.raises(TypeError, match="settings must be an ignite_swav.MultiCropSettings, got dict"):
        BatchedMultiCrop({"size_crops": (32,)})
    with pytest.raises(TypeError, match="transform must be a MultiCropTransform or MultiCropSettings, got str"):
        BatchedMultiCrop.from_transform("cifar")
    with pytest.raises(AttributeError, match="MultiCropTransform has no attribute 'size_crop'"):
        getattr(MultiCropTransform(settings), "size_crop")  # noqa: B009 - the attribute read is the test


def test_without_distortion_a_whole_image_crop_is_the_image_or_its_grayscale():
    torch.manual_seed(0)
    images = smooth_images(1, 32, 32)
    image = images[0].float() / 255
    gray = (torch.tensor([0.2989, 0.587, 0.114]).view(3, 1, 1) * image).sum(dim=0, keepdim=True).expand(3, -1, -1)
    crops = one_size(32, 2, min_scale=1.0, **PLAIN)(images.expand(200, -1, -1, -1).contiguous())
    crops = torch.cat(crops)
    same = torch.isclose(crops, image, atol=1e-5).flatten(1).all(dim=1)
    grayed = torch.isclose(crops, gray, atol=1e-5).flatten(1).all(dim=1)
    assert bool((same | grayed).all())
    assert _rate(grayed) == pytest.approx(0.2, abs=0.06)  # grayscale stays on with probability 0.2, as torchvision


def test_crop_scales_and_ratios_are_distributed_as_torchvision_draws_them():
    torch.manual_seed(0)
    count, scale = 4000, (0.14, 1.0)
    boxes = random_resized_boxes(torch.full((count,), 60.0), torch.full((count,), 90.0), scale)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ours_area, ours_ratio = (width * height / (60 * 90)), torch.log(width / height)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 90).all() and (boxes[:, 3] <= 60).all()
    reference = [
        v2.RandomResizedCrop.get_params(torch.zeros(3, 60, 90), list(scale), [3 / 4, 4 / 3]) for _ in range(count)
    ]
    ref_area = torch.tensor([h * w / (60 * 90) for _, _, h, w in reference])
    ref_ratio = torch.tensor([math.log(w / h) for _, _, h, w in reference])
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    # 4000 draws: quantiles agree within 0.03 (area fraction) and 0.03 (log ratio, range +-0.29)
    assert torch.allclose(ours_area.quantile(quantiles), ref_area.quantile(quantiles), atol=0.03)
    assert torch.allclose(ours_ratio.quantile(quantiles), ref_ratio.quantile(quantiles), atol=0.03)


def test_crops_that_cannot_fit_fall_back_to_the_centre_as_torchvision():
    # a 1000x10 strip: no crop of ratio 3/4-4/3 with area >= 90% fits, so the whole height at ratio 4/3
    boxes = random_resized_boxes(torch.tensor([10.0]), torch.tensor([1000.0]), (0.9, 1.0))
    assert boxes.tolist() == [[493.0, 0.0, 506.0, 10.0]]
    top, left, height, width = v2.RandomResizedCrop.get_params(torch.zeros(1, 10, 1000), [0.9, 1.0], [3 / 4, 4 / 3])
    assert [left, top, left + width, top + height] == [493, 0, 506, 10]


def _rate(flags: torch.Tensor) -> float:
    return flags.float().mean().item()


def test_flip_jitter_grayscale_and_blur_rates():
    torch.manual_seed(0)
    count = 4000  # binomial standard error at p = 0.5 is 0.008; tolerance 0.03 is about 4 of them
    ramp = torch.linspace(0, 255, 32).round().to(torch.uint8).view(1, 1, 1, 32).expand(count, 3, 32, 32)
    flipped = one_size(32, 2, min_scale=1.0, **(PLAIN | {"flip_prob": 0.3}))
    crop = flipped(ramp)[0]
    assert _rate(crop[:, 0, 0, 0] > crop[:, 0, 0, -1]) == pytest.approx(0.3, abs=0.03)

    colour = torch.tensor([200, 60, 30], dtype=torch.uint8).view(1, 3, 1, 1).expand(count, 3, 16, 16)
    settings = PLAIN | {"color_strength": 1.0, "jitter": (0.5, 0.0, 0.0, 0.0)}
    crop = one_size(16, 2, **settings)(colour)[0]
    gray = (crop[:, 0] == crop[:, 1]).all(dim=(1, 2)) & (crop[:, 1] == crop[:, 2]).all(dim=(1, 2))
    unchanged = (crop[:, 1, 0, 0] - 60 / 255).abs() < 1e-4
    assert _rate(gray) == pytest.approx(0.2, abs=0.03)
    assert _rate(~unchanged & ~gray) == pytest.approx(0.8 * 0.8, abs=0.03)  # jittered and not grayed

    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 255).to(torch.uint8)
    checker = checker.expand(count, 3, 16, 16)
    settings = PLAIN | {"blur_prob": 0.4, "blur_sigma": (1.0, 2.0)}
    crop = one_size(16, 2, min_scale=1.0, **settings)(checker)[0]
    assert _rate(crop.amax(dim=(1, 2, 3)) < 0.9) == pytest.approx(0.4, abs=0.03)


@pytest.mark.parametrize("preset", ["cifar", "imagenet"])
def test_output_statistics_match_the_per_image_pipeline(preset):
    torch.manual_seed(0)
    if preset == "cifar":
        transform, images = MultiCropTransform.for_cifar(num_crops=(2, 2)), smooth_images(300, 32, 32)
    else:
        transform = MultiCropTransform(
            size_crops=(32, 16),
            num_crops=(2, 2),
            min_scale_crops=(0.14, 0.05),
            max_scale_crops=(1.0, 0.14),
            blur_sigma=(0.5, 2.0),
        )
        images = smooth_images(300, 48, 40)
    per_image = [transform(image) for image in images]
    batched = BatchedMultiCrop.from_transform(transform)(images)
    for size_crops in ([0, 1], [2, 3]):
        ours = torch.cat([batched[v] for v in size_crops])
        reference = torch.cat([torch.stack([crops[v] for crops in per_image]) for v in size_crops])
        # Tolerances, normalised units (std ~0.25 of the 0-1 range): 600 crops of 300 random images give a
        # sampling spread of about 0.04 in the means; torchvision jitters uint8 images and truncates to integers
        # after each step, which leaves its crops darker by about 0.05, and the YIQ hue rotation (not HSV)
        # widens the blue channel's spread by up to ~6% (measured over 3 seeds, with and without hue).
        assert torch.allclose(ours.mean(dim=(0, 2, 3)), reference.mean(dim=(0, 2, 3)), atol=0.12)
        assert torch.allclose(ours.std(dim=(0, 2, 3)), reference.std(dim=(0, 2, 3)), rtol=0.08)


def _tilt(crops: torch.Tensor) -> torch.Tensor:
    """The angle in degrees between vertical and the main axis of each crop's bright pixels (second moments)."""
    weight = crops.mean(dim=1).clamp(min=0)
    size = weight.shape[-1]
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    y, x = coords.view(1, -1, 1), coords.view(1, 1, -1)
    total = weight.sum(dim=(1, 2))
    yy, xx, xy = ((weight * m).sum(dim=(1, 2)) / total for m in (y * y, x * x, x * y))
    return torch.rad2deg(0.5 * torch.atan2(2 * xy, yy - xx))


def test_rotation_turns_each_crop_as_torchvision_within_the_range_with_black_corners():
    torch.manual_seed(0)
    count = 2000
    bar = torch.zeros(count, 1, 32, 32, dtype=torch.uint8)
    bar[:, :, 4:28, 15:17] = 255  # a vertical stroke through the centre
    settings = PLAIN | {"rotation": 30.0}
    ours = _tilt(one_size(32, 2, min_scale=1.0, **settings)(bar)[0])
    per_image = MultiCropTransform(
        size_crops=(32,), num_crops=(2,), min_scale_crops=(1.0,), max_scale_crops=(1.0,), **settings
    )
    reference = _tilt(torch.stack([per_image(image)[0] for image in bar[:500]]))
    unturned = _tilt(one_size(32, 2, min_scale=1.0, **PLAIN)(bar[:100])[0])
    assert unturned.abs().max() < 0.5
    # uniform in [-30, 30]: |angle| has quartiles 7.5, 15, 22.5; both pipelines turn both ways, never further
    for angles in (ours, reference):
        assert angles.abs().max() < 31
        assert _rate(angles > 0) == pytest.approx(0.5, abs=0.07)
        quartiles = angles.abs().quantile(torch.tensor([0.25, 0.5, 0.75]))
        assert torch.allclose(quartiles, torch.tensor([7.5, 15.0, 22.5]), atol=2.0)

    white = torch.full((4, 1, 32, 32), 255, dtype=torch.uint8)
    turned = one_size(32, 2, min_scale=1.0, **(PLAIN | {"rotation": 180.0}))(white)[0]
    corner = turned[:, :, :2, :2].amax(dim=(1, 2, 3))
    assert (turned[:, :, 14:18, 14:18] > 0.99).all()  # the centre stays
    assert _rate(corner < 0.5) >= 0.5  # most turns uncover a corner, black as torchvision's fill=0


def _hue_shift(rgb: torch.Tensor, hue: float) -> torch.Tensor:
    """Absolute HSV hue distance of each (r, g, b) row from ``hue``, in turns."""
    from torchvision.transforms.v2.functional._color import _rgb_to_hsv

    shift = (_rgb_to_hsv(rgb.view(-1, 3, 1, 1))[:, 0].flatten() - hue) % 1
    return torch.minimum(shift, 1 - shift)


def test_hue_rotation_shifts_hue_as_much_as_torchvision():
    torch.manual_seed(0)
    red = torch.tensor([200, 40, 40], dtype=torch.uint8).view(1, 3, 1, 1).expand(2000, 3, 8, 8)
    settings = PLAIN | {"color_strength": 1.0, "jitter": (0.0, 0.0, 0.0, 0.15)}
    ours = one_size(8, 2, **settings)(red)[0][:, :, 0, 0]
    reference = torch.stack([v2.ColorJitter(hue=0.15)(red[0, :, :1, :1]).flatten() for _ in range(2000)]).float() / 255
    changed = (ours - torch.tensor([200, 40, 40]) / 255).abs().amax(dim=1) > 1e-3
    changed &= (ours[:, 0] != ours[:, 1]) | (ours[:, 1] != ours[:, 2])  # not grayscaled
    ours_shift, reference_shift = _hue_shift(ours[changed], 0.0), _hue_shift(reference, 0.0)
    # YIQ rotation approximates HSV's hue shift: medians within 0.03 turns (11 degrees), the shift reaches
    # towards green and towards blue
    assert ours_shift.median().item() == pytest.approx(reference_shift.median().item(), abs=0.03)
    assert (ours[changed][:, 1] > 0.3).any() and (ours[changed][:, 2] > 0.3).any()


def test_bad_inputs_name_the_argument():
    augment = BatchedMultiCrop.for_cifar()
    with pytest.raises(TypeError, match="uint8"):
        augment(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\).*got shape \(3, 8, 8\)"):
        augment(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"C 1 or 3.*\(2, 4, 8, 8\)"):
        augment(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"images\[1\] must be a \(C, H, W\)"):
        augment([torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(8, 8, dtype=torch.uint8)])
    with pytest.raises(TypeError, match="non-empty list"):
        augment([])
    with pytest.raises(TypeError, match="MultiCropTransform"):
        BatchedMultiCrop.from_transform({"size_crops": (32,)})
    with pytest.raises(ValueError, match="flip_prob"):
        BatchedMultiCrop(flip_prob=2.0)


def test_collate_images_stacks_or_lists():
    same = [(torch.zeros(3, 4, 4, dtype=torch.uint8), i) for i in range(3)]
    images, targets = collate_images(same)
    assert images.shape == (3, 3, 4, 4) and targets.tolist() == [0, 1, 2]
    mixed = [torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(3, 5, 4, dtype=torch.uint8)]
    assert isinstance(collate_images(mixed), list)
    with pytest.raises(TypeError, match="PILToTensor"):
        collate_images([("not an image", 0)])
    with pytest.raises(ValueError, match="empty"):
        collate_images([])


def _displacement(warped: torch.Tensor, ramp_step: float) -> torch.Tensor:
    """Per-pixel shift along a ramp (value = coordinate * ramp_step / 255), read inside an 8 px border: bilinear
    resampling of a linear ramp is exact, so the value is where the pixel was taken from."""
    coords = torch.arange(warped.shape[-1], dtype=torch.float32)
    return (warped[:, 0] * 255 / ramp_step - coords)[:, 8:-8, 8:-8]


def test_elastic_warp_moves_pixels_as_torchvision_smoothly_by_the_expected_amount():
    torch.manual_seed(0)
    alpha, sigma, size, step = 60.0, 3.0, 32, 7.0
    ramp = (torch.arange(size) * step).to(torch.uint8).expand(200, 1, size, size).contiguous()  # value: 7 x column
    settings = PLAIN | {"elastic_alpha": alpha, "elastic_sigma": sigma}
    ours = _displacement(one_size(size, 2, min_scale=1.0, **settings)(ramp)[0], step)
    per_image = MultiCropTransform(
        size_crops=(size,), num_crops=(2,), min_scale_crops=(1.0,), max_scale_crops=(1.0,), **settings
    )
    reference = _displacement(torch.stack([per_image(image)[0] for image in ramp[:100]]), step)
    still = _displacement(one_size(size, 2, min_scale=1.0, **PLAIN)(ramp[:10])[0], step)
    assert still.abs().max() < 1e-3
    # uniform noise in [-1, 1] (variance 1/3) blurred by a normalised Gaussian, times alpha / 2 pixels
    taps = torch.arange(-(int(8 * sigma + 1) // 2), int(8 * sigma + 1) // 2 + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    expected_std = math.sqrt(1 / 3) * float((kernel / kernel.sum()).square().sum()) * alpha / 2
    for shifts in (ours, reference):
        assert shifts.std().item() == pytest.approx(expected_std, rel=0.12)
        assert shifts.mean().abs().item() < 0.1 * expected_std  # no drift either way
        # neighbours move together (a blur of sigma 3: correlation exp(-1 / 36) = 0.97 one pixel apart)
        pairs = torch.stack([shifts[:, :, :-1].flatten(), shifts[:, :, 1:].flatten()])
        assert torch.corrcoef(pairs)[0, 1].item() > 0.9
    # the other axis: a ramp down the rows moves as much
    rows = _displacement(one_size(size, 2, min_scale=1.0, **settings)(ramp.transpose(2, 3))[0].transpose(2, 3), step)
    assert rows.std().item() == pytest.approx(expected_std, rel=0.12)
