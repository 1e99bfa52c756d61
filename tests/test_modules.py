import pytest
import torch
from helpers import TinyBackbone, random_crops, tiny_swav_model
from torch import nn

from ignite_swav import SwAVModel, SwAVProjectionHead, SwAVPrototypes, unwrap_model


def test_projection_head_layers_and_unit_norm_output():
    head = SwAVProjectionHead(10, hidden_dim=20, out_dim=5)
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    out = head(torch.randn(6, 10))
    assert out.shape == (6, 5)
    assert torch.allclose(out.norm(dim=1), torch.ones(6), atol=1e-6)


def test_projection_head_without_hidden_layer_is_one_linear():
    head = SwAVProjectionHead(10, hidden_dim=0, out_dim=5)
    assert isinstance(head.layers, nn.Linear)
    assert torch.allclose(head(torch.randn(3, 10)).norm(dim=1), torch.ones(3), atol=1e-6)


def test_prototypes_are_a_bias_free_linear_and_normalise_in_place():
    prototypes = SwAVPrototypes(feat_dim=4, num_prototypes=7)
    assert isinstance(prototypes, nn.Linear) and prototypes.bias is None
    assert prototypes.weight.shape == (7, 4)
    with torch.no_grad():
        prototypes.weight.mul_(3)
    weight = prototypes.weight
    prototypes.normalize_()
    assert prototypes.weight is weight  # in place: the optimizer keeps the same parameter
    assert torch.allclose(prototypes.weight.norm(dim=1), torch.ones(7), atol=1e-6)


@pytest.mark.parametrize(
    "build,error,message",
    [
        (lambda: SwAVProjectionHead(0), ValueError, "in_dim must be an integer >= 1, got 0"),
        (lambda: SwAVProjectionHead(4, hidden_dim=-1), ValueError, "hidden_dim must be an integer >= 0"),
        (lambda: SwAVPrototypes(num_prototypes=0), ValueError, "num_prototypes must be an integer >= 1"),
        (
            lambda: SwAVModel(TinyBackbone(), SwAVProjectionHead(16, 8, 8), SwAVPrototypes(16, 5)),
            ValueError,
            "embeddings have width 8, but the prototypes expect width 16",
        ),
        (lambda: SwAVModel(TinyBackbone(), nn.Identity(), nn.Linear(3, 3)), TypeError, "prototypes must be"),
        (lambda: SwAVModel(lambda x: x, nn.Identity(), SwAVPrototypes(3, 3)), TypeError, "backbone must be"),
    ],
)
def test_bad_construction_is_refused(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_grouped_forward_runs_the_backbone_once_per_size_and_equals_crop_by_crop():
    model = tiny_swav_model()
    model.eval()  # BatchNorm on running statistics: the result does not depend on how crops are batched
    crops = random_crops()
    model.backbone.calls = 0
    embeddings, scores = model(crops)
    assert model.backbone.calls == 2  # one call for the 16 px crops, one for the 8 px crops
    assert len(embeddings) == len(scores) == 5
    for crop, z, s in zip(crops, embeddings, scores):
        alone_z, alone_s = model([crop])
        assert torch.allclose(z, alone_z[0], atol=1e-6)
        assert torch.allclose(s, alone_s[0], atol=1e-6)
        assert torch.allclose(s, z @ model.prototypes.weight.t(), atol=1e-6)


def test_the_head_sees_all_crops_at_once_in_training():
    model = tiny_swav_model()
    embeddings, scores = model(random_crops())
    assert [tuple(z.shape) for z in embeddings] == [(4, 8)] * 5
    assert [tuple(s.shape) for s in scores] == [(4, 12)] * 5


@pytest.mark.parametrize(
    "crops,message",
    [
        (random_crops(sizes=(16, 8, 16)), "crops of one size must be contiguous"),
        ([torch.randn(4, 3, 8, 8), torch.randn(3, 3, 8, 8)], r"crops\[1\] holds 3 images, crops\[0\] holds 4"),
        ([torch.randn(3, 8, 8)], r"crops\[0\] must be a \(B, C, H, W\) batch"),
        ([], "non-empty list"),
        (torch.randn(2, 4, 3, 8, 8), "non-empty list"),
    ],
)
def test_bad_crop_lists_are_refused(crops, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_swav_model()(crops)


def test_a_projection_of_another_width_is_caught_at_forward():
    model = SwAVModel(TinyBackbone(16), nn.Linear(16, 6), SwAVPrototypes(8, 5))
    with pytest.raises(ValueError, match=r"embeddings of shape \(8, 6\), but the prototypes expect width 8"):
        model(random_crops(sizes=(8, 8)))


def test_only_the_first_crop_size_updates_the_running_statistics():
    model = tiny_swav_model()
    bn = model.backbone.bn
    large = [torch.randn(4, 3, 16, 16) + 3.0] * 2
    small = [torch.randn(4, 3, 8, 8) - 5.0] * 3
    model(large)
    after_large = bn.running_mean.clone()
    model.backbone.bn.reset_running_stats()
    model(large + small)
    assert torch.allclose(bn.running_mean, after_large)  # the small crops left no trace
    assert bn.momentum == 0.1  # restored after the forward

    blended = tiny_swav_model()
    blended.running_stats_from_first_size = False
    blended(large + small)
    assert not torch.allclose(blended.backbone.bn.running_mean, after_large)


def test_freezing_the_running_statistics_does_not_change_the_training_outputs():
    crops = random_crops(sizes=(16, 16, 8, 8))
    frozen, blended = tiny_swav_model(), tiny_swav_model()
    blended.running_stats_from_first_size = False
    for a, b in zip(frozen(crops), blended(crops)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)  # batch statistics in training either way


def test_every_public_name_has_a_docstring_example_and_the_package_is_typed():
    from pathlib import Path

    import ignite_swav

    missing = [
        name
        for name in ignite_swav.__all__
        if callable(getattr(ignite_swav, name)) and ">>>" not in (getattr(ignite_swav, name).__doc__ or "")
    ]
    assert missing == []  # each example runs as a doctest of the suite (setup.cfg: --doctest-modules)
    assert (Path(ignite_swav.__file__).parent / "py.typed").is_file()


def test_crops_given_small_first_or_as_uint8_are_refused_with_the_reason():
    from helpers import tiny_swav_model

    model = tiny_swav_model()
    small_first = [torch.randn(2, 3, 8, 8)] * 2 + [torch.randn(2, 3, 16, 16)] * 2
    with pytest.raises(ValueError, match=r"crops\[2\] \(16x16\) is larger than crops\[1\]: give the crops large first"):
        model(small_first)
    with pytest.raises(TypeError, match=r"crops\[0\] has dtype torch.uint8.*BatchedMultiCrop"):
        model([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)] * 2)


def test_unwrap_model_finds_the_model_inside_dataparallel_and_compile_wrappers_in_any_nesting():
    model = SwAVModel(torch.nn.Flatten(), SwAVProjectionHead(12, 8, 4), SwAVPrototypes(4, 5))
    compiled = torch.compile(model)  # nothing is compiled until it is called
    assert unwrap_model(model) is model
    assert unwrap_model(compiled) is model
    assert unwrap_model(torch.nn.DataParallel(compiled)) is model
    assert unwrap_model(torch.compile(torch.nn.DataParallel(model))) is model
    assert list(unwrap_model(torch.nn.DataParallel(model)).state_dict()) == list(model.state_dict())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):
        unwrap_model({"model": model})
