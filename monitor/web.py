"""Web endpoints on the worker: health, readiness, Prometheus metrics.

Faust's table endpoints are off (``web_tables_enabled=False``); the server binds to
``WEB_HOST`` (loopback by default).
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .app import app
from .metrics import READY, REGISTRY

_state = {"assigned": False}


@app.on_rebalance_complete.connect
async def _on_rebalance_complete(sender, **kwargs) -> None:  # pragma: no cover - wiring
    _state["assigned"] = True


def is_ready() -> bool:
    recovery = app.tables.recovery
    from .agents.ingest import INGEST

    ready = (bool(_state["assigned"]) and not app.rebalancing and recovery.completed.is_set()
             and not app.in_recovery and INGEST.ready.is_set())
    READY.set(1 if ready else 0)
    return ready


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
