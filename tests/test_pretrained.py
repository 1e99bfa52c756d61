"""Weights in (the released SwAV checkpoints) and out (backbones for torchvision and timm)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from helpers import released_checkpoint
from torch import nn
from torchvision import models

from ignite_swav import (
    SwAVModel,
    SwAVProjectionHead,
    SwAVPrototypes,
    assign_clusters,
    export_backbone,
    load_official_checkpoint,
)


def by_hand(state, images, prototype_key="prototypes.weight"):
    """Backbone features, embeddings and scores computed from the released tensors directly: torchvision's
    ResNet for the backbone (checked against the reference's padding below), then the head's formulas."""
    weights = {k[len("module.") :]: v for k, v in state.items()}
    backbone = models.resnet50()
    backbone.fc = nn.Identity()
    backbone.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("projection_head", "prototypes"))})
    features = backbone.eval()(images)
    h = features @ weights["projection_head.0.weight"].t() + weights["projection_head.0.bias"]
    h = (h - weights["projection_head.1.running_mean"]) / torch.sqrt(weights["projection_head.1.running_var"] + 1e-5)
    h = torch.relu(h * weights["projection_head.1.weight"] + weights["projection_head.1.bias"])
    z = F.normalize(h @ weights["projection_head.3.weight"].t() + weights["projection_head.3.bias"], dim=1)
    return features, z, z @ weights[prototype_key].t()


def test_the_reference_padding_is_torchvisions():
    # the reference pads the input by 1 and its first convolution by 2; torchvision pads the convolution by 3
    conv = models.resnet50().conv1
    x = torch.randn(2, 3, 32, 32)
    reference = F.conv2d(F.pad(x, (1, 1, 1, 1)), conv.weight, stride=2, padding=2)
    assert torch.allclose(reference, conv(x), atol=1e-5)


def test_a_released_checkpoint_file_gives_the_features_embeddings_and_scores_of_its_tensors(tmp_path):
    state = released_checkpoint()
    torch.save(state, tmp_path / "swav_800ep_pretrain.pth.tar")
    model = load_official_checkpoint(tmp_path / "swav_800ep_pretrain.pth.tar", require_head=True)
    assert isinstance(model.backbone, models.ResNet) and not model.training
    assert model.prototypes.weight.shape == (3000, 128)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features, embeddings, scores = by_hand(state, images)
        (got_embeddings,), (got_scores,) = model([images])
        got_features = model.backbone(images)
    assert torch.allclose(got_features, features, atol=1e-5)
    assert torch.allclose(got_embeddings, embeddings, atol=1e-5)
    assert torch.allclose(got_scores, scores, atol=1e-5)


def test_a_main_swav_checkpoint_and_several_prototype_heads():
    state = released_checkpoint(arch="resnet18", hidden=64, out=16, prototypes=(30, 40, 50))
    model = load_official_checkpoint({"epoch": 3, "state_dict": state}, arch="resnet18", prototype_head=1)
    assert torch.equal(model.prototypes.weight, state["module.prototypes.prototypes1.weight"])
    with pytest.raises(ValueError, match=r"prototype_head=3, but the checkpoint holds prototype heads 0..2"):
        load_official_checkpoint(state, arch="resnet18", prototype_head=3)
    with pytest.raises(ValueError, match=r"prototype heads have different widths \[30, 40, 50\]"):
        load_official_checkpoint(state, arch="resnet18")


def test_a_deepcluster_v2_or_sela_v2_release_loads_with_all_its_heads(tmp_path):
    # their releases: three heads of 3000 prototypes (MultiPrototypes: prototypes.prototypes0..2), here of 30
    state = released_checkpoint(prototypes=(30, 30, 30))
    model = load_official_checkpoint(state, require_head=True)
    assert model.prototypes.num_heads == 3 and model.prototypes.weight.shape == (90, 128)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        (_,), (scores,) = model([images])
    for head in range(3):
        _, _, expected = by_hand(state, images, prototype_key=f"prototypes.prototypes{head}.weight")
        assert torch.allclose(scores[:, 30 * head : 30 * (head + 1)], expected, atol=1e-5)
        ids = assign_clusters(model, [images], head=head)
        assert torch.equal(ids, expected.argmax(dim=1))
    with pytest.raises(ValueError, match=r"head must be an integer from 0 to 2 \(the model's prototype heads\), got 3"):
        assign_clusters(model, [images], head=3)
    exported = export_backbone(model, tmp_path / "backbone.pt", arch="resnet50")
    assert set(exported) == {k for k in models.resnet50().state_dict() if not k.startswith("fc.")}
    one_head = load_official_checkpoint(state, prototype_head=2)
    assert torch.equal(one_head.prototypes.weight, state["module.prototypes.prototypes2.weight"])
    bad = {**state, "module.prototypes.prototypes7.weight": state["module.prototypes.prototypes0.weight"]}
    with pytest.raises(ValueError, match="expected 'weight', or 'prototypes0.weight', 'prototypes1.weight'"):
        load_official_checkpoint(bad)


def test_a_backbone_only_release_gets_a_fresh_head_or_a_clear_error(caplog):
    state = released_checkpoint(arch="resnet18", head=False)
    with caplog.at_level(logging.WARNING):
        model = load_official_checkpoint(state, arch="resnet18")
    assert "holds no projection head and no prototypes: initialised at random" in caplog.text
    assert torch.equal(model.backbone.conv1.weight, state["module.conv1.weight"])
    assert model.prototypes.weight.shape == (3000, 128)
    with pytest.raises(ValueError, match=r"holds no projection head and no prototypes .*require_head=True"):
        load_official_checkpoint(state, arch="resnet18", require_head=True)


def test_a_checkpoint_of_another_architecture_is_named():
    state = released_checkpoint(arch="resnet18", hidden=64, out=16, prototypes=(30,))
    with pytest.raises(
        ValueError, match=r"does not hold a resnet50 backbone.*missing keys of resnet50: 'layer1.0.conv3"
    ):
        load_official_checkpoint(state, arch="resnet50")


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda s: s | {"module.linear.weight": torch.zeros(2, 2)},
            r"keys unknown to torchvision's resnet18: 'linear.weight'",
        ),
        (lambda s: s | {"module.epoch": 3}, r"entries that are not tensors \('module.epoch'\)"),
        (lambda s: {}, "it holds nothing"),
        (lambda s: s | {3: torch.zeros(2)}, r"it holds keys that are not names \(\[3\]\)"),
        (
            lambda s: s | {"module.prototypes.weight": torch.zeros(30, 8)},
            r"prototypes are \(30, 8\), expected \(K, 16\)",
        ),
        (
            lambda s: s | {"module.projection_head.0.weight": torch.zeros(64, 3)},
            r"'projection_head.0.weight' is \(64, 3\)",
        ),
    ],
)
def test_bad_checkpoints_are_refused_in_one_line(mutate, message):
    state = mutate(released_checkpoint(arch="resnet18", hidden=64, out=16, prototypes=(30,)))
    with pytest.raises(ValueError, match=message):
        load_official_checkpoint(state, arch="resnet18")


def test_bad_arguments_are_refused():
    state = released_checkpoint(arch="resnet18", head=False)
    with pytest.raises(ValueError, match=r"arch='resnet_51' is not a torchvision model builder"):
        load_official_checkpoint(state, arch="resnet_51")
    with pytest.raises(ValueError, match=r"arch='get_model' is not a torchvision model builder"):
        load_official_checkpoint(state, arch="get_model")  # a callable of torchvision.models, not a builder
    with pytest.raises(TypeError, match="source must be a path or a state dict, got int"):
        load_official_checkpoint(3)
    with pytest.raises(ValueError, match=r"prototype_head must be None \(all heads\) or an integer >= 0, got -1"):
        load_official_checkpoint(state, arch="resnet18", prototype_head=-1)


def swav_resnet18(seed=0):
    torch.manual_seed(seed)
    backbone = models.resnet18()
    backbone.fc = nn.Identity()
    return SwAVModel(backbone, SwAVProjectionHead(512, 64, 16), SwAVPrototypes(16, 30))


def test_a_backbone_exported_for_torchvision_gives_the_same_features(tmp_path):
    model = swav_resnet18()
    export_backbone(model, tmp_path / "backbone.pt", arch="resnet18")
    state = torch.load(tmp_path / "backbone.pt", weights_only=True)
    loaded = models.resnet18()
    result = loaded.load_state_dict(state, strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and result.unexpected_keys == []
    loaded.fc = nn.Identity()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(images), model.backbone.eval()(images), atol=1e-6)


def test_a_backbone_exported_for_timm_gives_the_same_features(tmp_path):
    timm = pytest.importorskip("timm")
    model = swav_resnet18()
    # from a checkpoint file as the example writes it, through DDP-free loading
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    export_backbone(tmp_path / "checkpoint.pt", tmp_path / "timm.pt", format="timm", arch="resnet18")
    loaded = timm.create_model("resnet18", num_classes=0, pretrained=False)
    loaded.load_state_dict(torch.load(tmp_path / "timm.pt", weights_only=True), strict=True)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(images), model.backbone.eval()(images), atol=1e-5)


def test_a_backbone_that_does_not_match_is_refused_before_anything_is_written(tmp_path):
    model = swav_resnet18()
    with pytest.raises(ValueError, match=r"does not load into torchvision's resnet50: missing 'layer1.0.conv3.weight'"):
        export_backbone(model, tmp_path / "out.pt", arch="resnet50")
    with pytest.raises(ValueError, match=r"does not load into timm's resnet34 \(num_classes=0\): missing"):
        export_backbone(model, tmp_path / "out.pt", format="timm", arch="resnet34")
    with pytest.raises(ValueError, match=r"arch='no_such_net' is not a timm model name"):
        export_backbone(model, tmp_path / "out.pt", format="timm", arch="no_such_net")
    with pytest.raises(ValueError, match=r"format must be one of \('torchvision', 'timm'\), got 'onnx'"):
        export_backbone(model, tmp_path / "out.pt", format="onnx")
    with pytest.raises(ValueError, match="holds no 'backbone.' weights"):
        export_backbone({"model": {"conv.weight": torch.zeros(1)}}, tmp_path / "out.pt")
    with pytest.raises(TypeError, match=r"a SwAVModel \(with a .backbone\) is expected, got Linear"):
        export_backbone(nn.Linear(2, 2), tmp_path / "out.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_release_file_with_an_expanded_tensor_is_refused_before_anything_is_allocated(tmp_path):
    state = released_checkpoint(arch="resnet18", hidden=64, out=16, prototypes=(30,))
    # a stride-0 view: 4 bytes of storage that any copy turns into 4 GB
    state["module.prototypes.weight"] = torch.zeros(1).expand(2**15, 2**15)
    path = tmp_path / "release.pth"
    torch.save(state, path)
    assert path.stat().st_size < 50_000_000
    with pytest.raises(ValueError, match=r"'module.prototypes.weight' claims \(32768, 32768\) values but its storage"):
        load_official_checkpoint(path, arch="resnet18")


def test_an_exported_backbone_is_readable_by_everyone_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import errno
    import stat

    target = tmp_path / "backbone.pt"
    export_backbone(swav_resnet18(), target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # colleagues on a shared cluster can read it
    before = target.read_bytes()

    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2304 vs 2198")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"no space left on the device to write '.*backbone.pt' \(the file there") as info:
        export_backbone(swav_resnet18(), target)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.pt"]  # no temporary file left
