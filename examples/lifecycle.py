"""How a run of ``train_swav.py`` lives among the signals and processes of a cluster: the signal a scheduler sends
before it kills a job (SIGTERM, SIGUSR1) ends the run after the current iteration with a checkpoint and exit
status 75; the training processes of a launcher that died stop instead of writing beside a new run; the data
loader's workers leave SIGUSR1 to the training process."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from ignite.engine import Engine, Events
from swav_config import ExampleError
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from ignite_swav.checkpoint import is_disk_full

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h), "try again later": the job is requeued and resumes by itself
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_preemption_signals(worker_id: int) -> None:
    """The DataLoader's ``worker_init_fn``: Slurm's ``--signal=USR1@90`` reaches every process of the job, and must
    not kill the loader's workers under the training process, which stops them itself once its checkpoint is
    written. SIGTERM keeps its default: it is how the DataLoader and multiprocessing end their workers (a worker
    ignoring it blocks the process's exit), so with Slurm warn with USR1 (docs/distributed.md)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


#: the SIGINTs this process received (main() installs the handler)
INTERRUPTS: list[int] = []


@contextmanager
def remembering_interrupts() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` as Python's own handler does, and is remembered: one that lands while
    the interpreter runs a finaliser (a ``__del__``) is printed there and dropped, and the run would go on to end
    with status 0; :func:`raise_if_interrupted` raises it again from the training loop, and main() at the end.
    A SIGINT already ignored (a job script's ``cmd &``) or handled by someone else is left as it is."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def interrupt(number: int, frame: FrameType | None) -> None:
        INTERRUPTS.append(number)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def raise_if_interrupted(_: Any = None) -> None:
    """``ITERATION_COMPLETED`` (and after the run): a SIGINT that was swallowed on its way is raised again."""
    if INTERRUPTS:
        raise KeyboardInterrupt


def watch_launcher(trainer: Engine, args: argparse.Namespace) -> None:
    """In a process started by a launcher (``--nproc-per-node``, torchrun): stop at the next iteration when the
    launcher is gone. Its output directory lock died with it, so a new run may be writing there; torch tells spawned
    processes of their parent's death by SIGINT, which a job script's background command (``cmd &``) ignores.
    In every process: a SIGINT swallowed on its way is raised again after the iteration (remembering_interrupts)."""
    trainer.add_event_handler(Events.ITERATION_COMPLETED, raise_if_interrupted)
    spawned = (args.nproc_per_node or 1) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if not spawned:
        return
    launcher = os.getppid()

    @trainer.on(Events.ITERATION_STARTED)
    def stop_if_orphaned(engine: Engine) -> None:
        if os.getppid() != launcher:
            raise ExampleError(
                f"the process that launched this one ({launcher}) is gone: stopped at iteration "
                f"{engine.state.iteration} without writing (another run may own '{args.output_dir}' now)"
            )


@contextmanager
def forwarding_preemption_signals(spawned: bool) -> Iterator[list[str]]:
    """In the launching process of ``--nproc-per-node N``: a preemption signal (Kubernetes sends it to the
    container's first process only) is passed on to the training processes, which stop together; yields the
    names of the signals received."""
    received: list[str] = []
    if not spawned:
        yield received
        return

    def forward(number: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(number).name)
        for child in multiprocessing.active_children():  # the training processes torch's spawn started
            if child.pid is not None:
                os.kill(child.pid, number)

    previous = {number: signal.signal(number, forward) for number in PREEMPTION_SIGNALS}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def preempted_results(trainer: Engine, args: argparse.Namespace) -> dict[str, Any]:
    """What ``results.json`` says of a run a signal ended: how far it got and how to continue it."""
    return {
        "status": "preempted",
        "signal": trainer.state.preempted,  # type: ignore[attr-defined]
        "epoch": trainer.state.epoch,
        "iteration": trainer.state.iteration,
        "resume": f"--output-dir {args.output_dir} --resume-from auto",
        "run_token": args.run_token,
    }


def was_preempted(output_dir: Path, run_token: str) -> bool:
    """Whether this run (``run_token``) ended on a preemption signal, as its ``results.json`` says."""
    try:
        results = json.loads((output_dir / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and results.get("run_token") == run_token and results.get("status") == "preempted"


def exit_status(error: BaseException, output_dir: Any) -> int | None:
    """The exit status of a run that ended on ``error``, after one line on the standard error (``None``: not one of
    the run's known endings, raised as it is). 2: a usage, data or checkpoint problem; 1: a process killed, a
    write that failed; 130: interrupted (SIGINT)."""
    resume = "the checkpoints are kept: continue with --resume-from auto"
    if isinstance(error, KeyboardInterrupt):
        message, status = f"interrupted: {resume}", 130
    elif isinstance(error, ProcessExitedException):  # a training process killed (SIGKILL, out of memory)
        message, status = f"error: {error}; {resume}", 1
    elif isinstance(error, ProcessRaisedException):  # a one-line problem found in a spawned process
        found = re.search(r"ExampleError: (.*)", str(error))
        if found is None:
            return None
        message, status = f"error: {found.group(1)}", 2
    elif isinstance(error, ExampleError):
        message, status = f"error: {error}", 2
    elif isinstance(error, OSError) or (isinstance(error, RuntimeError) and is_disk_full(error)):
        # a full disk (torch's writer calls it an "unexpected pos"), a directory that vanished
        reason = "no space left on device" if is_disk_full(error) else (getattr(error, "strerror", None) or str(error))
        message, status = f"error: writing to '{output_dir}' failed: {reason}", 1
    else:
        return None
    print(message, file=sys.stderr)
    return status
