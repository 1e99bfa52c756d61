"""Elastic training on torchrun's elastic agent: two agents on this machine (one process each, a c10d rendezvous),
one of them killed in the middle of the run. The other restarts its worker at world size 1, which resumes from the
newest checkpoint with every queue row (resharded) and the schedule in place (``--resume-from auto``), and
finishes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_EXAMPLE_ARGS
from spawned import free_port

pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.soak]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = [*TINY_EXAMPLE_ARGS, "--max-iters-per-epoch", "3", "--queue-length", "32", "--epoch-queue-starts", "0"]


def agent(port: int, output: Path, log: Path) -> subprocess.Popen:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    command = [
        torchrun or "torchrun",
        "--nnodes", "1:2", "--nproc-per-node", "1", "--max-restarts", "3",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "elastic-test",
        # the first round waits 3 s for the second agent; a node that left is seen in 2 s, not torchrun's 15
        "--rdzv-conf", "last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=2,join_timeout=120",
        str(EXAMPLES / "train_swav.py"), *TINY, "--epochs", "3", "--output-dir", str(output), "--resume-from", "auto",
    ]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    with open(log, "w") as stream:
        return subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {name}\n{(tmp_path / name).read_text()[-2500:]}" for name in ("host.log", "other.log"))


def checkpoints(output: Path) -> list[Path]:
    return sorted(output.glob("swav_checkpoint_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def test_losing_a_node_restarts_the_other_at_world_size_1_from_the_newest_checkpoint_and_it_finishes(tmp_path: Path):
    output, port = tmp_path / "run", free_port()
    host = agent(port, output, tmp_path / "host.log")  # the first agent hosts the c10d store
    deadline = time.monotonic() + 60
    while not listening(port):  # then the other joins the same first round
        assert host.poll() is None and time.monotonic() < deadline, logs(tmp_path)
        time.sleep(0.05)
    other = agent(port, output, tmp_path / "other.log")
    try:
        deadline = time.monotonic() + 240
        while not checkpoints(output):
            assert host.poll() is None and other.poll() is None, logs(tmp_path)
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.05)
        saved = torch.load(checkpoints(output)[-1], weights_only=True)
        assert saved["trainer"]["iteration"] % 3 == 0  # an end of epoch, at world size 2
        os.killpg(other.pid, signal.SIGKILL)  # the node leaves: its agent and its worker
        other.wait()
        assert host.wait(timeout=300) == 0, logs(tmp_path)
    finally:
        for process in (host, other):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    results = json.loads((output / "results.json").read_text())
    assert results["status"] == "finished" and results["epochs"] == 3 and results["world_size"] == 1
    final = torch.load(checkpoints(output)[-1], weights_only=True)
    assert final["queue_handler"]["queue"].shape == (2, 32, 16)  # every row, now on one process
    log = (tmp_path / "host.log").read_text()
    assert "resumed from" in log
