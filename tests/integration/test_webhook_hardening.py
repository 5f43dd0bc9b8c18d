"""Webhook sink hardening (security review L4), against real local HTTP servers:
a 307 is not followed (the body and signature never reach the redirect target), a
receiver's error body is not logged, and the signature covers a timestamp and the
idempotency key, so a captured request fails verification later or with another key."""
from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from aiohttp import web

from monitor.notify.sinks import DeliveryError, WebhookSink, verify_signature

from test_sinks import _scenario

SECRET = b"hardening-test-secret-0123456789abcdef"


async def _serve(handler):
    app = web.Application()
    app.router.add_post("/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def test_redirects_are_not_followed_and_error_bodies_not_logged(caplog):
    alert = _scenario()[0]
    hits: list[str] = []
    captured: list[tuple[dict, bytes]] = []

    async def handler(request: web.Request):
        name = request.match_info["name"]
        hits.append(name)
        body = await request.read()
        if name == "redirect":
            raise web.HTTPTemporaryRedirect("/elsewhere")
        if name == "fail":
            return web.Response(status=500, text="SECRET-ECHO " + body.decode()[:50])
        captured.append((dict(request.headers), body))
        return web.Response(status=200)

    async def run():
        runner, base = await _serve(handler)
        try:
            for name in ("redirect", "fail"):
                sink = WebhookSink(f"{base}/{name}", SECRET)
                with pytest.raises(DeliveryError) as ei:
                    await sink.deliver(alert)
                await sink.close()
                logging.getLogger("test").warning("%s", ei.value)  # what the dispatcher would log
                assert "SECRET-ECHO" not in str(ei.value) and str(ei.value).endswith(("HTTP 307", "HTTP 500"))
            sink = WebhookSink(f"{base}/ok", SECRET)
            await sink.deliver(alert)
            await sink.close()
        finally:
            await runner.cleanup()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(run())
    assert hits == ["redirect", "fail", "ok"]  # never /elsewhere
    assert "SECRET-ECHO" not in caplog.text
    headers, body = captured[0]
    assert verify_signature(SECRET, body, headers)
    # replay protection: the same request later, or with a fresh idempotency key, fails
    assert not verify_signature(SECRET, body, headers, now=time.time() + 3600)
    assert not verify_signature(SECRET, body, {**headers, "Idempotency-Key": "other:1"})
    assert not verify_signature(SECRET, body, {**headers, "X-Signature-Timestamp": str(int(time.time()) + 1)})
    assert not verify_signature(SECRET, body + b" ", headers)
    assert json.loads(body)["alert_id"] == alert.alert_id
