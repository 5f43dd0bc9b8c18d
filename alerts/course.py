"""One patient's course through the real engine and lifecycle, with the worker's clock (pure).

Shared by the clinicians' scenario runner (``alerts.scenarios``) and the protocol replay
(``alerts.replay``), so both feed events and drive the clock exactly the same way:

- an observation goes to ``Engine.evaluate_observation``, a dose/steroid event to
  ``Engine.apply_treatment``, a clinician action to ``AlertEngine.apply_action``; every
  finding goes through the lifecycle (``AlertEngine.apply_finding``), as in
  ``monitor.agents.clinical``;
- the clock ticks on a fixed grid (``anchor + k * step``, default hourly); each tick runs
  ``Engine.check_schedule`` and the lifecycle ``tick``, as the worker's ``patient-ticks`` do.
  :meth:`Course.advance` ticks every grid point strictly after the last tick and before an
  event's arrival, so an event arriving at ``t`` is fed after the ticks before ``t``.

Every alert version the lifecycle returns is passed to ``on_alerts`` (when given), so a
caller sees alerts that the book later prunes (closed alerts leave the book after
``LifecycleConfig.retention``).
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Callable, Iterable

from schemas.alert import Alert, AlertAction
from schemas.events import DoseEvent, Observation, SteroidEvent

from .engine import Engine
from .lifecycle import AlertEngine, LifecycleConfig
from .protocol import Protocol
from .routing import RouteSpec
from .state import PatientState

__all__ = ["Course", "lifecycle_for", "tick_times", "HOURLY"]

HOURLY = timedelta(hours=1)


def lifecycle_for(protocols: Iterable[Protocol], pseudonym_secret: bytes | str = "protocol-test") -> AlertEngine:
    """The lifecycle configured with the protocols' routes (first definition of a route id wins),
    as the worker builds it."""
    routes: dict[str, RouteSpec] = {}
    for p in protocols:
        for r in p.routes:
            routes.setdefault(r.id, RouteSpec.model_validate(r.model_dump()))
    return AlertEngine(LifecycleConfig(routes=routes, pseudonym_secret=pseudonym_secret))


def tick_times(anchor: datetime, start: datetime, end: datetime, step: timedelta) -> Iterable[datetime]:
    """Clock ticks on the grid ``anchor + k*step``, strictly after ``start`` and up to ``end``."""
    k = math.floor((start - anchor) / step) + 1
    t = anchor + k * step
    while t <= end:
        yield t
        k += 1
        t = anchor + k * step


class Course:
    """One patient's state and alert book, fed events and clock ticks."""

    __slots__ = ("engine", "life", "patient_id", "state", "book", "anchor", "step", "last_tick", "on_alerts")

    def __init__(self, engine: Engine, life: AlertEngine, patient_id: str, *, anchor: datetime,
                 step: timedelta = HOURLY, on_alerts: Callable[[list[Alert]], None] | None = None) -> None:
        if step <= timedelta(0):
            raise ValueError("the clock step must be > 0")
        self.engine = engine
        self.life = life
        self.patient_id = patient_id
        self.state = PatientState(patient_id)
        self.book = life.new_book(patient_id)
        self.anchor = anchor
        self.step = step
        #: the time of the last tick (None: the clock has not started)
        self.last_tick: datetime | None = None
        self.on_alerts = on_alerts

    # -- events ---------------------------------------------------------------------
    def _apply(self, findings, now: datetime) -> None:
        for f in findings:
            alerts = self.life.apply_finding(self.book, f, now)
            if alerts and self.on_alerts is not None:
                self.on_alerts(alerts)

    def observe(self, obs: Observation, now: datetime) -> None:
        self._apply(self.engine.evaluate_observation(self.state, obs, now), now)

    def treat(self, event: DoseEvent | SteroidEvent, now: datetime) -> None:
        self._apply(self.engine.apply_treatment(self.state, event, now), now)

    def act(self, action: AlertAction, now: datetime) -> None:
        alerts = self.life.apply_action(self.book, action, now)
        if alerts and self.on_alerts is not None:
            self.on_alerts(alerts)

    # -- clock ----------------------------------------------------------------------
    def clock(self, now: datetime) -> None:
        """One tick at ``now``: the schedule check and the lifecycle tick."""
        self._apply(self.engine.check_schedule(self.state, now), now)
        alerts = self.life.tick(self.book, now)
        if alerts and self.on_alerts is not None:
            self.on_alerts(alerts)

    def start(self, first: datetime) -> None:
        """Start the clock so that its first tick lands at or after ``first``."""
        self.last_tick = first - self.step

    def advance(self, until: datetime, *, inclusive: bool = True) -> None:
        """Tick every grid point after the last tick up to ``until`` (before it when not
        ``inclusive``: the ticks that precede an event arriving at ``until``)."""
        if self.last_tick is None:
            self.start(until)
        end = until if inclusive else until - timedelta(microseconds=1)
        for t in tick_times(self.anchor, self.last_tick, end, self.step):
            self.clock(t)
            self.last_tick = t
