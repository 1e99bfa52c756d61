"""assign_clusters: prototype ids of new images, plain or balanced, on one process and on two."""

import pytest
import torch
import torch.nn.functional as F
from helpers import spawn_gloo, tiny_swav_model
from reference import classic_sinkhorn

from ignite_swav import assign_clusters


def images(count, seed):
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def scores_by_hand(model, x):
    with torch.no_grad():
        z = F.normalize(model.projection(model.backbone(x)), dim=1)
        return z @ F.normalize(model.prototypes.weight, dim=1).t()


def test_ids_are_the_best_prototype_in_eval_mode_and_the_mode_is_restored():
    model = tiny_swav_model(seed=1).train()
    running_mean = model.backbone.bn.running_mean.clone()
    data = [(images(5, 0), torch.zeros(5)), (images(3, 1), torch.zeros(3))]
    ids = assign_clusters(model, data)
    assert model.training, "the model's mode is restored"
    model.eval()
    expected = torch.cat([scores_by_hand(model, x) for x, _ in data]).argmax(dim=1)
    assert ids.dtype == torch.long and torch.equal(ids, expected)
    assert torch.equal(model.backbone.bn.running_mean, running_mean), "eval mode: the statistics are untouched"


def test_balanced_ids_come_from_the_equipartition_of_the_whole_set():
    model = tiny_swav_model(seed=2)
    x = images(48, 3)
    balanced = assign_clusters(model, [x[:20], x[20:]], balanced=True)
    model.eval()
    expected = classic_sinkhorn(scores_by_hand(model, x), 3, 0.05).argmax(dim=1)
    assert torch.equal(balanced, expected)
    plain = assign_clusters(model, [x])
    sizes = lambda ids: torch.bincount(ids, minlength=12).max().item()  # noqa: E731
    assert sizes(balanced) < sizes(plain), "the equipartition spreads the images over more prototypes"


def _two_rank_worker(rank, balanced):
    model = tiny_swav_model(seed=2)
    x = images(30, 4)
    shard = x[:18] if rank == 0 else x[18:]  # ranks may hold different numbers of images
    ids = assign_clusters(model, [shard[:10], shard[10:]] if rank == 0 else [shard], balanced=balanced)
    model.eval()
    scores = scores_by_hand(model, x)
    expected = classic_sinkhorn(scores, 3, 0.05).argmax(dim=1) if balanced else scores.argmax(dim=1)
    assert torch.equal(ids, expected), "the ranks' ids, in rank order, are those of one process on all images"


@pytest.mark.distributed
@pytest.mark.parametrize("balanced", [False, True])
def test_two_ranks_each_with_their_shard_get_the_ids_of_one_process(balanced):
    spawn_gloo(_two_rank_worker, balanced)


def test_bad_inputs_get_one_clear_error():
    model = tiny_swav_model()
    with pytest.raises(ValueError, match="data yielded no images"):
        assign_clusters(model, [])
    model.train()
    with pytest.raises(ValueError, match=r"batch 1 of data holds no images.*got \(0, 3, 8, 8\)"):
        assign_clusters(model, [images(2, 0), images(0, 0)])
    assert model.training, "the model's mode is restored when a batch is refused"
    with pytest.raises(ValueError, match=r"batch 0 of data holds no images.*got str"):
        assign_clusters(model, ["cat.jpg"])
    with pytest.raises(TypeError, match="model must be an ignite_swav.SwAVModel"):
        assign_clusters(model.backbone, [images(2, 0)])
    with pytest.raises(TypeError, match="balanced must be a bool"):
        assign_clusters(model, [images(2, 0)], balanced="yes")


def test_every_module_comes_back_in_its_own_mode_after_an_evaluation():
    """A BatchNorm frozen in eval mode inside a model in training mode stays frozen after each evaluation tool."""
    from ignite_swav import create_knn_evaluator, extract_features

    model = tiny_swav_model()
    model.train()
    model.backbone.bn.eval()  # frozen statistics, as fine-tuning recipes do
    images = torch.randn(6, 3, 16, 16)
    labelled = [(images, torch.tensor([0, 1, 0, 1, 0, 1]))]
    assign_clusters(model, [images])
    extract_features(model.backbone, labelled)
    create_knn_evaluator(model.backbone, labelled, k=1).run(labelled)
    assert model.training and model.backbone.training and model.projection.training
    assert not model.backbone.bn.training
