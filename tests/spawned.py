"""Running a test's function on a group of gloo processes in a process group of its own, under a hard timeout: a
run that hangs (a rank left waiting in a collective) fails its test within the timeout and never stalls the suite.

The function is a top-level function of a test module (the workers import it by name, as ``idist.spawn`` does);
it gets the local rank, then the given arguments (strings and numbers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent
_LAUNCHER = """
import importlib, json, sys
import ignite.distributed as idist
from helpers import run_then_collect
module, name, nproc, port, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
function = getattr(importlib.import_module(module), name)
idist.spawn("gloo", run_then_collect, args=(function, *args), nproc_per_node=nproc, master_port=port)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_group(function: Callable[..., Any], *args: Any, nproc: int = 2, timeout: float = 60.0) -> str:
    """Run ``function(local_rank, *args)`` on ``nproc`` gloo processes; returns their output, fails the test when
    they do not all end within ``timeout`` seconds (every process of the group is killed) or one of them fails."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent)]))
    command = [sys.executable, "-c", _LAUNCHER, function.__module__, function.__name__, str(nproc), str(free_port())]
    process = subprocess.Popen(
        [*command, json.dumps([str(a) if isinstance(a, Path) else a for a in args])],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a hang is killed whole, workers included
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(
            f"{function.__name__} on {nproc} processes did not end within {timeout} s (a hang):\n{output[-3000:]}"
        )
    if process.returncode != 0:
        pytest.fail(f"{function.__name__} on {nproc} processes failed (exit {process.returncode}):\n{output[-4000:]}")
    return output
