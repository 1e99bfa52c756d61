import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ignite_swav import MultiCropTransform, collate_crops


def test_default_is_the_swav_imagenet_recipe():
    transform = MultiCropTransform()
    crops = transform(Image.new("RGB", (300, 260), (120, 30, 200)))
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert transform.total_crops == 8
    assert all(c.dtype == torch.float32 for c in crops)


@pytest.mark.parametrize("image", [Image.new("L", (8, 8), 90), torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)])
def test_one_channel_images_become_rgb_crops(image):
    crops = MultiCropTransform.for_digits()(image)
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2


def test_values_stay_in_the_normalised_range():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    transform = MultiCropTransform(size_crops=(24, 12), num_crops=(2, 2), mean=mean, std=std)
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    low = torch.tensor([(0 - m) / s for m, s in zip(mean, std)]).view(3, 1, 1)
    high = torch.tensor([(1 - m) / s for m, s in zip(mean, std)]).view(3, 1, 1)
    for _ in range(5):
        for crop in transform(image):
            assert (crop >= low - 1e-5).all() and (crop <= high + 1e-5).all()


def test_crops_are_random_and_differ_from_each_other():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    crops = MultiCropTransform.for_cifar()(image)
    assert not torch.equal(crops[0], crops[1])


def test_small_crops_cover_a_small_part_of_the_image():
    # a left-right ramp image: a crop's horizontal spread of values says how much of the width it covers
    ramp = torch.linspace(0, 255, 256).round().to(torch.uint8).view(1, 1, 256).expand(3, 256, 256).contiguous()
    transform = MultiCropTransform(
        size_crops=(64, 32),
        num_crops=(1, 1),
        min_scale_crops=(0.9, 0.05),
        max_scale_crops=(1.0, 0.1),
        color_strength=0.0,
        blur_prob=0.0,
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    torch.manual_seed(0)
    spans = [[(c[0, 0, -1] - c[0, 0, 0]).abs().item() for c in transform(ramp)] for _ in range(20)]
    large, small = zip(*spans)
    # area 0.9-1 with aspect ratio 3/4-4/3 spans most of the width; area 0.05-0.1 spans at most ~37%
    assert min(large) > 0.75 and max(small) < 0.4


def test_presets_accept_overrides():
    transform = MultiCropTransform.for_cifar(num_crops=(2, 0))
    assert transform.total_crops == 2
    assert transform.size_crops == (32, 16)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"size_crops": ()}, "size_crops must be a non-empty sequence"),
        ({"num_crops": (2,)}, r"num_crops must have one entry per crop size \(2\)"),
        ({"num_crops": (1, 0)}, "at least 2 crops"),
        ({"num_crops": (2, -1)}, r"num_crops\[1\] must be an integer >= 0"),
        ({"min_scale_crops": (0.5, 0.2), "max_scale_crops": (0.4, 0.3)}, r"min_scale_crops <= max_scale_crops"),
        ({"min_scale_crops": (0.0, 0.05)}, "0 < min_scale_crops"),
        ({"blur_prob": 1.5}, r"blur_prob must be a probability in \[0, 1\], got 1.5"),
        ({"blur_sigma": (2.0, 1.0)}, "blur_sigma must be"),
        ({"color_strength": -1}, "color_strength must be >= 0"),
        ({"std": (0, 1, 1)}, "std > 0"),
        ({"rotation": -5}, r"rotation must be an angle in degrees in \[0, 180\], got -5"),
        ({"rotation": 270}, r"rotation must be an angle in degrees in \[0, 180\], got 270"),
        ({"rotation": float("nan")}, r"rotation must be an angle in degrees in \[0, 180\], got nan"),
        ({"elastic_alpha": -1}, r"elastic_alpha must be a finite number >= 0 \(0: no elastic warp\), got -1"),
        ({"elastic_alpha": float("inf")}, r"elastic_alpha must be a finite number >= 0 .*, got inf"),
        ({"elastic_sigma": 0}, r"elastic_sigma must be a finite number > 0, got 0"),
        ({"elastic_sigma": float("nan")}, r"elastic_sigma must be a finite number > 0, got nan"),
        (
            {"elastic_alpha": 30, "elastic_sigma": 30},
            r"elastic_sigma must be less than 23.875 for 96 px crops \(.*\), got 30",
        ),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiCropTransform(**kwargs)


class _CropDataset(TensorDataset):
    def __init__(self, with_targets: bool) -> None:
        super().__init__(torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8), torch.arange(10))
        self.transform = MultiCropTransform(size_crops=(8, 4), num_crops=(2, 3), blur_prob=0.0)
        self.with_targets = with_targets

    def __getitem__(self, index):
        image, target = super().__getitem__(index)
        crops = self.transform(image)
        return (crops, int(target)) if self.with_targets else crops


def test_collate_stacks_crops_for_the_dataloader():
    crops, targets = next(iter(DataLoader(_CropDataset(True), batch_size=4, collate_fn=collate_crops)))
    assert [tuple(c.shape) for c in crops] == [(4, 3, 8, 8)] * 2 + [(4, 3, 4, 4)] * 3
    assert targets.tolist() == [0, 1, 2, 3]
    crops = next(iter(DataLoader(_CropDataset(False), batch_size=4, collate_fn=collate_crops)))
    assert isinstance(crops, list) and len(crops) == 5


def test_collate_refuses_ragged_samples():
    with pytest.raises(ValueError, match="sample 1 has 1 crops, sample 0 has 2"):
        collate_crops([[torch.zeros(3, 4, 4)] * 2, [torch.zeros(3, 4, 4)]])
    with pytest.raises(ValueError, match="empty batch"):
        collate_crops([])


def test_flip_and_jitter_can_be_turned_off():
    image = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16).div(3 * 256).mul(255).to(torch.uint8)
    transform = MultiCropTransform(
        size_crops=(16,),
        num_crops=(2,),
        min_scale_crops=(1.0,),
        max_scale_crops=(1.0,),
        jitter=(0, 0, 0, 0),
        flip_prob=0.0,
        blur_prob=0.0,
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    torch.manual_seed(0)
    for _ in range(10):
        crop = transform(image)[0]
        if not torch.allclose(crop, image.float() / 255, atol=1e-6):
            # only the random grayscale may change it; never a mirror
            assert torch.allclose(crop[0], crop[1])
    with pytest.raises(ValueError, match="jitter must be 4 values >= 0"):
        MultiCropTransform(jitter=(0.8, 0.8))
    with pytest.raises(ValueError, match=r"flip_prob must be a probability in \[0, 1\], got 2"):
        MultiCropTransform(flip_prob=2)


def test_a_crop_size_that_would_exhaust_memory_is_refused_by_both_augmentations():
    from ignite_swav import BatchedMultiCrop

    for make in (MultiCropTransform, BatchedMultiCrop):
        with pytest.raises(ValueError, match="size_crops\\[0\\] must be at most 8192 pixels, got 100000"):
            make(size_crops=(10**5,), num_crops=(2,), min_scale_crops=(0.5,), max_scale_crops=(1.0,))
