"""The model zoo by name: every release's address, downloaded once into torch's hub cache (here from a file://
mirror), checked against the checksum of its first download; the wide ResNet-50s of the releases."""

from pathlib import Path

import pytest
import torch
from helpers import released_checkpoint
from torchvision import models

from ignite_swav import RELEASES, download_release, load_official_checkpoint, resnet50_wide
from ignite_swav.releases import RELEASE_ADDRESS


@pytest.fixture
def hub_dir(tmp_path: Path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)


def mirror_with(tmp_path: Path, name: str, state: dict) -> str:
    mirror = tmp_path / "mirror"
    mirror.mkdir(exist_ok=True)
    torch.save(state, mirror / RELEASES[name].file)
    return mirror.as_uri()


def test_every_release_has_its_published_file_and_architecture():
    assert len(RELEASES) == 15
    assert RELEASE_ADDRESS == "https://dl.fbaipublicfiles.com/deepcluster"
    assert RELEASES["swav_800ep"].file == "swav_800ep_pretrain.pth.tar" and RELEASES["swav_800ep"].linear_top1 == 75.3
    assert RELEASES["deepclusterv2_800ep"].method == "DeepCluster-v2" and RELEASES["selav2_400ep"].method == "SeLa-v2"
    wide = {name: r.arch for name, r in RELEASES.items() if r.arch != "resnet50"}
    assert wide == {
        "swav_RN50w2_400ep": "resnet50w2",
        "swav_RN50w4_400ep": "resnet50w4",
        "swav_RN50w5_400ep": "resnet50w5",
    }


def test_a_release_by_name_is_downloaded_once_then_loaded_from_the_cache(tmp_path, hub_dir, capsys):
    state = released_checkpoint(arch="resnet18", hidden=64, out=16, prototypes=(20,))
    mirror = mirror_with(tmp_path, "swav_400ep", state)
    model = load_official_checkpoint("swav_400ep", arch="resnet18", mirror=mirror, require_head=True)
    cached = hub_dir / "swav_400ep_pretrain.pth.tar"
    assert cached.is_file() and (hub_dir / "swav_400ep_pretrain.pth.tar.sha256").is_file()
    assert torch.equal(model.prototypes.weight, state["module.prototypes.weight"])
    (tmp_path / "mirror" / cached.name).unlink()  # nothing to download from any more: the cache serves
    again = load_official_checkpoint("swav_400ep", arch="resnet18", mirror=mirror, progress=False)
    assert torch.equal(again.prototypes.weight, model.prototypes.weight)
    with open(cached, "ab") as file:  # damaged (or replaced) since its download
        file.write(b"\0")
    with pytest.raises(ValueError, match="does not match the checksum recorded at its download"):
        download_release("swav_400ep", mirror=mirror)


def test_a_release_takes_its_architecture_and_a_file_of_another_is_named(tmp_path, hub_dir):
    mirror = mirror_with(tmp_path, "swav_800ep", released_checkpoint(arch="resnet18", hidden=64, out=16))
    with pytest.raises(ValueError, match="source does not hold a resnet50 backbone in the released SwAV format"):
        load_official_checkpoint("swav_800ep", mirror=mirror, progress=False)


def test_unknown_release_names_are_one_line_naming_the_releases():
    with pytest.raises(ValueError, match=r"'swav_1600ep' is neither a file nor a release .* swav_800ep, swav_400ep"):
        load_official_checkpoint("swav_1600ep")
    with pytest.raises(ValueError, match=r"'swav_1600ep' is not a release of facebookresearch/swav; the releases"):
        download_release("swav_1600ep")


def test_the_wide_resnets_have_the_published_sizes_and_resnet50_s_names():
    counts = {}
    for widen in (2, 4, 5):
        with torch.device("meta"):
            model = resnet50_wide(widen)
        counts[widen] = round(sum(p.numel() for n, p in model.named_parameters() if not n.startswith("fc.")) / 1e6, 1)
    assert counts == {2: 93.9, 4: 375.4, 5: 586.5}  # the releases' 94M, 375M, 586M
    plain, torchvision_one = resnet50_wide(1).state_dict(), models.resnet50().state_dict()
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in torchvision_one.items()}
    with pytest.raises(ValueError, match="widen must be an integer >= 1"):
        resnet50_wide(0)


@pytest.mark.slow
def test_a_wide_release_loads_into_its_wide_resnet(tmp_path):
    # what failed before ("arch='resnet50w2' is not a torchvision model builder"): a file of the w2 layout
    torch.manual_seed(0)
    backbone = resnet50_wide(2)
    state = {f"module.{k}": v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.weight"] = torch.randn(16, 4096) * 0.01
    state["module.projection_head.bias"] = torch.zeros(16)
    state["module.prototypes.weight"] = torch.nn.functional.normalize(torch.randn(30, 16), dim=1)
    model = load_official_checkpoint(state, arch="resnet50w2", require_head=True)
    assert torch.equal(model.backbone.layer4[2].conv3.weight, state["module.layer4.2.conv3.weight"])
    with torch.no_grad():
        (embeddings,), _ = model([torch.randn(1, 3, 64, 64)])
    assert embeddings.shape == (1, 16)
