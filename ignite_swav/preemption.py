"""Stopping a run cleanly when its job is about to be killed: the signal a scheduler sends first (Slurm's
``--signal``, Kubernetes' SIGTERM) ends the run after the current iteration, on every process at once."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["PreemptionHandler"]


class PreemptionHandler:
    """Ends a run after the current iteration when the process receives one of ``signals`` (by default SIGTERM,
    what Kubernetes and Slurm send before they kill a job, and SIGUSR1, what ``sbatch --signal=USR1@90`` sends).

    ``attach(trainer)`` installs the signal handlers (they only take note) and, at the end of every iteration,
    calls ``trainer.terminate()`` once a signal came: the run ends with ``Events.TERMINATE``, where a ``Checkpoint``
    saves it (the queue of :class:`~ignite_swav.SwAVQueueHandler` is gathered at that last iteration), then
    ``COMPLETED``. On several processes :func:`~ignite_swav.create_swav_trainer`'s engine stops every process at
    the same iteration, also when only some of them received the signal. The previous handlers are put back when
    the run ends (:meth:`detach`). ``received`` (and ``trainer.state.preempted``) name the signal.

    Signal handlers can only be installed from the main thread; attach it there.

    Args:
        signals: the signals that end the run.

    Example:
        >>> import os, signal
        >>> from ignite.engine import Engine
        >>> from ignite_swav import PreemptionHandler
        >>> def step(engine, batch):  # in iteration 3 the scheduler's signal comes
        ...     if engine.state.iteration == 3:
        ...         os.kill(os.getpid(), signal.SIGTERM)
        >>> trainer = Engine(step)
        >>> PreemptionHandler().attach(trainer)
        >>> state = trainer.run(range(10), max_epochs=5)
        >>> state.iteration, state.preempted
        (3, 'SIGTERM')
    """

    def __init__(self, signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        if isinstance(signals, (str, bytes)) or not isinstance(signals, Sequence) or not signals:
            raise TypeError(f"signals must be a non-empty sequence of signal.Signals, got {signals!r}")
        for value in signals:
            if not isinstance(value, signal.Signals) or value in (signal.SIGKILL, signal.SIGSTOP):
                raise ValueError(f"signals must be catchable signals such as signal.SIGTERM, got {value!r}")
        self.signals = tuple(signals)
        #: the name of the signal that ended the run (``"SIGTERM"``), or ``None``
        self.received: str | None = None
        self._previous: dict[signal.Signals, Any] = {}
        self._attached = False  # not the trainer itself: it holds this handler's methods (a reference cycle)

    def attach(self, trainer: Engine) -> None:
        """Install the signal handlers now and stop ``trainer`` after the iteration in which a signal came."""
        if not isinstance(trainer, Engine):
            raise TypeError(f"trainer must be an ignite Engine, got {type(trainer).__name__}")
        if self._attached:
            raise ValueError("this PreemptionHandler is already attached; make one per trainer")
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.attach must be called from the main thread (signal handlers)")
        self._attached = True
        self._previous = {s: signal.signal(s, self._take_note) for s in self.signals}
        trainer.state.preempted = None  # type: ignore[attr-defined]  # Ignite's State takes attributes
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._stop_if_signalled)
        for event in (Events.TERMINATE, Events.COMPLETED):
            trainer.add_event_handler(event, self.detach)

    def _take_note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def _stop_if_signalled(self, engine: Engine) -> None:
        if self.received is not None and engine.state.preempted is None:  # type: ignore[attr-defined]
            engine.state.preempted = self.received  # type: ignore[attr-defined]
            engine.terminate()

    def detach(self, engine: Engine | None = None) -> None:
        """Put back the signal handlers that were there before :meth:`attach`: done when the run ends; after a run
        that raised, call it yourself if the process goes on."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}
