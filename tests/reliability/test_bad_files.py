"""Bad files: every damaged, foreign or hostile checkpoint is refused with a clear message; no code from it runs
and nothing already on disk or in memory is overwritten."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_EXAMPLE_ARGS

from ignite_swav import SwAVLoss, SwAVQueueHandler, load_checkpoint_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import train_swav  # noqa: E402

TINY = [*TINY_EXAMPLE_ARGS, "--max-iters-per-epoch", "2", "--queue-length", "32", "--epoch-queue-starts", "0"]


class RunsCode:
    """Unpickling this creates a directory: the sign that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def good_run(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("good") / "run"
    assert train_swav.main([*TINY, "--epochs", "1", "--output-dir", str(output)]) == 0
    return output


def _flip_middle(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]


def _replace(checkpoint: dict, key: str, value) -> dict:
    return {**checkpoint, key: value}


def _queue_with(checkpoint: dict, **changes) -> dict:
    return _replace(checkpoint, "queue_handler", {**checkpoint["queue_handler"], **changes})


BAD_FILES = {
    "truncated": (lambda data, ckpt, marker: data[: len(data) // 2], "truncated or corrupted"),
    "corrupted bytes": (lambda data, ckpt, marker: _flip_middle(data), "corrupted"),
    "empty": (lambda data, ckpt, marker: b"", "is empty"),
    "not a torch file": (lambda data, ckpt, marker: b"GIF89a" + bytes(100), "truncated or corrupted"),
    "runs code": (lambda data, ckpt, marker: _replace(ckpt, "history", RunsCode(marker)), "refused without running"),
    "runs code at the top": (lambda data, ckpt, marker: RunsCode(marker), "refused without running"),
    "another model": (
        lambda data, ckpt, marker: _replace(ckpt, "model", {"w": torch.zeros(3)}),
        "holds another model than --arch resnet18",
    ),
    "not a checkpoint of the script": (lambda data, ckpt, marker: {"model": {}}, "is not a checkpoint of this script"),
    "queue of another feat_dim": (
        lambda data, ckpt, marker: _queue_with(ckpt, queue=torch.zeros(2, 32, 8), feat_dim=8),
        "feat_dim",
    ),
    "queue with NaN": (
        lambda data, ckpt, marker: _queue_with(ckpt, queue=torch.full((2, 32, 16), float("nan"))),
        "NaN or infinite",
    ),
}


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_resume_from_a_bad_file_is_refused_and_nothing_is_touched(kind, good_run, tmp_path, capsys):
    output = tmp_path / "run"
    shutil.copytree(good_run, output)
    good_file = max(output.glob("swav_checkpoint_*.pt"))
    make, message = BAD_FILES[kind]
    marker = tmp_path / "code_ran"
    bad = make(good_file.read_bytes(), torch.load(good_file, weights_only=True), marker)
    bad_path = tmp_path / "bad.pt"
    if isinstance(bad, bytes):
        bad_path.write_bytes(bad)
    else:
        torch.save(bad, bad_path)
    before = _snapshot(output)

    status = train_swav.main([*TINY, "--epochs", "3", "--output-dir", str(output), "--resume-from", str(bad_path)])

    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and "Traceback" not in error
    assert not marker.exists()  # no code from the file ran
    assert _snapshot(output) == before  # no checkpoint, result or plot was written or removed


def test_a_missing_file_a_directory_a_fifo_or_a_link_loop_is_named(tmp_path, capsys):
    fifo, loop = tmp_path / "fifo", tmp_path / "loop"
    os.mkfifo(fifo)
    loop.symlink_to(loop)
    cases = {
        tmp_path / "nope.pt": "does not exist",
        tmp_path: "is not a file",
        fifo: "is not a file",
        loop: "is not a file",
    }
    for path, message in cases.items():
        assert train_swav.main([*TINY, "--output-dir", str(tmp_path / "o"), "--resume-from", str(path)]) == 2
        assert f"--resume-from '{path}' {message}" in capsys.readouterr().err
    # the library's loader says which kind of thing it is
    for path, message in ((tmp_path, "is a directory"), (fifo, "not a regular file"), (loop, "loop of links")):
        with pytest.raises(ValueError, match=message):
            load_checkpoint_file(path)
    with pytest.raises(TypeError, match="path must be a str or a pathlib.Path"):
        load_checkpoint_file(None)


def test_a_refused_queue_state_leaves_the_handler_queue_as_it_was():
    loss = SwAVLoss()
    handler = SwAVQueueHandler(loss, batch_size=4, epoch_queue_starts=0, feat_dim=8, queue_length=8)
    handler.queue = torch.nn.functional.normalize(torch.randn(2, 8, 8), dim=2)
    kept = handler.queue.clone()
    bad_states = [
        {"queue": torch.zeros(2, 8, 16), "feat_dim": 16, "num_crops": 2, "queue_length": 8, "version": 1},
        {"queue": torch.zeros(3, 8, 8), "feat_dim": 8, "num_crops": 3, "queue_length": 8, "version": 1},
        {"queue": torch.full((2, 8, 8), float("inf")), "feat_dim": 8, "num_crops": 2, "queue_length": 8, "version": 1},
        {"queue": "rows", "feat_dim": 8, "num_crops": 2, "queue_length": 8, "version": 1},
        {"not": "a queue state"},
    ]
    for state in bad_states:
        with pytest.raises((ValueError, TypeError)):
            handler.load_state_dict(state)
        assert torch.equal(handler.queue, kept)


def test_load_checkpoint_file_never_runs_the_code_of_a_hostile_file(tmp_path):
    marker = tmp_path / "code_ran"
    for name, payload in (("top.pt", RunsCode(marker)), ("nested.pt", {"a": [torch.zeros(1), RunsCode(marker)]})):
        torch.save(payload, tmp_path / name)
        with pytest.raises(ValueError, match="refers to 'posix.mkdir'.*refused without running any of its code"):
            load_checkpoint_file(tmp_path / name)
    assert not marker.exists()


def test_a_hostile_pickle_of_another_protocol_is_refused_naming_the_callable(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "protocol4.pt"
    torch.save({"model": RunsCode(marker)}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(ValueError, match="refers to 'posix.mkdir'.*refused without running any of its code"):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_a_queue_dirname_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="dirname='.*file' is a file, not a directory"):
        SwAVQueueHandler(SwAVLoss(), queue_length=8, dirname=tmp_path / "file")
