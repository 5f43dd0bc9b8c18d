"""Operational wiring: faust's Prometheus sensor, consumer lag, build info.

- faust's Prometheus sensor registers into ``monitor.metrics.REGISTRY`` so the one
  ``/metrics`` page serves both. Its names carry the fixed prefix ``monitor_faust_``;
  faust no longer reads or writes Kafka here (the hot paths are aiokafka loops), so its
  series describe the web server and the runtime. Labels are never a message key or value.
- ``monitor_consumer_lag_messages{topic,partition}`` = log end offset minus committed
  offset for every input partition assigned to this worker, from the loops that consume
  (ingest, the clinical runner): their public ``highwater()`` and the offsets they
  committed. Series of partitions no longer assigned are removed.
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
    from alerts import compiled_core

    core = compiled_core.summary()
    BUILD_INFO.info({"version": build_version(), "faust": faust.__version__, "python": platform.python_version(),
                     "clinical_core": core})
    log.info("clinical core: %s (%s)", core, ", ".join(f"{m}: {how}" for m, how in compiled_core.status().items()))


#: registries faust's sensor is attached to (its metrics can be registered once per registry)
_SENSOR_REGISTRIES: set[int] = set()


def attach_prometheus_sensor(faust_app: Any, registry=REGISTRY) -> None:
    """Attach faust's sensor to the first app built on ``registry``; later calls (another
    app built in the same process, as in tests) are no-ops."""
    if id(registry) in _SENSOR_REGISTRIES:
        return
    setup_prometheus_sensors(faust_app, pattern=FAUST_METRICS_PAGE, registry=registry, name_prefix=FAUST_METRICS_PREFIX)
    _SENSOR_REGISTRIES.add(id(registry))


_lag_labels: set[tuple[str, str]] = set()


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


async def update_consumer_lag(providers: Iterable[Any]) -> bool:
    """One timer tick over objects with ``lag() -> {(topic, partition): messages}``.
    Returns False (and logs) on any failure; never raises."""
    try:
        lag: dict[tuple[str, int], int] = {}
        for p in providers:
            lag.update(p.lag())
        publish_lag(lag)
        return True
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a timer must never crash the worker
        log.warning("consumer lag update failed: %s", type(exc).__name__)
        return False
