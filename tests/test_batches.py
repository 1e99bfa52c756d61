"""One rule for what a batch holds (ignite_swav._batches.split_batch), the same for the trainer, the online probe
and the cluster assignment: a (data, 1-D target) pair, or the data alone."""

import pytest
import torch
from ignite.engine import Engine
from torch import nn

from ignite_swav import OnlineLinearProbe, prepare_image_batch, prepare_multicrop_batch
from ignite_swav._batches import split_batch

CROPS = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4)]  # two crop batches: data, not a (data, target) pair
TARGET = torch.tensor([3, 4])


@pytest.mark.parametrize(
    "batch,has_target",
    [
        (CROPS, False),
        ((CROPS, TARGET), True),
        (torch.zeros(2, 3, 8, 8), False),
        ((torch.zeros(2, 3, 8, 8), TARGET), True),
    ]
    + [([torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)], False), ((CROPS, torch.zeros(2, 2)), False)],
)
def test_a_pair_is_data_and_a_1d_target_and_anything_else_is_data(batch, has_target):
    data, target = split_batch(batch)
    assert (target is TARGET) == has_target and (data is batch) != has_target


def test_the_trainer_s_preparations_and_the_probe_split_batches_alike():
    assert prepare_multicrop_batch(CROPS)[1] is None and prepare_multicrop_batch((CROPS, TARGET))[1] is TARGET
    assert prepare_image_batch((torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TARGET))[1].tolist() == [3, 4]
    probe = OnlineLinearProbe(nn.Flatten(), num_classes=5)
    engine = Engine(lambda e, b: None)
    engine.state.batch = CROPS  # before 1.0 the probe took the second crop for labels
    with pytest.raises(ValueError, match="no labels in the trainer's batch"):
        probe.train_step(engine)
