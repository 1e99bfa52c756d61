"""Training health of a SwAV run: the per-epoch signs of collapse, read from what the loss already computes,
and a warning that names the likely cause and the remedies."""

from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from ignite import distributed as idist
from ignite.base import Serializable
from ignite.engine import Engine, Events
from ignite.engine.events import CallableEventWithFilter
from torch import Tensor

from ignite_swav._distributed import all_reduce, values_by_rank
from ignite_swav._validation import check_int
from ignite_swav.events import SwAVEvents
from ignite_swav.loss import SwAVLoss

__all__ = ["CollapseReport", "SwAVHealthMonitor", "diagnose"]

METRIC_NAMES = ("prototype_usage", "code_entropy", "loss_over_lnk")

# The reference's advice for a collapsing run, in the order to try it.
_REMEDIES = (
    "freeze the prototypes for longer (freeze_prototypes_iters)",
    "use a shorter queue or start it later (queue_length, epoch_queue_starts)",
    "use a smaller epsilon",
    "lower the learning rate",
)


@dataclass(frozen=True)
class CollapseReport:
    """Why :class:`SwAVHealthMonitor` suspects collapse at the end of an epoch (``trainer.state.collapse_report``).

    Example:
        >>> from ignite_swav import CollapseReport
        >>> report = CollapseReport(7, "queue", "the loss rose", True, ("use a shorter queue", "lower the lr"))
        >>> print(report.message())
        SwAV collapse suspected at epoch 7: the loss rose. The queue is the likely cause: it came in just before. \
Try, in this order: (1) use a shorter queue; (2) lower the lr.
    """

    epoch: int
    #: ``"collapse"``: the signature (codes near uniform, loss near ln K) holds and does not improve, or appeared;
    #: ``"queue"``: the loss rose clearly in the epochs after the queue came in
    kind: str
    evidence: str
    queue_is_likely_cause: bool
    remedies: tuple[str, ...]

    def message(self) -> str:
        """The warning's text: the evidence, then the remedies in order."""
        cause = " The queue is the likely cause: it came in just before." if self.queue_is_likely_cause else ""
        steps = "; ".join(f"({i}) {r}" for i, r in enumerate(self.remedies, 1))
        return f"SwAV collapse suspected at epoch {self.epoch}: {self.evidence}.{cause} Try, in this order: {steps}."


def diagnose(
    history: Sequence[Mapping[str, Any]],
    entropy_threshold: float = 0.9,
    loss_threshold: float = 0.9,
    min_improvement: float = 0.01,
    queue_rise: float = 0.05,
    queue_window: int = 2,
    uniform_entropy: float = 0.99,
) -> CollapseReport | None:
    """The collapse report for the last epoch of ``history``, or ``None`` when it looks healthy (or an alarm of
    the same episode was given already).

    ``history`` holds one record per epoch with ``epoch``, ``prototype_usage``, ``code_entropy``,
    ``loss_over_lnk``, ``queue_used`` (the queue took part in that epoch's codes) and ``alarm`` (an alarm was
    given at that epoch). The rules (the thresholds are the arguments of :class:`SwAVHealthMonitor`):

    - **collapse signature**: ``code_entropy >= entropy_threshold`` and ``loss_over_lnk >= loss_threshold``.
      A network at random initialisation shows it too, so it alarms only when it *persists without
      improving* (it held in the previous epoch as well and the loss fell by less than ``min_improvement`` x
      ln K) or *appears* after an epoch without it. A loss at or above ln K with codes of at least
      ``uniform_entropy`` counts as not improving however fast it falls: against uniform codes the loss cannot go
      below ln K, so its fall is the predictions turning uniform too (the collapse settling), not learning. Once
      per episode: no new alarm until an epoch without it.
    - **queue rise**: in the first ``queue_window`` epochs whose codes used the queue, ``loss_over_lnk`` rose by
      ``queue_rise`` or more above the last epoch before the queue. Once per run.

    Example:
        >>> from ignite_swav import diagnose
        >>> def epoch(n, entropy, loss):
        ...     return {"epoch": n, "prototype_usage": 0.01, "code_entropy": entropy, "loss_over_lnk": loss}
        >>> print(diagnose([epoch(1, 0.97, 1.01), epoch(2, 0.96, 0.93)]))  # at init, but improving
        None
        >>> diagnose([epoch(1, 0.97, 1.01), epoch(2, 0.98, 1.02)]).kind  # stuck at ln K
        'collapse'
    """
    if not history:
        return None
    now = history[-1]
    before = history[:-1]

    def signature(record: Mapping[str, Any]) -> bool:
        return record["code_entropy"] >= entropy_threshold and record["loss_over_lnk"] >= loss_threshold

    queue_epochs = [i for i, r in enumerate(history) if r.get("queue_used")]
    first_queue = queue_epochs[0] if queue_epochs else None
    queue_recent = first_queue is not None and len(history) - 1 - first_queue < queue_window
    evidence = (
        f"the codes are {now['code_entropy']:.0%} of uniform entropy, the loss is {now['loss_over_lnk']:.0%} of "
        f"ln K, and {now['prototype_usage']:.0%} of the prototypes are the best match of any sample"
    )
    if signature(now):
        episode_alarmed = False
        for record in reversed(before):
            if not signature(record):
                break
            episode_alarmed = episode_alarmed or bool(record.get("alarm"))
        came_back = any(not signature(r) for r in before)
        settling = now["code_entropy"] >= uniform_entropy and now["loss_over_lnk"] >= 1.0
        stuck = (
            bool(before)
            and signature(before[-1])
            and (settling or now["loss_over_lnk"] > before[-1]["loss_over_lnk"] - min_improvement)
        )
        if not episode_alarmed and ((came_back and not signature(before[-1])) or stuck):
            how = (
                "appeared after an epoch without it" if came_back and not signature(before[-1]) else "is not improving"
            )
            return CollapseReport(
                int(now["epoch"]),
                "collapse",
                f"{evidence}; this {how}",
                queue_recent,
                _remedies(queue_recent, queue_in_run=first_queue is not None),
            )
    if queue_recent and first_queue is not None and first_queue > 0:
        already = any(r.get("alarm") for r in history[first_queue:-1])
        baseline = history[first_queue - 1]["loss_over_lnk"]
        rise = now["loss_over_lnk"] - baseline
        if not already and rise >= queue_rise:
            return CollapseReport(
                int(now["epoch"]),
                "queue",
                f"the loss rose from {baseline:.0%} to {now['loss_over_lnk']:.0%} of ln K since the queue came in "
                f"(epoch {history[first_queue]['epoch']}); {evidence}",
                True,
                _remedies(True),
            )
    return None


def _remedies(queue_first: bool, queue_in_run: bool = True) -> tuple[str, ...]:
    """The reference's remedies in order: the queue's first when it is the likely cause, left out when no epoch of
    the run used a queue (advice about a queue that does not exist yet would mislead)."""
    if not queue_in_run:
        return tuple(r for r in _REMEDIES if r != _REMEDIES[1])
    if not queue_first:
        return _REMEDIES
    return (_REMEDIES[1], *[r for r in _REMEDIES if r != _REMEDIES[1]])


class SwAVHealthMonitor(Serializable):
    """Watches a SwAV run for collapse, from the codes and scores its :class:`~ignite_swav.SwAVLoss` computes.

    ``attach(trainer)`` registers three handlers. Each iteration adds the loss's last step (its
    :attr:`~ignite_swav.SwAVLoss.last_step`) to running sums kept on the device: no value is read back, so a
    step never waits for it. At the end of every epoch the sums of all ranks are combined (one all-reduce and
    one read) and put into ``trainer.state.metrics``, where Ignite's loggers find them like any metric
    (``ProgressBar(...).attach(trainer, metric_names=[...])``, ``OutputHandler(metric_names="all")``):

    - ``"prototype_usage"``: the fraction of the K prototypes that are the highest-scoring prototype of at least
      one sample (an assigned crop) of the epoch, on any rank;
    - ``"code_entropy"``: the mean entropy of the codes' rows divided by ln K (1.0: uniform codes);
    - ``"loss_over_lnk"``: the epoch's mean loss divided by ln K (a collapsed model sits at 1.0 or above).

    With several prototype heads (``SwAVPrototypes(dim, [K] * H)``) the figures are of all heads combined: the
    fraction of the ``H * K`` prototypes used, the entropy of every head's codes (each divided by ln K) and the
    loss, itself the mean of the heads', over ln K.

    Then :func:`diagnose` looks at the history of these figures; when it suspects collapse, the trainer fires
    :attr:`SwAVEvents.COLLAPSE_SUSPECTED` with the :class:`CollapseReport` in ``trainer.state.collapse_report``,
    and one warning is logged (once per episode, by rank 0) naming the evidence and the remedies in order. A randomly
    initialised network looks collapsed too (its codes are near uniform and its loss near ln K), so levels
    alone never alarm: see :func:`diagnose` for the rules. The defaults come from the main job's runs (the
    numbers are in ``docs/main-job.md``). Attach it before the loggers that read its metrics; put it in the
    checkpoint (``state_dict``) so that a resumed run keeps its history.

    Args:
        loss_fn: the :class:`~ignite_swav.SwAVLoss` of the trainer.
        entropy_threshold: ``code_entropy`` at or above which the codes count as collapsed (0-1).
        loss_threshold: ``loss_over_lnk`` at or above which the loss counts as collapsed (> 0).
        min_improvement: fall of ``loss_over_lnk`` per epoch below which a collapsed run counts as stuck (>= 0).
        queue_rise: rise of ``loss_over_lnk`` after the queue came in that counts as the queue's fault (> 0).
        queue_window: epochs after the queue came in during which a rise is blamed on it (>= 1).
        logger: where the warning goes; default ``logging.getLogger("ignite_swav.health")``.
        event: when to look (default every epoch); ``Events.ITERATION_COMPLETED(every=N)`` looks at windows of N
            iterations, for data sets whose epochs are long (the rules then speak of windows, the records keep
            their epoch and iteration).
        uniform_entropy: ``code_entropy`` at or above which the codes count as uniform, so that a loss at or above
            ln K is not improvement (0-1; see :func:`diagnose`).

    Example:
        >>> import torch
        >>> from ignite_swav import SwAVHealthMonitor, SwAVLoss, SwAVModel, SwAVProjectionHead, SwAVPrototypes
        >>> from ignite_swav import create_swav_trainer
        >>> backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1))
        >>> model = SwAVModel(backbone, SwAVProjectionHead(8, 16, 4), SwAVPrototypes(4, 10))
        >>> loss_fn = SwAVLoss()
        >>> trainer = create_swav_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn)
        >>> SwAVHealthMonitor(loss_fn).attach(trainer)
        >>> crops = [torch.randn(4, 3, 16, 16)] * 2 + [torch.randn(4, 3, 8, 8)] * 2
        >>> metrics = trainer.run([crops] * 3, max_epochs=1).metrics
        >>> sorted(metrics), 0 < metrics["prototype_usage"] <= 1
        (['code_entropy', 'loss_over_lnk', 'prototype_usage'], True)
    """

    _state_dict_all_req_keys = ("history",)

    def __init__(
        self,
        loss_fn: SwAVLoss,
        entropy_threshold: float = 0.9,
        loss_threshold: float = 0.9,
        min_improvement: float = 0.01,
        queue_rise: float = 0.05,
        queue_window: int = 2,
        logger: logging.Logger | None = None,
        uniform_entropy: float = 0.99,
        event: CallableEventWithFilter = Events.EPOCH_COMPLETED,
    ) -> None:
        if not isinstance(loss_fn, SwAVLoss):
            raise TypeError(f"loss_fn must be an ignite_swav.SwAVLoss, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.entropy_threshold = _fraction("entropy_threshold", entropy_threshold, upper=1.0)
        self.loss_threshold = _fraction("loss_threshold", loss_threshold, upper=None)
        self.min_improvement = _fraction("min_improvement", min_improvement, upper=1.0, zero=True)
        self.queue_rise = _fraction("queue_rise", queue_rise, upper=None)
        self.queue_window = check_int("queue_window", queue_window, 1)
        self.uniform_entropy = _fraction("uniform_entropy", uniform_entropy, upper=1.0)
        if not isinstance(event, CallableEventWithFilter):
            raise TypeError(
                "event must be an Ignite event such as Events.EPOCH_COMPLETED or "
                f"Events.ITERATION_COMPLETED(every=500), got {event!r}"
            )
        self.event = event
        self._per_epoch = event.name == Events.EPOCH_COMPLETED.name
        if logger is not None and not isinstance(logger, logging.Logger):
            raise TypeError(f"logger must be a logging.Logger, got {type(logger).__name__}")
        self.logger = logger or logging.getLogger("ignite_swav.health")
        #: one record per epoch: the three metrics, ``queue_used``, ``alarm``
        self.history: list[dict[str, Any]] = []
        # a weak reference: the engine holds this monitor's methods, and a strong one back would be a reference
        # cycle keeping the trainer's model (and a DDP model's process group) alive until the garbage collector
        self._engine: weakref.ReferenceType[Engine] | None = None
        self.reset()

    def attach(self, engine: Engine) -> None:
        """Register the handlers on ``engine`` (the trainer whose loss is ``loss_fn``) and, if needed, the
        :class:`SwAVEvents`. Attach it once, before the loggers that read its metrics."""
        if not isinstance(engine, Engine):
            raise TypeError(f"engine must be an ignite Engine, got {type(engine).__name__}")
        if self._attached_to(engine):
            raise ValueError("this SwAVHealthMonitor is already attached to this engine; attach it only once")
        if self._engine is not None and self._engine() is not None:
            raise ValueError("this SwAVHealthMonitor is already attached to another engine; make one per trainer")
        self._engine = weakref.ref(engine)
        engine.register_events(
            *SwAVEvents
        )  # create_swav_trainer's engine has them already: registering again is harmless
        if self._per_epoch:
            engine.add_event_handler(Events.EPOCH_STARTED, self.started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(self.event, self.completed)

    def _attached_to(self, engine: Engine) -> bool:
        return self._engine is not None and self._engine() is engine

    def reset(self) -> None:
        """Start the running sums of a new epoch."""
        self._used: Tensor | None = None
        self._sums: Tensor | None = None  # (sum of row entropies, sum of losses)
        self._rows = 0
        self._steps = 0
        self._width = 0  # K, the prototypes of one head
        self._queue_used = False
        self._last_step_seen: object = self.loss_fn.last_step

    def started(self, engine: Engine) -> None:
        """``EPOCH_STARTED``: reset the running sums."""
        self.reset()

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        """``ITERATION_COMPLETED``: add the loss's last step to the running sums (on the device, no wait)."""
        step = self.loss_fn.last_step
        if step is None or step is self._last_step_seen:
            return  # the loss was not called in this iteration
        self._last_step_seen = step
        codes, scores, heads = step.codes, step.scores, step.num_heads
        width = codes.shape[-1]  # K, per head
        if self._used is None or self._used.shape[0] != heads * width or self._used.device != codes.device:
            self._used = torch.zeros(heads * width, dtype=torch.float32, device=codes.device)
            self._sums = torch.zeros(2, dtype=torch.float32, device=codes.device)
            self._width = width
        assert self._sums is not None
        entropy_and_loss = torch.stack([torch.special.entr(codes).sum(), step.loss.float()])
        chosen = scores.argmax(dim=-1)
        if heads > 1:  # the problems are crop 0's heads, then crop 1's: each head's prototypes have their own ids
            chosen = chosen + self._head_offsets(heads, width, chosen)
        if step.accepted is None:
            self._used.index_fill_(0, chosen.flatten(), 1.0)
            self._sums.add_(entropy_and_loss)
        else:  # a step the trainer refused (decided on the device) adds nothing
            used = self._used.index_fill(0, chosen.flatten(), 1.0)
            self._used.copy_(torch.where(step.accepted, used, self._used))
            self._sums.add_(torch.where(step.accepted, entropy_and_loss, 0.0))
        self._rows += codes.shape[0] * codes.shape[1]
        self._steps += 1
        self._queue_used = self._queue_used or self.loss_fn.queue_in_use

    @staticmethod
    def _head_offsets(heads: int, width: int, chosen: Tensor) -> Tensor:
        """The id of each problem's first prototype, ``(A * H, 1)``: head ``h`` of every crop starts at ``h * K``."""
        problems = torch.arange(chosen.shape[0], device=chosen.device)
        return problems.remainder(heads).mul(width).unsqueeze(1)

    def compute(self) -> dict[str, float]:
        """The epoch's three metrics over all ranks (a collective: call it on every rank, also on a rank that saw
        no step); NaN when no rank saw a step."""
        # the counts first: a rank without a step does not know K, and must still take part
        used_size = 0 if self._used is None else self._used.shape[0]
        counts = values_by_rank([self._steps, self._rows, used_size, self._width if used_size else 0])
        steps, rows = sum(c[0] for c in counts), sum(c[1] for c in counts)
        all_prototypes, num_prototypes = max(c[2] for c in counts), max(c[3] for c in counts)
        if steps == 0 or num_prototypes == 0:
            return dict.fromkeys(METRIC_NAMES, math.nan)
        device = self._used.device if self._used is not None else idist.device()
        used = self._used if self._used is not None else torch.zeros(all_prototypes, device=device)
        sums = self._sums if self._sums is not None else torch.zeros(2, device=device)
        if idist.get_world_size() > 1:
            used, sums = all_reduce(used.clone(), op="MAX"), all_reduce(sums.clone(), op="SUM")
        log_k = math.log(num_prototypes) if num_prototypes > 1 else 1.0
        values = torch.cat([used.mean().unsqueeze(0), sums]).tolist()
        return {
            "prototype_usage": values[0],
            "code_entropy": values[1] / rows / log_k,
            "loss_over_lnk": values[2] / steps / log_k,
        }

    def completed(self, engine: Engine) -> None:
        """``EPOCH_COMPLETED``: put the metrics into ``engine.state.metrics``; fire ``COLLAPSE_SUSPECTED`` and warn
        when :func:`diagnose` suspects collapse. Every rank takes part, also one that saw no step of the epoch."""
        metrics = self.compute()
        if math.isnan(metrics["prototype_usage"]):
            self.logger.warning(
                "SwAVHealthMonitor saw no call of its SwAVLoss in epoch %d: attach it to the trainer that calls "
                "that loss",
                engine.state.epoch,
            )
            return
        engine.state.metrics.update(metrics)
        record = {"epoch": engine.state.epoch, "iteration": engine.state.iteration, **metrics}
        self.history.append({**record, "queue_used": self._queue_used, "alarm": False})
        if not self._per_epoch:
            self.reset()  # the next window of iterations
        report = diagnose(
            self.history,
            self.entropy_threshold,
            self.loss_threshold,
            self.min_improvement,
            self.queue_rise,
            self.queue_window,
            self.uniform_entropy,
        )
        if report is not None:
            self.history[-1]["alarm"] = True
            engine.state.collapse_report = report  # type: ignore[attr-defined]  # Ignite's State takes attributes
            if idist.get_rank() == 0:  # one warning for the run: every rank has the same figures
                self.logger.warning(report.message())
            engine.fire_event(SwAVEvents.COLLAPSE_SUSPECTED)

    def state_dict(self) -> OrderedDict[str, Any]:
        """The per-epoch history (numbers and booleans only)."""
        return OrderedDict(history=[dict(r) for r in self.history])

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the history of :meth:`state_dict`, so that a resumed run keeps its trends."""
        self.history = self.validate_state_dict(state_dict)

    def validate_state_dict(self, state_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Check ``state_dict`` as :meth:`load_state_dict` would, changing nothing; returns its history."""
        Serializable.load_state_dict(self, state_dict)  # Ignite's checks: a mapping with the required keys
        history = state_dict["history"]
        keys = {"epoch", *METRIC_NAMES, "queue_used", "alarm"}
        if not isinstance(history, list) or not all(isinstance(r, Mapping) and keys <= set(r) for r in history):
            raise ValueError(f"the health monitor's state must hold a list of per-epoch records with {sorted(keys)}")
        for record in history:
            if not all(isinstance(record[k], (int, float)) and not isinstance(record[k], bool) for k in METRIC_NAMES):
                raise ValueError("the health monitor's records must hold numbers for " + ", ".join(METRIC_NAMES))
        return [dict(r) for r in history]


def _fraction(name: str, value: object, upper: float | None, zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    low_ok = value >= 0 if zero else value > 0
    if not math.isfinite(value) or not low_ok or (upper is not None and value > upper):
        valid = f"{'>= 0' if zero else '> 0'}{'' if upper is None else f' and <= {upper:g}'}"
        raise ValueError(f"{name} must be {valid}, got {value}")
    return float(value)
