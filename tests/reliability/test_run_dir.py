"""The run directory and the command line, attacked from outside: locks that survive a killed run's workers,
links and directories where the lock should be, a lock deleted under a running run, two runs on one machine,
refused runs that must leave the disk as it was, and resumes that would change the held-out images."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_EXAMPLE_ARGS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import run_dir  # noqa: E402
import train_swav  # noqa: E402

pytestmark = pytest.mark.slow

TINY = [*TINY_EXAMPLE_ARGS, "--max-iters-per-epoch", "3", "--queue-length", "0"]
SCRIPT = Path(train_swav.__file__)


def start(output: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, str(SCRIPT), *TINY, "--output-dir", str(output), *extra]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition(), "timed out"


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_a_run_killed_while_its_loader_worker_lives_can_be_resumed_at_once(tmp_path: Path, capsys):
    output = tmp_path / "run"
    process = start(output, "--epochs", "6", "--num-workers", "1")  # a persistent DataLoader worker (fork)
    try:
        wait_for(lambda: any(output.glob("swav_checkpoint_*.pt")))
        workers = children(process.pid)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()
    assert any(alive(w) for w in workers), "the worker outlives its parent for a few seconds: the case to try"
    newest = max(output.glob("swav_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    status = train_swav.main([*TINY, "--epochs", "6", "--output-dir", str(output), "--resume-from", str(newest)])
    assert status == 0, capsys.readouterr().err  # not "in use by another run": workers do not hold the lock


def test_a_lock_deleted_under_a_running_run_stops_it_before_its_next_write(tmp_path: Path):
    output = tmp_path / "run"
    process = start(output, "--epochs", "30")
    try:
        wait_for(lambda: any(output.glob("swav_checkpoint_*.pt")))
        (output / run_dir.LOCK_NAME).unlink()  # now a second run could lock a new file and share the directory
        assert process.wait(timeout=120) == 2
        error = process.stderr.read().decode()
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert "was removed, replaced or taken over while this run held it" in error and "Traceback" not in error


@pytest.mark.parametrize("kind", ["symbolic link", "directory"])
def test_a_lock_path_that_is_a_link_or_a_directory_is_refused_and_followed_nowhere(tmp_path: Path, capsys, kind):
    output = tmp_path / "run"
    output.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    if kind == "symbolic link":
        (output / run_dir.LOCK_NAME).symlink_to(target)
    else:
        (output / run_dir.LOCK_NAME).mkdir()
    assert train_swav.main([*TINY, "--epochs", "1", "--output-dir", str(output)]) == 2
    error = capsys.readouterr().err
    assert f"the lock file {output / run_dir.LOCK_NAME} is a {kind}" in error
    assert target.read_text() == "keep me"


def test_a_refused_run_creates_and_removes_nothing(tmp_path: Path, capsys):
    # a resume from a missing file into a directory that does not exist yet: nothing is created
    new = tmp_path / "a" / "b"
    assert train_swav.main([*TINY, "--output-dir", str(new), "--resume-from", str(tmp_path / "missing.pt")]) == 2
    assert not (tmp_path / "a").exists()
    # other programs' temporary files in the output directory are never touched, refused run or not
    shared = tmp_path / "shared"
    shared.mkdir()
    foreign = [shared / "tmpa1b2c3d4", shared / ".results.json.x.tmp", shared / ".history.png.y.tmp"]
    for path in foreign:
        path.write_text("theirs")
    assert train_swav.main([*TINY, "--output-dir", str(shared), "--resume-from", str(shared / "missing.pt")]) == 2
    assert train_swav.main([*TINY, "--epochs", "1", "--output-dir", str(shared)]) == 0
    assert all(path.read_text() == "theirs" for path in foreign)
    capsys.readouterr()


def test_resuming_with_another_seed_or_data_set_is_refused(tmp_path: Path, capsys):
    output = tmp_path / "run"
    assert train_swav.main([*TINY, "--epochs", "1", "--output-dir", str(output)]) == 0
    newest = max(output.glob("swav_checkpoint_*.pt"))
    resume = [*TINY, "--epochs", "2", "--output-dir", str(output), "--resume-from", str(newest)]
    assert train_swav.main([*resume, "--seed", "1"]) == 2
    assert "was trained with --seed 0, this run has --seed 1: pass --seed 0" in capsys.readouterr().err
    assert train_swav.main([*resume, "--dataset", "mnist5k"]) == 2
    error = capsys.readouterr().err
    assert "was trained with --dataset digits, this run has --dataset mnist5k" in error


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_a_second_multi_process_run_on_the_same_machine_picks_its_own_port(tmp_path: Path, capsys):
    # Ignite's launcher meets on port 2222 by default: a second experiment on the machine died with EADDRINUSE
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 2222))
        busy.listen()
        argv = [*TINY, "--epochs", "1", "--nproc-per-node", "2", "--output-dir", str(tmp_path / "run")]
        assert train_swav.main(argv) == 0, capsys.readouterr().err


def test_a_problem_found_in_the_spawned_processes_is_one_line(tmp_path: Path, capsys):
    output = tmp_path / "run"
    assert train_swav.main([*TINY, "--epochs", "1", "--output-dir", str(output)]) == 0
    newest = max(output.glob("swav_checkpoint_*.pt"))
    checkpoint = torch.load(newest, weights_only=True)
    # in the middle of an epoch of 4 iterations: only a run of the same epoch length can resume it
    checkpoint["trainer"]["iteration"], checkpoint["trainer"]["epoch_length"] = 5, 4
    mid_epoch = output / "swav_checkpoint_5.pt"
    torch.save(checkpoint, mid_epoch)
    capsys.readouterr()
    argv = [*TINY, "--epochs", "2", "--output-dir", str(output), "--resume-from", str(mid_epoch)]
    assert train_swav.main([*argv, "--nproc-per-node", "2"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "in the middle of an epoch of 4 iterations" in error
    assert "Traceback" not in error and len(error.strip().splitlines()) == 1
    # a batch larger than the data set on 2 processes: found before any process starts
    assert (
        train_swav.main([*TINY, "--batch-size", "5000", "--nproc-per-node", "2", "--output-dir", str(tmp_path / "b")])
        == 2
    )
    assert "--batch-size 5000 x 2 process(es) is larger than the data set" in capsys.readouterr().err


def test_resume_from_auto_starts_afresh_then_resumes_from_the_newest_valid_checkpoint(tmp_path: Path, capsys):
    output = tmp_path / "job"
    auto = [*TINY, "--output-dir", str(output), "--resume-from", "auto"]
    assert train_swav.main([*auto, "--epochs", "1"]) == 0  # nothing there yet: a fresh run
    capsys.readouterr()
    saved = sorted(output.glob("swav_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    newest = saved[-1]
    damaged = output / "swav_checkpoint_99.pt"  # a newer name whose file is damaged: skipped, with a warning
    damaged.write_bytes(newest.read_bytes()[:500])
    assert train_swav.main([*auto, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from '{newest}' at epoch 1" in out
    written = max((p for p in output.glob("swav_checkpoint_*.pt") if p != damaged), key=lambda p: p.stat().st_mtime)
    trainer_state = torch.load(written, weights_only=True)["trainer"]
    assert trainer_state["iteration"] == 2 * trainer_state["epoch_length"]  # the second epoch ran, from the first's end


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_a_log_file_gets_the_epoch_lines_and_no_progress_bar(tmp_path: Path):
    argv = [sys.executable, str(SCRIPT), *TINY, "--epochs", "2", "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)  # stdout and stderr are not terminals
    assert result.returncode == 0, result.stderr[-2000:]
    assert "epoch 1/2: loss" in result.stdout and "epoch 2/2: loss" in result.stdout
    assert "\r" not in result.stderr and "it/s" not in result.stderr  # no per-iteration progress lines


def test_a_lock_taken_over_in_place_by_another_process_is_seen_before_a_write(tmp_path: Path):
    from swav_config import ExampleError

    lock = tmp_path / run_dir.LOCK_NAME
    lock.write_text(f"{os.getpid()}\nthis-host\n")
    inode = lock.stat().st_ino
    assert run_dir.verify_lock(lock, inode, holder=os.getpid())
    with open(lock, "r+") as same_file:  # the same file (inode), rewritten by a run that took it over
        same_file.write("4242424\nother-host\n")
    assert lock.stat().st_ino == inode
    with pytest.raises(ExampleError, match="removed, replaced or taken over while this run held it"):
        run_dir.verify_lock(lock, inode, holder=os.getpid())
