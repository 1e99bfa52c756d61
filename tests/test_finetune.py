"""examples/finetune.py: the paper's semi-supervised protocol on a checkpoint of train_swav.py. The labelled
images are class-balanced and drawn by the seed from the training split only; the held-out split is never read
while a network trains; the three arms see the same labelled images; bad arguments are one line and exit 2."""

from __future__ import annotations

import io
import json
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from helpers import TINY_EXAMPLE_ARGS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import finetune  # noqa: E402
import train_swav  # noqa: E402
from swav_config import ExampleError  # noqa: E402

TINY = [*TINY_EXAMPLE_ARGS, "--max-iters-per-epoch", "2", "--queue-length", "0", "--epochs", "1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("pretrained")
    with redirect_stdout(io.StringIO()):
        assert train_swav.main([*TINY, "--output-dir", str(output)]) == 0
    return sorted(output.glob("swav_checkpoint_*.pt"))[-1]


def test_the_labelled_images_are_class_balanced_and_drawn_by_the_seed():
    labels = torch.arange(10).repeat_interleave(350)  # MNIST 5k's training split: 350 images a class
    chosen = finetune.labelled_subset(labels, 0.01, seed=0)
    assert len(chosen) == 35 and len(set(chosen)) == 35
    counts = torch.bincount(labels[chosen], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 35
    assert chosen == finetune.labelled_subset(labels, 0.01, seed=0)  # the seed decides
    assert chosen != finetune.labelled_subset(labels, 0.01, seed=1)
    assert torch.bincount(labels[finetune.labelled_subset(labels, 0.1, seed=2)]).tolist() == [35] * 10
    with pytest.raises(ExampleError, match=r"gives 5 labelled image\(s\) for 10 classes: at least one per class"):
        finetune.labelled_subset(labels, 5 / 3500, seed=0)


@pytest.mark.slow
def test_the_held_out_split_is_never_read_while_a_network_trains_and_the_arms_share_their_images(
    checkpoint, monkeypatch
):
    from ignite.engine import Engine

    read_while_training, training, seen = [], [False], []
    original_run = Engine.run

    def watched_run(self, data, *args, **kwargs):
        is_trainer = isinstance(getattr(data, "dataset", None), finetune.Shifted)
        if is_trainer:
            seen.append(sorted(data.dataset.images.indices))
        training[0] = is_trainer
        try:
            return original_run(self, data, *args, **kwargs)
        finally:
            training[0] = False

    original_build = finetune.backbones

    def watched_backbones(args):
        backbone, random_backbone, data, dataset, epochs = original_build(args)
        heldout = data.heldout

        class Watched(torch.utils.data.Dataset):
            def __len__(self):
                return len(heldout)

            def __getitem__(self, index):
                read_while_training.append(training[0])
                return heldout[index]

        data.heldout = Watched()
        return backbone, random_backbone, data, dataset, epochs

    monkeypatch.setattr(Engine, "run", watched_run)
    monkeypatch.setattr(finetune, "backbones", watched_backbones)
    pixels = []
    original_pixels = finetune.pixels_top1
    monkeypatch.setattr(
        finetune,
        "pixels_top1",
        lambda labelled, heldout, seed: pixels.append(labelled.indices) or original_pixels(labelled, heldout, seed),
    )
    out = io.StringIO()
    with redirect_stdout(out):
        assert finetune.main(["--checkpoint", str(checkpoint), "--label-fraction", "0.05", "--steps", "3"]) == 0
    results = json.loads(out.getvalue())
    assert {"top1_swav", "top1_scratch", "top1_pixels", "label_fraction", "num_labels", "seed"} <= set(results)
    assert results["num_labels"] == 63 and results["label_fraction"] == 0.05
    assert read_while_training and not any(read_while_training)  # read, and only to score the trained networks
    assert len(seen) == 2 and seen[0] == seen[1] == sorted(pixels[0])  # SwAV, scratch and pixels: the same images


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv,message",
    [
        (["--label-fraction", "0"], r"--label-fraction must be in \(0, 1\], got 0"),
        (["--label-fraction", "1.5"], r"--label-fraction must be in \(0, 1\], got 1.5"),
        (["--label-fraction", "0.001"], r"gives 1 labelled image\(s\) for 10 classes"),
    ],
)
def test_a_bad_fraction_is_one_line_and_exit_2(checkpoint, capsys, argv, message):
    assert finetune.main(["--checkpoint", str(checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.slow
def test_a_missing_file_or_a_checkpoint_of_another_architecture_is_one_line_and_exit_2(tmp_path, capsys):
    assert finetune.main(["--checkpoint", str(tmp_path / "none.pt"), "--label-fraction", "0.1"]) == 2
    assert "--checkpoint '" in capsys.readouterr().err
    from test_pretrained import released_checkpoint

    release = tmp_path / "release.pth"
    torch.save(released_checkpoint(arch="resnet18", hidden=64, out=16, prototypes=(30,)), release)
    argv = ["--checkpoint", str(release), "--dataset", "digits", "--arch", "resnet50", "--label-fraction", "0.1"]
    assert finetune.main(argv) == 2
    err = capsys.readouterr().err
    assert "does not hold a resnet50 backbone" in err and len(err.strip().splitlines()) == 1


def test_the_label_efficiency_plot_is_drawn_from_the_runs(tmp_path):
    import plot_finetune

    files = []
    for seed in (0, 1):
        for fraction in (0.01, 0.1, 1.0):
            run = {"label_fraction": fraction, "seed": seed, "dataset": "mnist5k"}
            run |= {"top1_swav": 0.9 + fraction / 20, "top1_scratch": 0.5 + fraction / 3, "top1_pixels": 0.6}
            files.append(tmp_path / f"{seed}_{fraction}.json")
            files[-1].write_text(json.dumps(run))
    target = tmp_path / "plot.png"
    assert plot_finetune.main([*map(str, files), "--output", str(target)]) == 0
    assert target.stat().st_size > 10_000
