"""Web endpoints on the worker: health, readiness, Prometheus metrics.

Faust's table endpoints are off (``web_tables_enabled=False``); the server binds to
``WEB_HOST`` (loopback by default). Readiness is a function the composition root passes
in (ingest started, the clinical runner assigned and restored, delivery loaded).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import READY, REGISTRY


def register_web(app, ready: Callable[[], bool]) -> None:
    def is_ready() -> bool:
        ok = bool(ready())
        READY.set(1 if ok else 0)
        return ok

    @app.page("/healthz")
    async def healthz(web, request):
        return web.json({"status": "alive"})

    @app.page("/readyz")
    async def readyz(web, request):
        if is_ready():
            return web.json({"status": "ready"})
        return web.json({"status": "not ready"}, status=503)

    @app.page("/metrics")
    async def metrics(web, request):
        is_ready()
        # aiohttp refuses a charset inside content_type=; pass the header whole
        return web.bytes(generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})
