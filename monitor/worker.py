"""The composition root of a worker: everything that runs, built and wired in one place.

One faust app per worker is the service runtime (web server, timers, services). It hosts:

- ``ingest``: the batched aiokafka loop raw inputs -> the patient stream ``observations``
  (observations, plus treatments and actions routed there keyed by patient), in
  this process (``INGEST_PROCESSES=0``, the default) or in that many processes of its
  own that this app supervises (``monitor.ingest_process``);
- ``clinical``: the clinical runner (engine + lifecycle over the patient store, restored
  from its changelog topic) on the patient stream;
- ``delivery``: the outbox consumer that pages the sinks;
- timers: the clinical clock (overdue samples, escalation) and the consumer-lag gauge;
- web: ``/healthz``, ``/readyz``, ``/metrics`` and the actions API.

Each loop is a :class:`Hosted` service: started with the app, restarted after a failure
(its clients closed and opened again; the loops resume from their committed offsets),
stopped cleanly with the worker (leaving the consumer groups, so partitions move at once).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import faust
from mode import Service

from alerts.engine import Engine
from alerts.lifecycle import LifecycleConfig
from alerts.protocol import default_protocols, load_protocol
from alerts.routing import RouteSpec

from .actions_auth import ActionAuthority
from .actions_api import ActionsAPI, register_actions_api
from .app import create_app
from .clinical.handoff import DecodedObservations
from .clinical.own_writes import OwnWrites
from .clinical.processor import ClinicalProcessor
from .clinical.runner import ClinicalRunner
from .clinical.store import InMemoryPatientStore
from .notify.outbox import DeliveryService
from .ingest import COUNTERS, IngestService, limits_of
from .ingest_process import IngestProcess
from .logs import quiet_client_loggers
from .metrics import (CLINICAL_CLOCK_FAILURES, CLINICAL_CLOCK_INTERVAL, CLINICAL_CLOCK_LAST_RUN, LOOP_RESTARTS,
                      PROTOCOL_INFO, configure_sources)
from .ops import LAG_INTERVAL_SECONDS, attach_prometheus_sensor, set_build_info, update_consumer_lag
from .settings import Settings, get_settings, is_loopback
from .web import register_web

log = logging.getLogger(__name__)


class Hosted(Service):
    """A loop (``run()`` / ``stop()``) as a faust service, restarted when it fails
    (``monitor_loop_restarts_total{loop=name}``, rule MonitorLoopRestarting)."""

    restart_delay = 2.0

    def __init__(self, component: Any, name: str, **kwargs: Any) -> None:
        self.component = component
        self.component_name = name
        self._restarts = LOOP_RESTARTS.labels(loop=name)  # the series exists at 0 from the start
        super().__init__(**kwargs)

    @Service.task
    async def _supervise(self) -> None:
        while not self.should_stop:
            try:
                await self.component.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.should_stop:
                    break  # its clients were closed by on_stop
                log.exception("%s loop stopped; restarting in %.0f s", self.component_name, self.restart_delay)
                self._restarts.inc()
            if self.should_stop:
                break  # run() returned because on_stop is stopping it
            await self.component.stop()
            await self.sleep(self.restart_delay)

    async def on_stop(self) -> None:
        await self.component.stop()


class _DeliveryLoop:
    """``DeliveryService`` (start/stop, tasks of its own) shaped as a loop."""

    def __init__(self, delivery: DeliveryService) -> None:
        self.delivery = delivery

    async def run(self) -> None:
        await self.delivery.start()
        await asyncio.Event().wait()  # its tasks run until stop()

    async def stop(self) -> None:
        await self.delivery.stop()


def load_protocols(s: Settings):
    if s.protocol_files.strip():
        return [load_protocol(p.strip()) for p in s.protocol_files.split(",") if p.strip()]
    return default_protocols()


def lifecycle_config(protocols, s: Settings) -> LifecycleConfig:
    routes = {}
    for p in protocols:
        for r in p.routes:
            routes.setdefault(r.id, RouteSpec.model_validate(r.model_dump()))
    return LifecycleConfig(routes=routes, pseudonym_secret=s.pseudonym_secret)


@dataclass
class Worker:
    settings: Settings
    app: faust.App
    #: the in-process ingest loop, or one :class:`IngestProcess` per ingest process
    ingest: list[IngestService | IngestProcess]
    runner: ClinicalRunner
    delivery: DeliveryService
    api: ActionsAPI

    def ready(self) -> bool:
        return all(i.ready.is_set() for i in self.ingest) and self.runner.ready.is_set()


def build_worker(s: Settings | None = None) -> Worker:
    s = s or get_settings()
    protocols = load_protocols(s)
    for p in protocols:
        PROTOCOL_INFO.labels(protocol_id=p.id, version=p.version).set(1)
    lifecycle = lifecycle_config(protocols, s)
    configure_sources(s.metrics_sources)  # bounded `source` label (review L2)
    store = InMemoryPatientStore()
    # ingest in this process hands its decoded observations to the clinical stage
    handoff = DecodedObservations(owned=lambda p: p in runner.owned) if s.ingest_processes == 0 else None
    engine = Engine(protocols, id_key=s.pseudonym_secret.encode("utf-8"))  # keyed finding ids (review H2)
    processor = ClinicalProcessor(engine, lifecycle, store, findings_topic=s.topic_findings,
                                  alerts_topic=s.topic_alerts, dead_letter_topic=s.topic_dead_letter,
                                  limits=limits_of(s),
                                  authority=ActionAuthority.from_file(s.inbox_users_file), handoff=handoff,
                                  routed_from=(s.topic_treatments, s.topic_alert_actions))
    runner = ClinicalRunner(s, processor, store)
    if s.ingest_processes == 0 and s.clinical_takes_own_writes:
        runner.own_writes = OwnWrites(s.topic_observations, owned=lambda p: p in runner.owned)
    ingest: list[IngestService | IngestProcess] = (
        [IngestService(s, handoff, runner.own_writes)] if s.ingest_processes == 0
        else [IngestProcess(i, COUNTERS.apply) for i in range(s.ingest_processes)])
    delivery = DeliveryService(s)

    async def publish_action(key: bytes, value: bytes):
        producer = runner.producer
        if producer is None:
            raise RuntimeError("producer not started")
        return await producer.send_and_wait(s.topic_alert_actions, value=value, key=key)

    api = ActionsAPI(s.inbox_users_file, find_alert=store.find_alert, publish=publish_action,
                     max_silence=lifecycle.max_silence,
                     exposed=not (is_loopback(s.web_host) or s.actions_api_allow_exposed))

    app = create_app(s)
    w = Worker(s, app, ingest, runner, delivery, api)
    loops: list[tuple[Any, str]] = [(i, "ingest" if len(ingest) == 1 else f"ingest-{n}") for n, i in enumerate(ingest)]
    for component, name in (*loops, (runner, "clinical"), (_DeliveryLoop(delivery), "delivery")):
        app.service(Hosted(component, name, loop=None))

    # the clock's last complete pass, from the start until its first (MonitorClinicalClockStalled)
    CLINICAL_CLOCK_INTERVAL.set(s.tick_interval_seconds)
    CLINICAL_CLOCK_LAST_RUN.set(time.time())

    @app.timer(interval=s.tick_interval_seconds)
    async def clinical_clock() -> None:
        """Overdue samples, escalation and silence expiry over the patients this worker owns."""
        try:
            await runner.tick()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the clock never stops the worker
            CLINICAL_CLOCK_FAILURES.labels(scope="pass").inc()
            log.warning("clinical clock failed: %s", type(exc).__name__)

    @app.timer(interval=LAG_INTERVAL_SECONDS)
    async def consumer_lag() -> None:
        await update_consumer_lag([*ingest, runner])

    @app.task
    async def watch_event_loop() -> None:
        """DEBUG only: report when the event loop, which ingest, the clinical runner and
        delivery share, was held for longer than 0.5 s (it delays every stage: an answered
        delivery's ledger write, a batch's acknowledgement)."""
        if not log.isEnabledFor(logging.DEBUG):
            return
        tick, report = 0.1, 0.5
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(tick)
            held = loop.time() - t - tick
            if held > report:
                log.debug("event loop held for %.2fs", held)

    @app.task
    async def quiet_library_loggers() -> None:
        """Client libraries log per message at DEBUG; never let that reach a production worker."""
        quiet_client_loggers()

    register_web(app, w.ready)
    register_actions_api(app, api)
    attach_prometheus_sensor(app)
    set_build_info()
    return w
