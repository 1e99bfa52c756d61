"""The example on a preemptible cluster: SIGTERM or SIGUSR1 (what Kubernetes and Slurm send before they kill a
job) ends the run after the current iteration with a checkpoint, its lock released and exit status 75, and
``--resume-from auto`` continues it exactly; SIGINT is one line; the training processes of a launcher that died
stop by themselves, whatever their SIGINT disposition."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_swav  # noqa: E402
from helpers import TINY_EXAMPLE_ARGS  # noqa: E402

pytestmark = pytest.mark.slow
TINY = [*TINY_EXAMPLE_ARGS, "--max-iters-per-epoch", "3", "--queue-length", "32", "--epoch-queue-starts", "0"]


def checkpoints(output: Path) -> list[Path]:
    return sorted(output.glob("swav_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    command = [sys.executable, str(EXAMPLES / "train_swav.py"), *argv]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def wait_for_a_checkpoint(process: subprocess.Popen, output: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not checkpoints(output):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.01)


def test_sigterm_ends_the_run_with_a_checkpoint_and_exit_75_and_the_resume_is_bit_equal(tmp_path: Path):
    epochs = ["--epochs", "3"]
    assert train_swav.main([*TINY, *epochs, "--output-dir", str(tmp_path / "whole")]) == 0
    output = tmp_path / "preempted"
    process = start([*TINY, *epochs, "--output-dir", str(output)])
    wait_for_a_checkpoint(process, output)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 75, stderr[-3000:]
    assert "preempted: checkpoint written; continue with --resume-from auto" in stdout
    assert "Traceback" not in stderr
    stopped = json.loads((output / "results.json").read_text())
    assert stopped["status"] == "preempted" and stopped["signal"] == "SIGTERM"
    newest = torch.load(checkpoints(output)[-1], weights_only=True)
    assert newest["trainer"]["iteration"] == stopped["iteration"] < 9  # saved where it stopped, mid-run
    assert not (output / train_swav.LOCK_NAME).exists()  # released
    assert train_swav.main([*TINY, *epochs, "--output-dir", str(output), "--resume-from", "auto"]) == 0
    whole = torch.load(checkpoints(tmp_path / "whole")[-1], weights_only=True)
    resumed = torch.load(checkpoints(output)[-1], weights_only=True)
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert torch.equal(resumed["queue_handler"]["queue"], whole["queue_handler"]["queue"])
    assert json.loads((output / "results.json").read_text())["status"] == "finished"


@pytest.mark.soak
def test_sigusr1_to_the_launcher_of_two_processes_stops_both_at_one_iteration_with_one_checkpoint(tmp_path: Path):
    output = tmp_path / "two"
    two = ["--nproc-per-node", "2", "--backend", "gloo", "--epochs", "3"]
    process = start([*TINY, *two, "--output-dir", str(output)])
    wait_for_a_checkpoint(process, output, timeout=180)
    process.send_signal(signal.SIGUSR1)  # the launcher only (as Kubernetes signals the container's first process)
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 75, stderr[-3000:]
    stopped = json.loads((output / "results.json").read_text())
    assert stopped["signal"] == "SIGUSR1"
    newest = torch.load(checkpoints(output)[-1], weights_only=True)
    assert newest["trainer"]["iteration"] == stopped["iteration"]
    assert newest["queue_handler"]["queue"].shape[1] == 32  # the queue of both processes
    assert not (output / train_swav.LOCK_NAME).exists()
    # (its resume on 2 processes is the resume of any mid-epoch checkpoint: tests/reliability/test_resume.py)


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_is_one_line_and_exit_130(tmp_path: Path):
    output = tmp_path / "interrupted"
    # SIGINT as in a terminal, whatever this test inherited (a suite started in the background ignores it, and so
    # would the run: a background job is not interrupted by Ctrl-C)
    process = start([*TINY, "--epochs", "20", "--output-dir", str(output)], preexec_fn=default_sigint)
    wait_for_a_checkpoint(process, output)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "interrupted: the checkpoints are kept: continue with --resume-from auto" in stderr


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.soak
def test_training_processes_stop_when_their_launcher_dies_even_ignoring_sigint(tmp_path: Path):
    output = tmp_path / "orphans"
    argv = [*TINY, "--nproc-per-node", "2", "--backend", "gloo", "--epochs", "30", "--output-dir", str(output)]
    # a job script's background command (cmd &) starts with SIGINT ignored: torch's "parent died" SIGINT is lost
    process = start(argv, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    wait_for_a_checkpoint(process, output, timeout=180)
    workers = [
        pid for pid in children_of(process.pid) if "python" in (Path("/proc") / str(pid) / "cmdline").read_text()
    ]
    assert len(workers) >= 2, workers
    process.kill()
    process.wait()
    written = {p.name for p in checkpoints(output)}
    deadline = time.monotonic() + 60
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers), "orphaned training processes still run"
    assert {p.name for p in checkpoints(output)} <= written | {
        max(written, key=lambda n: int(n[:-3].rsplit("_", 1)[1]))
    }


@pytest.mark.soak
def test_a_training_process_killed_by_sigkill_is_one_line_and_exit_1(tmp_path: Path):
    output = tmp_path / "killed"
    process = start(
        [*TINY, "--nproc-per-node", "2", "--backend", "gloo", "--epochs", "30", "--output-dir", str(output)]
    )
    wait_for_a_checkpoint(process, output, timeout=180)
    workers = [
        pid for pid in children_of(process.pid) if "python" in (Path("/proc") / str(pid) / "cmdline").read_text()
    ]
    os.kill(max(workers), signal.SIGKILL)  # one of the two training processes (out of memory, say)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "terminated with signal SIGKILL; the checkpoints are kept: continue with --resume-from auto" in stderr


@pytest.mark.soak  # long (multi-process or a full script): make test-soak, in CI
def test_a_run_with_persistent_loader_workers_exits_when_it_is_done(tmp_path: Path):
    """The loader's workers are ended by SIGTERM at the interpreter's exit: one that ignored it would hold the run
    forever after its results (the preemption handling must leave them that signal)."""
    argv = [*TINY, "--num-workers", "1", "--epochs", "2", "--output-dir", str(tmp_path / "workers")]
    process = start(argv)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr[-3000:]


def test_a_sigint_swallowed_on_its_way_is_raised_again_and_an_ignored_one_left_alone():
    import lifecycle

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with lifecycle.remembering_interrupts():
            try:  # as when the interpreter drops it in a finaliser (a __del__), where the run would go on
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                pass
            with pytest.raises(KeyboardInterrupt):
                lifecycle.raise_if_interrupted()  # the next iteration raises it again
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
        lifecycle.INTERRUPTS.clear()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job's `cmd &`
        try:
            with lifecycle.remembering_interrupts():
                assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        lifecycle.INTERRUPTS.clear()
        signal.signal(signal.SIGINT, inherited)
