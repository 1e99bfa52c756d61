import pytest
import torch
import torch.nn.functional as F
from ignite.exceptions import NotComputableError
from torch import nn

from ignite_swav import KNNAccuracy, create_knn_evaluator, extract_features


def clusters(n_per_class: int, centres: torch.Tensor, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    features = torch.cat([c + noise * torch.randn(n_per_class, centres.shape[1], generator=g) for c in centres])
    labels = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return features, labels


def test_separated_clusters_are_classified_perfectly():
    centres = torch.eye(4) * 5
    metric = KNNAccuracy(k=5)
    metric.set_reference(*clusters(10, centres, 0.1, seed=0))
    metric.update(clusters(6, centres, 0.1, seed=1))
    assert metric.compute() == 1.0


def test_weighted_vote_follows_the_nearest_neighbours():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # k=1: the nearest (class 0) wins; k=3 with a high temperature: two votes for class 1 outweigh it
    near = KNNAccuracy(k=1)
    near.set_reference(bank, labels)
    near.update((query, torch.tensor([0])))
    assert near.compute() == 1.0
    flat = KNNAccuracy(k=3, temperature=100.0)
    flat.set_reference(bank, labels)
    flat.update((query, torch.tensor([0])))
    assert flat.compute() == 0.0
    # a low temperature weighs similarity sharply: the nearest wins again
    sharp = KNNAccuracy(k=3, temperature=0.01)
    sharp.set_reference(bank, labels)
    sharp.update((query, torch.tensor([0])))
    assert sharp.compute() == 1.0


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(0)
    metric = KNNAccuracy()
    metric.set_reference(torch.randn(500, 8, generator=g), torch.randint(0, 2, (500,), generator=g))
    metric.update((torch.randn(2000, 8, generator=g), torch.randint(0, 2, (2000,), generator=g)))
    assert 0.45 < metric.compute() < 0.55


def test_errors():
    with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
        KNNAccuracy(k=0)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        KNNAccuracy(temperature=0)
    metric = KNNAccuracy()
    with pytest.raises(RuntimeError, match="no reference bank: call set_reference"):
        metric.update((torch.zeros(1, 2), torch.zeros(1)))
    with pytest.raises(ValueError, match=r"the reference needs \(M, F\) features and \(M,\) labels"):
        metric.set_reference(torch.zeros(3, 2), torch.zeros(2))
    metric.set_reference(torch.eye(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"features must be \(N, 2\) like the bank"):
        metric.update((torch.zeros(1, 3), torch.zeros(1)))
    with pytest.raises(NotComputableError):
        metric.compute()


def test_evaluator_embeds_the_reference_with_the_backbone_each_run():
    centres = torch.eye(3) * 4
    ref = clusters(8, centres, 0.2, seed=0)
    held = clusters(5, centres, 0.2, seed=1)
    backbone = nn.Linear(3, 3)
    with torch.no_grad():
        backbone.weight.copy_(torch.eye(3))
        backbone.bias.zero_()
    reference_loader = [(ref[0][i : i + 6], ref[1][i : i + 6]) for i in range(0, 24, 6)]
    heldout_loader = [(held[0][i : i + 5], held[1][i : i + 5]) for i in range(0, 15, 5)]
    evaluator = create_knn_evaluator(backbone, reference_loader, k=3)
    backbone.train()
    evaluator.run(heldout_loader)
    assert evaluator.state.metrics["knn_top1"] == 1.0
    assert backbone.training  # mode restored
    # a backbone that maps everything to one point cannot tell classes apart: the next run sees it
    with torch.no_grad():
        backbone.weight.zero_()
        backbone.bias.fill_(1.0)
    evaluator.run(heldout_loader)
    assert evaluator.state.metrics["knn_top1"] < 1.0


def test_extract_features_runs_in_eval_mode_and_restores_the_mode_also_on_error():
    backbone = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.9)).train()
    x = torch.ones(4, 3)
    features, _ = extract_features(backbone, [(x, torch.zeros(4))])
    torch.testing.assert_close(features, F.normalize(backbone[0](x).detach(), dim=1))  # no dropout: eval mode
    assert backbone.training
    with pytest.raises(TypeError):
        extract_features(backbone, [("not", "a batch")])
    assert backbone.training
    backbone.eval()
    extract_features(backbone, [(x, torch.zeros(4))])
    assert not backbone.training


def test_extract_features_refuses_an_empty_loader():
    with pytest.raises(ValueError, match="the loader gave no batch"):
        extract_features(nn.Identity(), [])


def test_recalibrated_batchnorm_uses_the_statistics_of_the_given_images():
    from ignite_swav import recalibrate_batchnorm

    backbone = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    backbone.train()
    data = [(torch.randn(50, 3) * 2 + 4, torch.zeros(50)) for _ in range(4)]
    copy = recalibrate_batchnorm(backbone, data)
    with torch.no_grad():
        outputs = torch.cat([backbone[0](x) for x, _ in data])
    assert torch.allclose(copy[1].running_mean, outputs.mean(0), atol=1e-5)
    assert not copy.training and backbone.training
    assert torch.equal(backbone[1].running_mean, torch.zeros(3))  # the original is untouched
    plain = nn.Linear(3, 3)
    assert recalibrate_batchnorm(plain, data) is plain


def test_evaluator_with_recalibrated_batchnorm():
    centres = torch.eye(3) * 4
    ref = clusters(8, centres, 0.2, seed=0)
    held = clusters(5, centres, 0.2, seed=1)
    backbone = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    evaluator = create_knn_evaluator(backbone, [ref], k=3, recalibrate_bn=True)
    evaluator.run([held])
    assert evaluator.state.metrics["knn_top1"] == 1.0
    assert torch.equal(backbone[1].running_mean, torch.zeros(3))


def test_knn_accuracy_takes_metrics_arguments_and_attaches_like_any_ignite_metric():
    from ignite.engine import Engine

    centres = torch.eye(3) * 4
    metric = KNNAccuracy(k=3, output_transform=lambda out: (out["f"], out["y"]), device="cpu", skip_unrolling=True)
    metric.set_reference(*clusters(8, centres, 0.2, seed=0))
    held = clusters(5, centres, 0.2, seed=1)
    engine = Engine(lambda e, batch: {"f": batch[0], "y": batch[1]})
    metric.attach(engine, "knn")
    assert engine.run([held]).metrics["knn"] == 1.0


def test_the_evaluator_mirrors_create_supervised_evaluator():
    centres = torch.eye(3) * 4
    ref = clusters(8, centres, 0.2, seed=0)
    held = clusters(5, centres, 0.2, seed=1)
    # batches as dicts: a prepare_batch in Ignite's form picks (x, y) and moves them
    as_dicts = [{"image": x, "label": y} for x, y in (ref, held)]
    prepared = []

    def prepare_batch(batch, device, non_blocking):
        prepared.append((device, non_blocking))
        return batch["image"].to(device), batch["label"].to(device)

    class TwoHeads(nn.Module):
        def forward(self, x):
            return {"features": x, "other": -x}

    seen = []
    evaluator = create_knn_evaluator(
        TwoHeads(),
        [as_dicts[0]],
        device="cpu",
        non_blocking=True,
        prepare_batch=prepare_batch,
        model_transform=lambda out: out["features"],
        output_transform=lambda x, y, y_pred: seen.append(x.shape) or (y_pred, y),
        amp_mode="amp",
        k=3,
        metric_name="top1",
    )
    assert evaluator.run([as_dicts[1]]).metrics["top1"] == 1.0
    assert prepared == [("cpu", True), ("cpu", True)] and seen == [torch.Size([15, 3])]
    with pytest.raises(ValueError, match="amp_mode must be None or 'amp'"):
        create_knn_evaluator(TwoHeads(), [as_dicts[0]], amp_mode="apex")


def test_nan_features_and_negative_labels_are_errors_not_numbers():
    metric = KNNAccuracy(k=1)
    metric.set_reference(torch.eye(2), torch.tensor([0, 1]))
    metric.update((torch.tensor([[float("nan"), 0.1], [0.2, 0.8]]), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="KNNAccuracy was given NaN or infinite features, or negative labels"):
        metric.compute()
    metric.reset()
    metric.update((torch.eye(2), torch.tensor([-1, 1])))
    with pytest.raises(ValueError, match="negative labels"):
        metric.compute()
    with pytest.raises(ValueError, match="the reference labels must be >= 0 \\(class indices\\), got -1"):
        metric.set_reference(torch.eye(2), torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match="the reference features hold NaN or infinite values"):
        metric.set_reference(torch.full((2, 2), float("inf")), torch.tensor([0, 1]))
