"""facebookresearch/swav's model zoo by name: the published addresses of its SwAV, DeepCluster-v2 and SeLa-v2
releases, downloaded once into torch's hub cache, and the wide ResNet-50s (w2, w4, w5) some of them need."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

__all__ = ["RELEASES", "Release", "download_release", "resnet50_wide"]

#: where facebookresearch/swav publishes its releases (its README's model zoo)
RELEASE_ADDRESS = "https://dl.fbaipublicfiles.com/deepcluster"


@dataclass(frozen=True)
class Release:
    """One release of facebookresearch/swav's model zoo (its README: method, epochs, ImageNet linear top-1).

    Example:
        >>> from ignite_swav import RELEASES
        >>> release = RELEASES["swav_RN50w2_400ep"]
        >>> release.file, release.arch, release.linear_top1
        ('swav_RN50w2_400ep_pretrain.pth.tar', 'resnet50w2', 77.3)
    """

    #: the file name under :data:`RELEASE_ADDRESS`
    file: str
    #: the backbone: ``"resnet50"`` or a wide ResNet-50 (``"resnet50w2"``, ``"resnet50w4"``, ``"resnet50w5"``)
    arch: str
    method: str
    epochs: int
    #: ImageNet top-1 of a linear classifier on the frozen features, as published
    linear_top1: float


def _release(file: str, method: str, epochs: int, top1: float, arch: str = "resnet50") -> Release:
    return Release(f"{file}_pretrain.pth.tar", arch, method, epochs, top1)


#: every release, by the name its file starts with
RELEASES: dict[str, Release] = {
    "swav_800ep": _release("swav_800ep", "SwAV", 800, 75.3),
    "swav_400ep": _release("swav_400ep", "SwAV", 400, 74.6),
    "swav_200ep": _release("swav_200ep", "SwAV", 200, 73.9),
    "swav_100ep": _release("swav_100ep", "SwAV", 100, 72.1),
    "swav_200ep_bs256": _release("swav_200ep_bs256", "SwAV", 200, 72.7),
    "swav_400ep_bs256": _release("swav_400ep_bs256", "SwAV", 400, 74.3),
    "swav_400ep_2x224": _release("swav_400ep_2x224", "SwAV", 400, 70.1),
    "deepclusterv2_800ep": _release("deepclusterv2_800ep", "DeepCluster-v2", 800, 75.2),
    "deepclusterv2_400ep": _release("deepclusterv2_400ep", "DeepCluster-v2", 400, 74.3),
    "deepclusterv2_400ep_2x224": _release("deepclusterv2_400ep_2x224", "DeepCluster-v2", 400, 70.2),
    "selav2_400ep": _release("selav2_400ep", "SeLa-v2", 400, 71.8),
    "selav2_400ep_2x224": _release("selav2_400ep_2x224", "SeLa-v2", 400, 67.2),
    "swav_RN50w2_400ep": _release("swav_RN50w2_400ep", "SwAV", 400, 77.3, "resnet50w2"),
    "swav_RN50w4_400ep": _release("swav_RN50w4_400ep", "SwAV", 400, 77.9, "resnet50w4"),
    "swav_RN50w5_400ep": _release("swav_RN50w5_400ep", "SwAV", 400, 78.5, "resnet50w5"),
}


def download_release(name: str, mirror: str | None = None, progress: bool = True) -> Path:
    """The file of release ``name`` in torch's hub cache (``torch.hub.get_dir()/checkpoints``, where
    ``torch.hub.load("facebookresearch/swav", ...)`` puts it too), downloaded once with a progress bar.

    The releases publish no checksums: the SHA-256 of the first download is written beside the file
    (``<file>.sha256``) and every later use checks the file against it, so that a cached file damaged or replaced
    since is refused rather than loaded. The download itself goes to a temporary file renamed when complete
    (``torch.hub.download_url_to_file``): an interrupted one leaves nothing behind.

    Args:
        name: a key of :data:`RELEASES`.
        mirror: an address holding the release files under their own names, used instead of
            :data:`RELEASE_ADDRESS` (another server, or ``file:///path/to/dir`` for a copy on disk).
        progress: show the download's progress bar.

    Raises:
        ValueError: an unknown name (the known ones are listed), or a cached file whose checksum changed.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from ignite_swav import download_release
        >>> mirror = Path(tempfile.mkdtemp())  # a copy of the release files, here one made up
        >>> torch.save({}, mirror / "swav_100ep_pretrain.pth.tar")
        >>> hub = torch.hub.get_dir()
        >>> torch.hub.set_dir(tempfile.mkdtemp())
        >>> download_release("swav_100ep", mirror=mirror.as_uri(), progress=False).name
        'swav_100ep_pretrain.pth.tar'
        >>> torch.hub.set_dir(hub)
    """
    release = RELEASES.get(name) if isinstance(name, str) else None
    if release is None:
        raise ValueError(f"{name!r} is not a release of facebookresearch/swav; the releases: {', '.join(RELEASES)}")
    path = Path(torch.hub.get_dir()) / "checkpoints" / release.file
    recorded = path.with_name(path.name + ".sha256")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        address = f"{(mirror or RELEASE_ADDRESS).rstrip('/')}/{release.file}"
        torch.hub.download_url_to_file(address, str(path), None, progress)
        recorded.unlink(missing_ok=True)
    digest = _sha256(path)
    if not recorded.is_file():
        recorded.write_text(digest + "\n")
    elif recorded.read_text().strip() != digest:
        raise ValueError(
            f"the cached release '{path}' does not match the checksum recorded at its download ({recorded}): it was "
            "damaged or replaced since; delete both files to download it again"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resnet50_wide(widen: int) -> nn.Module:
    """The wide ResNet-50 of facebookresearch/swav's ``resnet50w2`` / ``w4`` / ``w5`` releases: every channel count
    ``widen`` times torchvision's ResNet-50's (the stem, the stages and the bottlenecks inside them), in
    torchvision's module names, so that its state dict is the releases' backbone. Its backbone has 93.9, 375.4 and
    586.5 million parameters at 2, 4 and 5: the 94M, 375M and 586M the releases publish. Not torchvision's
    ``wide_resnet50_2``, which widens the bottlenecks only (68.9M).

    Example:
        >>> import torch
        >>> from ignite_swav import resnet50_wide
        >>> with torch.device("meta"):  # the shapes only: no memory for 94 million weights
        ...     model = resnet50_wide(2)
        >>> backbone = [p.numel() for name, p in model.named_parameters() if not name.startswith("fc.")]
        >>> model.fc.in_features, round(sum(backbone) / 1e6)
        (4096, 94)
    """
    if isinstance(widen, bool) or not isinstance(widen, int) or widen < 1:
        raise ValueError(f"widen must be an integer >= 1 (the releases have 2, 4 and 5), got {widen!r}")
    return _WideResNet50(widen)


class _WideResNet50(ResNet):
    # torchvision's ResNet fixes the stem at 64 channels and the stages' planes at 64..512: built at width 1, then
    # its stem and stages made again at `widen` times (torchvision's Bottleneck, as wide as its stage's planes)
    def __init__(self, widen: int) -> None:
        super().__init__(Bottleneck, [3, 4, 6, 3])
        width = 64 * widen
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(width)
        self.layer1 = self._make_layer(Bottleneck, width, 3)
        self.layer2 = self._make_layer(Bottleneck, width * 2, 4, stride=2)
        self.layer3 = self._make_layer(Bottleneck, width * 4, 6, stride=2)
        self.layer4 = self._make_layer(Bottleneck, width * 8, 3, stride=2)
        self.fc = nn.Linear(width * 8 * Bottleneck.expansion, 1000)
        for module in self.modules():  # torchvision's initialisation, for the layers made again
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
