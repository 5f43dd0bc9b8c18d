"""The faust application: the worker's service runtime (web server, timers, tasks,
services), without faust's Kafka consumer, producer, agents or tables.

The hot paths (ingest, the clinical runner, delivery) are batched aiokafka loops hosted
as services of this app; what runs is composed in one place, ``monitor.worker``. Nothing
registers itself by being imported.
"""
from __future__ import annotations

from typing import Any

import faust

from .settings import Settings


class _RuntimeOnly(faust.App.BootStrategy):
    """Start faust's web server, sensors, timers and services, never its Kafka clients
    (the documented way to switch a part of the boot graph off is a subclass)."""

    enable_kafka = False


class ServiceApp(faust.App):
    BootStrategy = _RuntimeOnly


def faust_app_kwargs(s: Settings) -> dict[str, Any]:
    """The App settings of the worker (also what ``bench/bare_faust.py`` starts from)."""
    return dict(
        autodiscover=False,
        datadir=s.data_dir,
        web_enabled=True,
        web_host=s.web_host,
        web_port=s.web_port,
        web_bind=s.web_host,
        web_tables_enabled=False,
        web_router_enabled=False,
        web_in_thread=False,
    )


def create_app(s: Settings) -> faust.App:
    kwargs = faust_app_kwargs(s)
    app = ServiceApp(s.app_id, **kwargs)
    # faust lets APP_WEB_* environment variables override explicit arguments (security review
    # L3: APP_WEB_TABLES_ENABLED=true would bring back /table, APP_WEB_BIND another bind):
    # the web settings are pinned to ours after construction.
    for key, value in kwargs.items():
        if key.startswith("web_"):
            setattr(app.conf, key, value)
    return app
