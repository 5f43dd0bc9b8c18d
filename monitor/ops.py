"""Operational wiring: faust's Prometheus sensor, consumer lag, build info.

Imported once from ``monitor.app`` (after the agents and web views are registered)::

    from . import ops  # noqa: E402,F401

- faust's Prometheus sensor registers into ``monitor.metrics.REGISTRY`` so the one
  ``/metrics`` page serves both. Its names carry the fixed prefix ``monitor_faust_``
  (not the app id, which differs per deployment and per test), its histograms are in
  milliseconds, and its labels are topic, partition, stream, table name, operation,
  status code and faust's own metric names: never a message key or value.
- a timer sets ``monitor_consumer_lag_messages{topic,partition}`` = end offset minus
  committed offset for every input partition assigned to this worker (changelog
  partitions excluded). Series of partitions no longer assigned are removed.
- ``monitor_build_info{version,faust,python}``. ``monitor_protocol_info`` is set where
  the protocols are loaded.

Nothing here may crash the worker: every timer body catches and logs (without data).
"""
from __future__ import annotations

import asyncio
import logging
import os
import platform
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

import faust
from faust.sensors.prometheus import setup_prometheus_sensors

from .app import app
from .metrics import BUILD_INFO, CONSUMER_LAG, REGISTRY

log = logging.getLogger(__name__)

DISTRIBUTION = "sma-gene-therapy-monitor"
FAUST_METRICS_PREFIX = "monitor_faust"
#: faust's sensor also registers a page; it serves the same registry as ``/metrics``
FAUST_METRICS_PAGE = "/faust/metrics"
LAG_INTERVAL_SECONDS = float(os.environ.get("MONITOR_LAG_INTERVAL_SECONDS", "10"))
LAG_TIMEOUT_SECONDS = 5.0


def build_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def set_build_info() -> None:
    BUILD_INFO.info({"version": build_version(), "faust": faust.__version__, "python": platform.python_version()})


def attach_prometheus_sensor(faust_app: Any = app, registry=REGISTRY) -> None:
    """Attach faust's sensor once; a second call (re-import in tests) is a no-op."""
    if getattr(faust_app, "_monitor_prometheus_attached", False):
        return
    setup_prometheus_sensors(faust_app, pattern=FAUST_METRICS_PAGE, registry=registry, name_prefix=FAUST_METRICS_PREFIX)
    faust_app._monitor_prometheus_attached = True


def changelog_topics(faust_app: Any = app) -> set[str]:
    names: set[str] = set()
    try:
        for table in faust_app.tables.values():
            try:
                names.add(table.changelog_topic.get_topic_name())
            except Exception:  # pragma: no cover - defensive
                pass
    except Exception:  # pragma: no cover - defensive
        pass
    return names


def _is_input(topic: str, excluded: set[str]) -> bool:
    return topic not in excluded and not topic.endswith("-changelog") and not topic.startswith("__")


_lag_labels: set[tuple[str, str]] = set()


_earliest_cache: dict[Any, int] = {}


async def compute_lag(consumer: Any, excluded: Iterable[str] = ()) -> dict[tuple[str, int], int]:
    """End offset minus committed offset per assigned input partition.

    ``consumer`` is faust's consumer: ``assignment()``, ``highwater(tp)`` (the log end
    offset the last fetch response reported: no network call), ``highwaters(*tps)`` (asks
    the broker; used only for partitions not fetched yet), ``earliest_offsets(*tps)`` and
    the committed offsets it tracks (``_committed_offset``: the next offset to read,
    Kafka's convention). A partition with nothing committed yet counts from its earliest
    offset (the group starts at ``earliest``); those are cached per partition.
    """
    excluded = set(excluded)
    tps = sorted((tp for tp in consumer.assignment() if _is_input(tp.topic, excluded)), key=lambda t: (t.topic, t.partition))
    if not tps:
        return {}
    ends: dict[Any, int | None] = {}
    for tp in tps:
        try:
            ends[tp] = consumer.highwater(tp)
        except Exception:
            ends[tp] = None
    unknown = [tp for tp in tps if ends[tp] is None]
    if unknown:
        ends.update(await asyncio.wait_for(consumer.highwaters(*unknown), LAG_TIMEOUT_SECONDS))
    committed_map: Mapping[Any, int | None] = getattr(consumer, "_committed_offset", {}) or {}
    committed = {tp: committed_map.get(tp) for tp in tps}
    missing = [tp for tp, off in committed.items() if off is None and tp not in _earliest_cache]
    if missing:
        earliest = await asyncio.wait_for(consumer.earliest_offsets(*missing), LAG_TIMEOUT_SECONDS)
        _earliest_cache.update({tp: off for tp, off in earliest.items() if off is not None})
    for tp, off in committed.items():
        if off is None:
            committed[tp] = _earliest_cache.get(tp)
    lag: dict[tuple[str, int], int] = {}
    for tp in tps:
        end, done = ends.get(tp), committed.get(tp)
        if end is None or done is None:
            continue
        lag[(tp.topic, tp.partition)] = max(0, int(end) - int(done))
    return lag


def publish_lag(lag: Mapping[tuple[str, int], int]) -> None:
    """Set the gauge for these partitions and remove series of partitions no longer held."""
    current = {(topic, str(partition)) for topic, partition in lag}
    for topic, partition in _lag_labels - current:
        try:
            CONSUMER_LAG.remove(topic, partition)
        except KeyError:
            pass
    for (topic, partition), value in lag.items():
        CONSUMER_LAG.labels(topic=topic, partition=str(partition)).set(value)
    _lag_labels.clear()
    _lag_labels.update(current)


async def update_consumer_lag(faust_app: Any = app) -> bool:
    """One timer tick. Returns False (and logs) on any failure; never raises."""
    try:
        if faust_app.rebalancing:
            return False
        lag = await compute_lag(faust_app.consumer, changelog_topics(faust_app))
        # the input topics are read by the batched ingest consumer, not by faust
        from .agents.ingest import INGEST

        lag.update(INGEST.lag())
        publish_lag(lag)
        return True
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a timer must never crash the worker
        log.warning("consumer lag update failed: %s", type(exc).__name__)
        return False


@app.timer(interval=LAG_INTERVAL_SECONDS)
async def consumer_lag_timer() -> None:
    await update_consumer_lag(app)


attach_prometheus_sensor(app, REGISTRY)
set_build_info()
