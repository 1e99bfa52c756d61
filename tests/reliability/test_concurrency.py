"""Two runs pointed at the same output directory: the second is refused while the first runs, so their
checkpoints never interleave; a lock left by a killed run is taken over."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import run_dir  # noqa: E402
import train_swav  # noqa: E402
from helpers import TINY_EXAMPLE_ARGS  # noqa: E402

pytestmark = pytest.mark.slow

TINY = [*TINY_EXAMPLE_ARGS, "--max-iters-per-epoch", "2", "--queue-length", "0"]


def start_run(output: Path, epochs: int) -> subprocess.Popen:
    """The example in another process, its errors kept."""
    script = Path(train_swav.__file__)
    return subprocess.Popen(
        [sys.executable, str(script), *TINY, "--epochs", str(epochs), "--output-dir", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_a_second_run_on_the_same_output_dir_is_refused_while_the_first_runs(tmp_path: Path, capsys):
    output = tmp_path / "shared"
    first = start_run(output, 3)
    try:
        deadline = time.monotonic() + 60
        while not (output / train_swav.LOCK_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert first.poll() is None, "the first run ended before the test could race it"
        status = train_swav.main([*TINY, "--epochs", "3", "--output-dir", str(output)])
        error = capsys.readouterr().err
        assert status == 2
        assert f"--output-dir '{output}' is in use by another run (process {first.pid}" in error
    finally:
        assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-2000:]
        first.stderr.close()
    # only the first run's checkpoints, results and plot; the lock is gone
    names = sorted(p.name for p in output.iterdir() if p.is_file())
    assert names == ["history.png", "results.json", "swav_checkpoint_4.pt", "swav_checkpoint_6.pt"]


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path: Path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (output / train_swav.LOCK_NAME).write_text(f"{dead.pid}\n{os.uname().nodename}\n")
    assert train_swav.main([*TINY, "--epochs", "1", "--output-dir", str(output)]) == 0
    assert f"process {dead.pid} that held it is not running" in capsys.readouterr().out
    assert not (output / train_swav.LOCK_NAME).exists()


def test_a_lock_of_another_host_is_refused_and_an_unreadable_free_one_taken(tmp_path: Path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    (output / train_swav.LOCK_NAME).write_text(f"{os.getpid()}\nsome-other-node\n")
    assert train_swav.main([*TINY, "--epochs", "1", "--output-dir", str(output)]) == 2
    assert "is in use by another run on another host (process" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == [train_swav.LOCK_NAME]
    # garbage that no process holds (the system lock is free): a stale file, taken over
    (output / train_swav.LOCK_NAME).write_text("garbage")
    assert train_swav.main([*TINY, "--epochs", "1", "--output-dir", str(output)]) == 0


def _race_for_the_lock(output: str, holders: str, start_at: float) -> int:
    """Wait for the start signal, then try to take the lock; while holding it, claim the holders file
    exclusively. Returns 1 if this process held the lock, 0 if refused, -1 if it found another holder inside."""
    while time.time() < start_at:
        pass
    try:
        with run_dir.OutputDirLock(Path(output)):
            try:
                descriptor = os.open(holders, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return -1
            time.sleep(0.05)
            os.close(descriptor)
            os.unlink(holders)
            return 1
    except train_swav.ExampleError:
        return 0


def test_starts_racing_for_a_stale_lock_never_hold_it_together(tmp_path: Path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for trial in range(10):
        output = tmp_path / f"race{trial}"
        output.mkdir()
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (output / train_swav.LOCK_NAME).write_text(f"{dead.pid}\n{os.uname().nodename}\n")  # stale
        start_at = time.time() + 0.3
        with context.Pool(6) as pool:
            outcomes = pool.starmap(_race_for_the_lock, [(str(output), str(tmp_path / f"h{trial}"), start_at)] * 6)
        assert -1 not in outcomes, f"two starts held the lock at once (trial {trial}: {outcomes})"
        assert outcomes.count(1) >= 1
