"""The events that ignite-swav's trainer and handlers fire, beside Ignite's own."""

from __future__ import annotations

from ignite.engine import EventEnum

__all__ = ["SwAVEvents"]


class SwAVEvents(EventEnum):
    """Events of a SwAV run, registered by :func:`~ignite_swav.create_swav_trainer` (and by
    :class:`~ignite_swav.SwAVHealthMonitor` on an engine that lacks them).

    - ``QUEUE_FIRST_USED``: after the first iteration of a run whose codes used the queue (fired by
      :func:`~ignite_swav.create_swav_trainer`'s engine).
    - ``COLLAPSE_SUSPECTED``: at the end of an epoch whose figures suggest collapse (fired by
      :class:`~ignite_swav.SwAVHealthMonitor`; the reasons are in ``engine.state.collapse_report``).
    - ``QUEUE_RETREATED``: at the end of an epoch where :class:`~ignite_swav.SwAVQueueGuard` took the run back to
      just before its queue came in (what it did is in ``engine.state.queue_retreat``).

    Example:
        >>> from ignite.engine import Engine
        >>> from ignite_swav import SwAVEvents
        >>> engine = Engine(lambda engine, batch: None)
        >>> engine.register_events(*SwAVEvents)  # create_swav_trainer does this
        >>> _ = engine.add_event_handler(SwAVEvents.QUEUE_FIRST_USED, lambda e: print("queue in use"))
        >>> engine.fire_event(SwAVEvents.QUEUE_FIRST_USED)
        queue in use
    """

    QUEUE_FIRST_USED = "queue_first_used"
    COLLAPSE_SUSPECTED = "collapse_suspected"
    QUEUE_RETREATED = "queue_retreated"
