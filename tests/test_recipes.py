"""The published SwAV recipes in the example: presets against the reference scripts, --print-config, LARS as
LARC, and the learning rate set every iteration, also across a resume on another number of processes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import models  # noqa: E402
import swav_config  # noqa: E402
import train_swav  # noqa: E402

# Each script of facebookresearch/swav (scripts/<name>_pretrain.sh), value by value: flag -> value there.
# Their common flags: --nmb_crops 2 6 --size_crops 224 96 --min_scale_crops 0.14 0.05 --max_scale_crops 1. 0.14
# --crops_for_assign 0 1 --temperature 0.1 --epsilon 0.05 --sinkhorn_iterations 3 --feat_dim 128
# --nmb_prototypes 3000 --batch_size 64 --wd 0.000001 --arch resnet50 --use_fp16 true; SGD wrapped in LARC.
SCRIPTS = {
    "swav_100ep": {"gpus": 64, "queue_length": 0, "epochs": 100, "base_lr": 4.8, "final_lr": 0.0048,
                   "freeze_prototypes_niters": 313, "warmup_epochs": 10, "start_warmup": 0.3, "sync_bn": "apex"},
    "swav_200ep": {"gpus": 64, "queue_length": 0, "epochs": 200, "base_lr": 4.8, "final_lr": 0.0048,
                   "freeze_prototypes_niters": 313, "warmup_epochs": 10, "start_warmup": 0.3, "sync_bn": "apex"},
    "swav_400ep": {"gpus": 64, "queue_length": 0, "epochs": 400, "base_lr": 4.8, "final_lr": 0.0048,
                   "freeze_prototypes_niters": 313, "warmup_epochs": 10, "start_warmup": 0.3, "sync_bn": "apex"},
    "swav_800ep": {"gpus": 64, "queue_length": 0, "epochs": 800, "base_lr": 4.8, "final_lr": 0.0048,
                   "freeze_prototypes_niters": 313, "warmup_epochs": 10, "start_warmup": 0.3, "sync_bn": "apex"},
    "swav_200ep_bs256": {"gpus": 4, "queue_length": 3840, "epoch_queue_starts": 15, "epochs": 200, "base_lr": 0.6,
                         "final_lr": 0.0006, "freeze_prototypes_niters": 5005, "warmup_epochs": 0,
                         "sync_bn": "pytorch"},
    "swav_400ep_bs256": {"gpus": 4, "queue_length": 3840, "epoch_queue_starts": 15, "epochs": 400, "base_lr": 0.6,
                         "final_lr": 0.0006, "freeze_prototypes_niters": 5005, "warmup_epochs": 0,
                         "sync_bn": "pytorch"},
}  # fmt: skip


def resolved(*argv: str) -> dict:
    return swav_config.resolved_config(swav_config.parse_args(list(argv)))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_recipe_holds_every_value_of_its_script(name):
    script = SCRIPTS[name]
    config = resolved("--recipe", name)
    expected = {
        "dataset": "imagefolder",
        "arch": "resnet50",
        "size_crops": [224, 96],
        "num_crops": [2, 6],
        "min_scale_crops": [0.14, 0.05],
        "max_scale_crops": [1.0, 0.14],
        "temperature": 0.1,
        "epsilon": 0.05,
        "sinkhorn_iterations": 3,
        "feat_dim": 128,
        "hidden_dim": 2048,
        "num_prototypes": 3000,
        "batch_size": 64,
        "weight_decay": 1e-6,
        "optimizer": "lars",
        "momentum": 0.9,
        "amp": True,
        "sync_bn": True,
        "expected_world_size": script["gpus"],
        "queue_length": script["queue_length"],
        "epochs": script["epochs"],
        "lr": script["base_lr"],
        "final_lr": script["final_lr"],
        "freeze_prototypes_iters": script["freeze_prototypes_niters"],
        "warmup_epochs": script["warmup_epochs"],
        "warmup_start_lr": script.get("start_warmup", 0.0),
    }
    if "epoch_queue_starts" in script:
        expected["epoch_queue_starts"] = script["epoch_queue_starts"]
    assert {key: config[key] for key in expected} == expected
    # the crops of the data set follow the recipe
    data_crops = swav_config.crop_preset("imagefolder", **{k: tuple(config[k]) for k in swav_config.CROP_KEYS})
    assert data_crops.size_crops == (224, 96) and data_crops.num_crops == (2, 6)


def test_flags_on_the_command_line_override_the_recipe():
    config = resolved("--recipe", "swav_800ep", "--epochs", "5", "--lr", "1.2", "--optimizer", "sgd", "--no-amp")
    assert (config["epochs"], config["lr"], config["optimizer"], config["amp"]) == (5, 1.2, "sgd", False)
    assert config["final_lr"] == 0.0048  # not given: the recipe's
    assert resolved("--recipe", "swav_200ep_bs256", "--dataset", "cifar10")["dataset"] == "cifar10"


def test_print_config_prints_one_json_object_and_touches_no_data(tmp_path: Path, capsys, monkeypatch):
    touched = []
    monkeypatch.setattr(train_swav, "build_data", lambda args: touched.append(args))
    monkeypatch.setattr(train_swav.idist, "Parallel", lambda **kwargs: touched.append(kwargs))
    output = tmp_path / "never_created"
    status = train_swav.main(["--recipe", "swav_400ep_bs256", "--print-config", "--output-dir", str(output)])
    assert status == 0 and not touched and not output.exists()
    config = json.loads(capsys.readouterr().out)
    for key in (
        "epochs",
        "batch_size",
        "lr",
        "final_lr",
        "warmup_epochs",
        "weight_decay",
        "num_prototypes",
        "feat_dim",
    ):
        assert key in config
    for key in ("queue_length", "epoch_queue_starts", "freeze_prototypes_iters", "temperature", "epsilon"):
        assert key in config
    assert config["optimizer"] == "lars" and config["sync_bn"] is True and config["epochs"] == 400


def test_help_shows_the_real_default_of_every_flag(capsys):
    with pytest.raises(SystemExit):
        swav_config.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: None" not in text
    assert "(default: mnist5k: 50, digits: 42, cifar10/stl10: 200, imagefolder: 100; --recipe: the value of" in text
    assert "--recipe: the value of its script" in text


def lars_step_by_the_larc_formula(param, grad, buffer, lr, momentum, weight_decay, trust=0.001, eps=1e-8):
    """One step of SGD wrapped in apex's LARC (clip=False), from its formula: the gradient plus weight decay,
    scaled by trust * |w| / (|g| + wd |w| + eps), then SGD with momentum at the group's learning rate."""
    w_norm, g_norm = param.norm(), grad.norm()
    scaled = grad.clone()
    if w_norm > 0 and g_norm > 0:
        adaptive = trust * w_norm / (g_norm + w_norm * weight_decay + eps)
        scaled = (grad + weight_decay * param) * adaptive
    buffer = scaled if buffer is None else momentum * buffer + scaled
    return param - lr * buffer, buffer


def test_lars_is_the_references_larc_on_small_tensors():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 3, generator=g), torch.randn(5, generator=g) * 0.01]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    args = swav_config.parse_args(["--recipe", "swav_800ep", "--output-dir", "/tmp"])
    optimizer = models.build_optimizer(torch.nn.ParameterList(params), args)
    expected = [w.clone() for w in weights]
    buffers = [None, None]
    for step in range(2):
        grads = [torch.randn(w.shape, generator=g) for w in weights]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()
        for i, grad in enumerate(grads):
            expected[i], buffers[i] = lars_step_by_the_larc_formula(expected[i], grad, buffers[i], 4.8, 0.9, 1e-6)
        for p, e in zip(params, expected):
            assert torch.allclose(p.detach(), e, rtol=1e-5, atol=1e-7), step


def test_a_missing_timm_is_one_line_naming_the_extra(monkeypatch, capsys):
    import importlib

    real = importlib.import_module

    def without_timm(name, *args, **kwargs):
        if name.startswith("timm"):
            raise ImportError("No module named 'timm'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_timm)
    assert train_swav.main(["--dataset", "digits", "--optimizer", "lars", "--output-dir", "/tmp/unused"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: --optimizer lars needs the package 'timm', which is not installed: pip install 'ignite-swav[lars]'"
    )


def reference_lr(iteration: int, epoch_length: int, args) -> float:
    """facebookresearch/swav's schedule at 0-based ``iteration``: linspace warm-up, then cosine."""
    warmup = args.warmup_epochs * epoch_length
    if iteration < warmup:
        return args.warmup_start_lr + (args.lr - args.warmup_start_lr) * iteration / max(warmup - 1, 1)
    total = (args.epochs - args.warmup_epochs) * epoch_length
    t = iteration - warmup
    return args.final_lr + 0.5 * (args.lr - args.final_lr) * (1 + math.cos(math.pi * t / total))


def test_the_learning_rate_is_set_every_iteration_on_the_references_curve():
    from ignite.engine import Engine, Events

    args = swav_config.parse_args(["--recipe", "swav_800ep", "--epochs", "6", "--warmup-epochs", "2"])
    epoch_length = 5
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=args.lr)
    trainer = Engine(lambda engine, batch: None)
    models.attach_lr_schedule(trainer, optimizer, args, epoch_length)
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(optimizer.param_groups[0]["lr"]))
    trainer.run(range(epoch_length), max_epochs=args.epochs)
    expected = [reference_lr(i, epoch_length, args) for i in range(args.epochs * epoch_length)]
    assert seen == pytest.approx(expected, rel=1e-9)
    assert seen[0] == pytest.approx(0.3) and seen[9] == pytest.approx(4.8) and seen[10] == pytest.approx(4.8)


def test_a_resume_on_another_epoch_length_continues_the_curve_at_the_same_fraction_of_the_run():
    from ignite.engine import Engine, Events

    from ignite_swav import load_objects

    args = swav_config.parse_args(["--recipe", "swav_800ep", "--epochs", "6", "--warmup-epochs", "2"])
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=args.lr)
    # 3 epochs of 10 iterations (1 process), then resumed with 5 iterations per epoch (2 processes)
    first = Engine(lambda engine, batch: None)
    schedulers = models.attach_lr_schedule(first, optimizer, args, 10)
    first.run(range(10), max_epochs=3)
    checkpoint = {"trainer": first.state_dict(), **{k: s.state_dict() for k, s in schedulers.items()}}
    resumed = Engine(lambda engine, batch: None)
    resumed_schedulers = models.attach_lr_schedule(resumed, optimizer, args, 5)
    load_objects({"trainer": resumed, **resumed_schedulers}, checkpoint, epoch_length=5)
    assert resumed.state.iteration == 15 and resumed.state.epoch_length == 5
    seen = []
    resumed.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(optimizer.param_groups[0]["lr"]))
    resumed.run(range(5), max_epochs=6)
    assert seen == pytest.approx([reference_lr(i, 5, args) for i in range(15, 30)], rel=1e-9)


def test_a_recipe_is_a_file_of_settings_and_adding_one_means_adding_a_file(tmp_path: Path, capsys):
    mine = tmp_path / "my_recipe.json"
    mine.write_text(json.dumps({"_about": "a shorter 200-epoch run", "epochs": 50, "lr": 0.3, "queue_length": 1920}))
    config = resolved("--recipe", str(mine), "--dataset", "cifar10")
    assert (config["recipe"], config["epochs"], config["lr"], config["queue_length"]) == (str(mine), 50, 0.3, 1920)
    assert config["num_prototypes"] == 1000  # the rest: the data set's defaults
    assert sorted(swav_config.RECIPES) == sorted(p.stem for p in (swav_config.CONFIGS / "recipes").glob("*.json"))
    mine.write_text(json.dumps({"epochs": 50, "learning_rate": 0.3}))
    assert train_swav.main(["--recipe", str(mine), "--print-config"]) == 2
    assert "has settings no flag of this script sets: ['learning_rate']" in capsys.readouterr().err
    assert train_swav.main(["--recipe", "swav_1600ep", "--print-config"]) == 2
    assert "'swav_1600ep' is neither a published recipe" in capsys.readouterr().err


def test_print_config_prints_every_setting_flag_of_the_parser():
    parser = swav_config.build_parser()
    flags = {a.dest for a in parser._actions if a.dest in parser.get_default("setting_keys")}
    config = resolved()
    assert set(config) == {"recipe", "seed", *flags} and len(flags) > 30
