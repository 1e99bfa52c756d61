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

pytestmark = pytest.mark.slow

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
        "holds another model than --arch small_resnet",
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
    handler.queue.rows = torch.nn.functional.normalize(torch.randn(2, 8, 8), dim=2)
    kept = handler.queue.rows.clone()
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
        assert torch.equal(handler.queue.rows, kept)


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


class _Calls:
    """Unpickling this calls ``function(*arguments)``: the payload of a hostile pickle."""

    def __init__(self, function, *arguments) -> None:
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return (self.function, self.arguments)


@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("callable_name", ["exec", "eval"])
def test_pickles_of_other_protocols_calling_builtins_are_refused_naming_them(tmp_path, protocol, callable_name):
    import builtins
    import pickle

    marker = tmp_path / "code_ran"
    path = tmp_path / f"{callable_name}{protocol}.pt"
    payload = _Calls(getattr(builtins, callable_name), f"open({str(marker)!r}, 'w')")
    path.write_bytes(pickle.dumps({"model": payload}, protocol=protocol))
    with pytest.raises(ValueError) as refused:
        load_checkpoint_file(path)
    message = str(refused.value)
    assert f"refers to 'builtins.{callable_name}'" in message and "refused without running" in message
    assert "weights_only" not in message  # torch's advice (load with weights_only=False) would run the file
    assert not marker.exists()


def test_a_codecs_gadget_is_named_and_torchs_advice_never_quoted(tmp_path):
    import _codecs
    import pickle

    path = tmp_path / "gadget.pt"
    path.write_bytes(pickle.dumps({"model": _Calls(_codecs.encode, "payload", "rot13")}, protocol=4))
    with pytest.raises(ValueError, match=r"refers to '_codecs.encode'") as refused:
        load_checkpoint_file(path)
    assert "weights_only" not in str(refused.value)


def test_a_hostile_pickle_padded_with_a_large_object_is_scanned_without_reading_it_whole(tmp_path):
    import pickle
    import tracemalloc

    path = tmp_path / "padded.pt"
    padding = b"\0" * (200 * 2**20)  # 200 MB (the probe used 1.5 GB)
    path.write_bytes(pickle.dumps({"padding": padding, "model": _Calls(os.mkdir, str(tmp_path / "x"))}, protocol=4))
    del padding
    tracemalloc.start()
    with pytest.raises(ValueError, match="refers to 'posix.mkdir'"):
        load_checkpoint_file(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MB held to refuse the file"


def test_a_damaged_compression_method_is_one_line_not_zipfiles_error(tmp_path):
    import struct

    path = tmp_path / "method.pt"
    torch.save({"a": torch.zeros(10)}, path)
    data = bytearray(path.read_bytes())
    local, central = data.find(b"PK\x03\x04"), data.find(b"PK\x01\x02")
    data[local + 8 : local + 10] = data[central + 10 : central + 12] = struct.pack("<H", 99)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="cannot be read, it is truncated or corrupted"):
        load_checkpoint_file(path)


def _queue_state(queue, **changes):
    return {"queue": queue, "feat_dim": 16, "num_crops": 2, "queue_length": 32, "version": 1, **changes}


def test_a_queue_state_of_an_unknown_version_is_refused():
    handler = SwAVQueueHandler(SwAVLoss(), batch_size=4, feat_dim=16, queue_length=32)
    with pytest.raises(ValueError, match="format version 7; this ignite-swav reads version 1"):
        handler.load_state_dict(_queue_state(torch.zeros(2, 32, 16), version=7))
    assert handler.queue.rows is None


def test_an_expanded_queue_is_refused_before_its_values_are_touched(tmp_path):
    import tracemalloc

    path = tmp_path / "expanded.pt"
    torch.save({"queue_handler": _queue_state(torch.zeros(1).expand(2, 50_000_000, 16))}, path)
    assert path.stat().st_size < 10_000  # a small file claiming 6.4 GB of rows
    handler = SwAVQueueHandler(SwAVLoss(), batch_size=4, feat_dim=16, queue_length=32)
    tracemalloc.start()
    with pytest.raises(ValueError, match=r"claims \(2, 50000000, 16\) values but its storage holds 1"):
        from ignite_swav import load_objects

        load_objects({"queue_handler": handler}, path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20 and handler.queue.rows is None


def test_optimizer_entries_of_another_kind_are_refused_at_load():
    from ignite_swav import load_objects

    model = torch.nn.Linear(2, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    adam.step()
    with pytest.raises(ValueError, match="is the state of another optimizer than SGD: it has the settings"):
        load_objects({"optimizer": sgd}, {"optimizer": adam.state_dict()})
    state = sgd.state_dict()
    state["param_groups"][0]["lr"] = "0.1"
    with pytest.raises(ValueError, match="the setting 'lr' is '0.1', where the optimizer has 0.1"):
        load_objects({"optimizer": sgd}, {"optimizer": state})
    state["param_groups"][0]["lr"], state["param_groups"][0]["nesterov"] = 0.1, "yes"
    with pytest.raises(ValueError, match="the setting 'nesterov' is 'yes'"):
        load_objects({"optimizer": sgd}, {"optimizer": state})
