"""Settings known to fail are named before the first step (check_settings, and the trainer when a run starts);
the published recipes and the main job say nothing."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from helpers import tiny_swav_model
from torch.utils.data import DataLoader, TensorDataset

from ignite_swav import SwAVLoss, SwAVQueueHandler, check_settings, create_swav_trainer

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
# images each data set's pretraining split holds (ImageNet for the ImageFolder recipes)
DATA_LENGTHS = {"mnist5k": 3500, "digits": 1257, "cifar10": 50_000, "stl10": 100_000, "imagefolder": 1_281_167}


def configs() -> list[tuple[str, dict]]:
    common = json.loads((CONFIGS / "common.json").read_text())
    found = []
    for path in sorted((CONFIGS / "datasets").glob("*.json")):
        found.append((f"dataset {path.stem}", {**common, "dataset": path.stem, **json.loads(path.read_text())}))
    for path in sorted((CONFIGS / "recipes").glob("*.json")):
        found.append((f"recipe {path.stem}", {**common, **json.loads(path.read_text())}))
    return found


@pytest.mark.parametrize("name,config", configs(), ids=[name for name, _ in configs()])
def test_the_published_recipes_and_the_main_job_say_nothing(name, config):
    loss_fn = SwAVLoss(epsilon=config["epsilon"], temperature=config["temperature"])
    warnings = check_settings(
        loss_fn,
        batch_size=config["batch_size"],
        num_prototypes=config["num_prototypes"],
        world_size=config.get("expected_world_size") or 1,
        data_length=DATA_LENGTHS[config.get("dataset", "imagefolder")],
        epochs=config["epochs"],
        queue_length=config["queue_length"],
        epoch_queue_starts=config["epoch_queue_starts"],
        freeze_prototypes_iters=config["freeze_prototypes_iters"],
    )
    assert warnings == []


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"batch_size": 8, "num_prototypes": 300}, r"num_prototypes=300: .* 8 rows .* at most 16 prototypes"),
        ({"batch_size": 16, "num_prototypes": 3000}, r"num_prototypes=3000: .*so that batch \+ queue >= 3000"),
        (
            {"batch_size": 16, "num_prototypes": 20, "queue_length": 1000, "data_length": 160},
            r"queue_length=1000: .* than the data set has images \(160\), .* about 6.2 times",
        ),
        ({"epsilon": 0.005}, r"epsilon=0.005 is outside the published range 0.01-0.1 \(hard codes\)"),
        ({"epsilon": 0.5}, r"epsilon=0.5 is outside .*close to uniform"),
        ({"temperature": 1.0}, r"temperature=1 is outside 0.05-0.5"),
        (
            {"queue_length": 256, "epoch_queue_starts": 0, "freeze_prototypes_iters": 0},
            r"queue_length=256 from epoch 0 with prototypes that train from the first step",
        ),
    ],
)
def test_each_known_bad_setting_is_named_with_its_number_and_the_fix(settings, message):
    settings = {"batch_size": 64, "num_prototypes": 100, **settings}
    loss_fn = SwAVLoss(epsilon=settings.pop("epsilon", 0.05), temperature=settings.pop("temperature", 0.1))
    warnings = check_settings(loss_fn, world_size=1, **settings)
    assert len(warnings) == 1, warnings
    assert re.search(message, warnings[0]), warnings[0]


def test_settings_that_cannot_work_are_errors():
    with pytest.raises(ValueError, match=r"batch_size=1 on each process: .* use 16 or more"):
        check_settings(SwAVLoss(), batch_size=1, num_prototypes=10)
    with pytest.raises(ValueError, match=r"queue_length=4096 can never be filled: the 1 epoch\(s\) .* push 960 rows"):
        check_settings(
            SwAVLoss(), batch_size=64, num_prototypes=10, data_length=1000, epochs=3, queue_length=4096,
            epoch_queue_starts=2, world_size=1,
        )  # fmt: skip
    # a run that ends before its queue starts is not an error (a short try of a long recipe)
    kwargs = {"data_length": 1000, "epochs": 2, "queue_length": 4096, "epoch_queue_starts": 2, "world_size": 1}
    said = check_settings(SwAVLoss(), batch_size=64, num_prototypes=10, **kwargs)
    assert [w.split(":")[0] for w in said] == ["queue_length=4096"]  # said, not refused


def test_the_queue_handlers_settings_are_taken_by_default():
    loss_fn = SwAVLoss()
    SwAVQueueHandler(loss_fn, queue_length=3000, epoch_queue_starts=1)
    assert check_settings(loss_fn, batch_size=16, num_prototypes=3000, world_size=1) == []  # 16 + 2992 rows
    assert (
        "from epoch 0"
        in check_settings(
            loss_fn, batch_size=16, num_prototypes=100, world_size=1, epoch_queue_starts=0, freeze_prototypes_iters=0
        )[0]
    )


def test_the_trainer_says_them_once_when_a_run_starts(caplog):
    model = tiny_swav_model(num_prototypes=300)
    trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), SwAVLoss(epsilon=0.5))
    images = TensorDataset(*[torch.randn(16, 3, 8, 8) for _ in range(2)])
    loader = DataLoader(images, batch_size=8, collate_fn=lambda batch: [torch.stack([b[0] for b in batch])] * 2)
    with caplog.at_level(logging.WARNING, logger="ignite_swav.settings"):
        trainer.run(loader, max_epochs=1)
        trainer.run(loader, max_epochs=2)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said  # the prototypes and epsilon, once each over both runs
    assert said[0].startswith("num_prototypes=300") and said[1].startswith("epsilon=0.5")
