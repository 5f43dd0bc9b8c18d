"""MLLP listener hardening (security review M3 and H1) against the real listener over
TCP and a real broker: connection caps, allow-list, frame deadline, TLS and mutual TLS,
hostile frames answered from the MSH alone, and the refusal to listen exposed."""
from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from monitor import metrics as m
from monitor.mllp import serve_mllp, server_ssl_context

from test_mllp import ORU, ack_code, read_all  # noqa: E402  (same directory)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
#: the listeners of the tests that count refusals (a process-wide counter) listen here, not on
#: 127.0.0.1. In one suite run (2026-12-03) a refusal was counted twice; the likely cause: tests
#: of the other xdist worker poll 127.0.0.1 on ports picked free in advance until their listener
#: is up, and the OS can give such a port to a listener here meanwhile. Nothing polls this
#: address. The clients' address is still 127.0.0.1.
LISTEN = "127.0.0.77"


def frame(text: str) -> bytes:
    return b"\x0b" + text.encode() + b"\x1c\r"


def oru(i: int) -> str:
    return ORU.format(ctl=f"CTL-{i}", mrn=f"MRN-{i}", n=i, alt=50, ast=40)


async def exchange(port: int, text: str, ssl_ctx=None, timeout: float = 20.0, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_ctx)
    try:
        writer.write(frame(text))
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\x1c\r"), timeout)
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 10.0) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(100), timeout)
    except (ConnectionError, ssl.SSLError):
        return True
    except asyncio.TimeoutError:
        return False
    return data == b""


def counter(metric, **labels) -> float:
    return metric.labels(**labels)._value.get()


async def test_connection_cap_and_per_peer_cap(kafka_bootstrap, topic_factory):
    topics = topic_factory("observations", "dead-letter")
    server = await serve_mllp(LISTEN, 0, bootstrap=kafka_bootstrap, max_connections=3,
                              max_connections_per_peer=2, observations_topic=topics["observations"],
                              dead_letter_topic=topics["dead-letter"])
    held = []
    try:
        before = counter(m.MLLP_REFUSED, reason="peer_cap")
        for _ in range(2):
            held.append(await asyncio.open_connection(LISTEN, server.port))
        await asyncio.sleep(0.2)
        r3, w3 = await asyncio.open_connection(LISTEN, server.port)
        assert await closed_by_server(r3)  # a third connection from the same address
        w3.close()
        assert counter(m.MLLP_REFUSED, reason="peer_cap") == before + 1
        # the held connections still work
        r, w = held[0]
        w.write(frame(oru(1)))
        await w.drain()
        assert ack_code(await asyncio.wait_for(r.readuntil(b"\x1c\r"), 20))[0] == "AA"
        # global cap: lift the per-peer cap, fill the listener
        server.max_connections_per_peer = 100
        held.append(await asyncio.open_connection(LISTEN, server.port))
        await asyncio.sleep(0.2)
        before = counter(m.MLLP_REFUSED, reason="connection_cap")
        r4, w4 = await asyncio.open_connection(LISTEN, server.port)
        assert await closed_by_server(r4)
        w4.close()
        assert counter(m.MLLP_REFUSED, reason="connection_cap") == before + 1
        # closing one makes room again
        held.pop()[1].close()
        await asyncio.sleep(0.3)
        assert ack_code(await exchange(server.port, oru(2), host=LISTEN))[0] == "AA"
    finally:
        for _, w in held:
            w.close()
        await server.stop()


async def test_allow_list_refuses_other_addresses(kafka_bootstrap, topic_factory):
    topics = topic_factory("observations", "dead-letter")
    server = await serve_mllp(LISTEN, 0, bootstrap=kafka_bootstrap, allowed_peers="10.20.0.0/16",
                              observations_topic=topics["observations"], dead_letter_topic=topics["dead-letter"])
    try:
        before = counter(m.MLLP_REFUSED, reason="not_allowed")
        r, w = await asyncio.open_connection(LISTEN, server.port)
        w.write(frame(oru(3)))
        assert await closed_by_server(r)
        w.close()
        assert counter(m.MLLP_REFUSED, reason="not_allowed") == before + 1
        server.allowed_peers = [__import__("ipaddress").ip_network("127.0.0.0/8")]
        assert ack_code(await exchange(server.port, oru(4), host=LISTEN))[0] == "AA"
    finally:
        await server.stop()
    assert len(read_all(kafka_bootstrap, topics["observations"], 2)) == 2  # only the allowed one (2 OBX)


async def test_trickled_frame_hits_the_frame_deadline(kafka_bootstrap, topic_factory):
    """Slowloris: one byte every 0.2 s used to reset a 600 s read timeout forever."""
    topics = topic_factory("observations", "dead-letter")
    server = await serve_mllp("127.0.0.1", 0, bootstrap=kafka_bootstrap, frame_timeout=1.0, idle_timeout=60,
                              observations_topic=topics["observations"], dead_letter_topic=topics["dead-letter"])
    try:
        before = counter(m.MLLP_CLOSED, reason="frame_timeout")
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"\x0bMSH|")
        closed = False
        for _ in range(50):  # up to 10 s of trickling; the deadline is 1 s
            try:
                w.write(b"x")
                await w.drain()
            except ConnectionError:
                closed = True
                break
            try:
                if await asyncio.wait_for(r.read(100), 0.2) == b"":
                    closed = True
                    break
            except asyncio.TimeoutError:
                pass
            except ConnectionError:
                closed = True
                break
        w.close()
        assert closed
        assert counter(m.MLLP_CLOSED, reason="frame_timeout") == before + 1
        # whitespace between frames does not start the deadline; a whole frame still works
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        w.write(b"\r\n")
        await asyncio.sleep(1.5)
        w.write(frame(oru(5)))
        await w.drain()
        assert ack_code(await asyncio.wait_for(r.readuntil(b"\x1c\r"), 20))[0] == "AA"
        w.close()
    finally:
        await server.stop()


async def test_hostile_frame_is_answered_from_its_msh(kafka_bootstrap, topic_factory):
    topics = topic_factory("observations", "dead-letter")
    server = await serve_mllp("127.0.0.1", 0, bootstrap=kafka_bootstrap, max_message_bytes=2 * 1024 * 1024,
                              limits=__import__("schemas.ingest", fromlist=["Limits"]).Limits(max_bytes=2 * 1024 * 1024),
                              observations_topic=topics["observations"], dead_letter_topic=topics["dead-letter"])
    storm_small = oru(6) + "NTE|1|" + "^&~" * 80_000 + "\r"
    storm_big = oru(7) + "NTE|1|" + "^&~" * 340_000 + "\r"
    try:
        a1 = await exchange(server.port, storm_small)
        a2 = await exchange(server.port, storm_big)
    finally:
        await server.stop()
    assert ack_code(a1) == ("AE", "CTL-6") and b"too_complex" in a1
    assert ack_code(a2) == ("AE", "CTL-7") and b"payload_too_large" in a2
    reasons = sorted(dict(r.headers)["dlq.reason"] for r in read_all(kafka_bootstrap, topics["dead-letter"], 2))
    assert reasons == [b"payload_too_large", b"too_complex"]


def make_certs(d: Path) -> dict[str, str]:
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=mllp-test-ca")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "lab"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext")
    return {k: str(d / k) for k in ("ca.pem", "server.pem", "server.key", "lab.pem", "lab.key")}


async def test_mutual_tls(kafka_bootstrap, topic_factory, tmp_path):
    certs = await asyncio.to_thread(make_certs, tmp_path)
    topics = topic_factory("observations", "dead-letter")
    ctx = server_ssl_context(certs["server.pem"], certs["server.key"], certs["ca.pem"])
    server = await serve_mllp("127.0.0.1", 0, bootstrap=kafka_bootstrap, ssl_context=ctx,
                              observations_topic=topics["observations"], dead_letter_topic=topics["dead-letter"])
    try:
        client = ssl.create_default_context(cafile=certs["ca.pem"])
        client.load_cert_chain(certs["lab.pem"], certs["lab.key"])
        assert ack_code(await exchange(server.port, oru(8), ssl_ctx=client))[0] == "AA"
        # no client certificate: the handshake (or the first read) fails, nothing is stored
        anonymous = ssl.create_default_context(cafile=certs["ca.pem"])
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await exchange(server.port, oru(9), ssl_ctx=anonymous)
        # cleartext against the TLS port gets no ACK
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError)):
            await exchange(server.port, oru(10), timeout=5)
    finally:
        await server.stop()
    records = read_all(kafka_bootstrap, topics["observations"], 2, timeout_s=10)
    assert len(records) == 2 and all(b'"FL-8:' in r.value for r in records)  # only the authenticated lab's


def test_cli_refuses_an_exposed_cleartext_listener():
    proc = subprocess.run([sys.executable, "-m", "monitor.cli", "mllp", "--host", "0.0.0.0", "--port", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert proc.returncode != 0
    assert "MLLP_ALLOWED_PEERS" in proc.stderr and "MLLP_TLS_CERT" in proc.stderr
