"""``monitor mllp``: an asyncio MLLP listener for HL7 v2 ORU^R01 results.

For every framed message (``\\x0b`` ... ``\\x1c\\x0d``):

1. decode and validate it with ``schemas.ingest.decode('lab-results', raw, ...)``;
2. on success, publish each canonical observation to ``observations`` (key: patient
   id, value: ``obs.model_dump_json()``), wait for the broker's acknowledgement
   (``acks='all'``, idempotent producer), then answer **AA**;
3. on ``Rejected`` (or a message that cannot even be parsed), publish the ORIGINAL
   bytes to ``dead-letter`` with the ``dlq.*`` headers, wait for the broker, then
   answer **AE** with the reason in MSA-3 / ERR;
4. if the broker write fails or times out (either topic), answer **AR** -- and never
   AA -- so the sender keeps the message and retries.

Before that, the MSH alone is screened: a processing id (MSH-11) other than the
configured one (``HL7_PROCESSING_ID``, default ``P``) is answered **AR** with ERR code
202, a message type no handler takes (see ``MllpServer.handlers``; today ORU^R01) **AR**
with ERR code 200; neither is stored anywhere.

Acknowledgement codes, as used here: **AA** = stored; **AE** = stored in dead-letter,
do not resend unchanged; **AR** = NOT stored: with ERR 207 (broker unavailable) resend,
with ERR 200/202 (refused by the MSH screen) do not resend to this link. Delivery is at-least-once: if
a message with several observations fails half-way, the retry writes the earlier
ones again (same observation ids; consumers de-duplicate by id).

Frames larger than ``max_message_bytes`` are drained, their first
``max_message_bytes`` bytes go to dead-letter (``payload_too_large``) and the answer
is AE. A connection that closes mid-frame gets no answer (the sender retries).
No patient identifier is logged at INFO or above.

Hardening (security review M3; figures in ``bench/bench_hostile_hl7.py``):

* at most ``max_connections`` open connections and ``max_connections_per_peer`` per
  peer address; more are closed at accept (``monitor_mllp_connections_refused_total``);
* an optional allow-list of peer networks (``MLLP_ALLOWED_PEERS``, CIDRs);
* optional TLS (``MLLP_TLS_CERT``/``MLLP_TLS_KEY``) and mutual TLS
  (``MLLP_TLS_CLIENT_CA``: a client certificate signed by that CA is required);
* a whole-frame deadline (``frame_timeout``, from the first byte of a frame to its end
  block, so trickling one byte at a time does not keep a frame open) and an idle
  timeout between frames;
* linear framing: the end block is searched for only in bytes not scanned before;
* HL7 parsing is bounded (``schemas.hl7v2.Hl7Limits``) and the ACK reads the MSH
  segment only, so one hostile frame costs well under a millisecond of the loop.

The CLI refuses to listen on a non-loopback address without TLS or an allow-list.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import ssl
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from typing import Any, Callable

from schemas.errors import Reason, Rejected
from schemas.hl7v2 import build_ack, check_processing_id, message_kind, read_msh, unsupported
from schemas.ingest import DEFAULT_LIMITS, LAB_RESULTS, Limits, decode, detect_format

from . import metrics as m
from .dlq import dead_letter_headers
from .kafka_config import aiokafka_config
from .settings import get_settings, is_loopback

log = logging.getLogger("monitor.mllp")

START_BLOCK = b"\x0b"
END_FRAME = b"\x1c\x0d"
DEFAULT_PORT = 2575
SOURCE_TOPIC = "mllp"


class BrokerUnavailable(Exception):
    """The write was not acknowledged by the broker."""


class FrameTimeout(Exception):
    """A frame was not complete within ``frame_timeout`` of its first byte."""


def parse_networks(spec: str | list[str] | None) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None:
    """``"10.1.0.0/16, 127.0.0.1"`` -> networks; empty -> ``None`` (no allow-list)."""
    if not spec:
        return None
    items = spec.split(",") if isinstance(spec, str) else spec
    nets = [ipaddress.ip_network(x.strip(), strict=False) for x in items if x.strip()]
    return nets or None


def peer_allowed(host: str | None, networks) -> bool:
    if networks is None:
        return True
    try:
        ip = ipaddress.ip_address((host or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


def server_ssl_context(cert: str, key: str | None = None, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS for the listener; with ``client_ca`` the peer must present a certificate it signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# ---------------------------------------------------------------- Kafka sink


class KafkaSink:
    """Owns an aiokafka producer; (re)starts it lazily so the listener can come up,
    and answer AR, while the broker is down."""

    def __init__(
        self,
        bootstrap: str | None = None,
        *,
        producer_factory: Callable[[], Any] | None = None,
        send_timeout: float = 10.0,
        client_id: str = "monitor-mllp",
        client_config: dict[str, Any] | None = None,
    ) -> None:
        if producer_factory is None:
            if not bootstrap:
                raise ValueError("bootstrap servers or a producer_factory are required")
            # TLS / SASL options from the service settings (monitor.kafka_config)
            extra = {k: v for k, v in (client_config or {}).items() if k != "bootstrap_servers"}

            def producer_factory() -> Any:
                from aiokafka import AIOKafkaProducer

                return AIOKafkaProducer(
                    **extra,
                    bootstrap_servers=bootstrap,
                    client_id=client_id,
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=0,
                    request_timeout_ms=int(send_timeout * 1000),
                    retry_backoff_ms=100,
                    max_request_size=2 * 1024 * 1024,
                )

        self._factory = producer_factory
        self._producer: Any = None
        self._lock = asyncio.Lock()
        self.send_timeout = send_timeout

    async def _ensure(self) -> Any:
        if self._producer is not None:
            return self._producer
        async with self._lock:
            if self._producer is None:
                producer = self._factory()
                try:
                    await asyncio.wait_for(producer.start(), self.send_timeout)
                except BaseException:
                    try:
                        await asyncio.wait_for(producer.stop(), 5)
                    except BaseException:
                        pass
                    raise
                self._producer = producer
        return self._producer

    async def send_all(self, records: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]] | None]]) -> None:
        """Write (topic, key, value, headers) records; return only when ALL are acknowledged."""
        try:
            producer = await self._ensure()

            async def _send() -> None:
                futures = [
                    await producer.send(topic, value=value, key=key, headers=headers)
                    for topic, key, value, headers in records
                ]
                await asyncio.gather(*futures)

            await asyncio.wait_for(_send(), self.send_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._reset()
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _reset(self) -> None:
        # After a failure, start over with a fresh producer on the next message: a
        # producer whose start failed cannot be reused, and one whose sends time out
        # may hold a queue of records we have already answered AR for.
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), 5)
            except BaseException:
                pass

    async def close(self) -> None:
        await self._reset()


# ---------------------------------------------------------------- stats


@dataclass
class Stats:
    messages: int = 0
    accepted: int = 0
    dead_lettered: int = 0
    broker_failures: int = 0
    observations: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    #: answered AR from the MSH (processing id, message type), nothing stored
    refused_by_reason: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- server


#: the ``type`` label of ``monitor_mllp_messages_total``: bounded, from MSH-9 only
_TYPE_LABELS = {"oru": "ORU^R01", "adt": "ADT"}


def message_type_label(raw: bytes) -> str:
    """``ORU^R01``, ``ADT`` (A01/A04/A08/A31), ``other`` (any other MSH-9) or ``none`` (no
    readable MSH): a bounded label whatever the sender writes (never a field's raw text)."""
    try:
        msh = read_msh(raw)
    except Exception:
        return "none"
    if msh is None:
        return "none"
    return _TYPE_LABELS.get(message_kind(msh), "other")


class MllpServer:
    """What :func:`serve_mllp` returns: ``await server.stop()`` to shut down."""

    def __init__(
        self,
        sink: KafkaSink,
        *,
        observations_topic: str = "observations",
        dead_letter_topic: str = "dead-letter",
        max_message_bytes: int = DEFAULT_LIMITS.max_bytes,
        limits: Limits = DEFAULT_LIMITS,
        default_tz: tzinfo | None = None,
        owns_sink: bool = True,
        idle_timeout: float | None = 300.0,
        frame_timeout: float | None = 30.0,
        max_connections: int = 64,
        max_connections_per_peer: int = 16,
        allowed_peers=None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sink = sink
        self.observations_topic = observations_topic
        self.dead_letter_topic = dead_letter_topic
        self.max_message_bytes = max_message_bytes
        self.limits = limits
        self.default_tz = default_tz
        self.owns_sink = owns_sink
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.allowed_peers = parse_networks(allowed_peers) if isinstance(allowed_peers, (str, list)) else allowed_peers
        self.ssl_context = ssl_context
        self.stats = Stats()
        m.MLLP_MAX_CONNECTIONS.set(max_connections)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._per_peer: dict[str, int] = {}

    # -- lifecycle
    async def start(self, host: str, port: int) -> "MllpServer":
        kw: dict[str, Any] = {}
        if self.ssl_context is not None:
            kw = {"ssl": self.ssl_context, "ssl_handshake_timeout": self.frame_timeout or 30.0}
        self._server = await asyncio.start_server(self._on_connection, host, port, **kw)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    @property
    def sockets(self):
        return self._server.sockets if self._server else ()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except asyncio.TimeoutError:
                pass
        if self.owns_sink:
            await self.sink.close()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    # -- connections
    def _refuse(self, peer: str) -> str | None:
        if not peer_allowed(peer, self.allowed_peers):
            return "not_allowed"
        if len(self._connections) >= self.max_connections:
            return "connection_cap"
        if self._per_peer.get(peer, 0) >= self.max_connections_per_peer:
            return "peer_cap"
        return None

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        refused = self._refuse(peer)
        if refused is not None:
            m.MLLP_REFUSED.labels(reason=refused).inc()
            log.warning("mllp: connection refused (%s)", refused)
            try:
                writer.close()
            except Exception:
                pass
            return
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        m.MLLP_CONNECTIONS.set(len(self._connections))
        buf = bytearray()
        why = "eof"
        try:
            while True:
                frame = await self._read_frame(reader, buf)
                if frame is None:
                    break
                raw, oversized_len = frame
                ack = await self.handle(raw, oversized_len=oversized_len)
                writer.write(START_BLOCK + ack + END_FRAME)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            why = "error"
        except FrameTimeout:
            why = "frame_timeout"
            log.info("mllp: closing a connection whose frame took longer than %ss", self.frame_timeout)
        except asyncio.TimeoutError:
            why = "idle_timeout"
            log.info("mllp: closing idle connection")
        except asyncio.CancelledError:
            why = "shutdown"
        except Exception:
            why = "error"
            log.exception("mllp: connection handler failed")
        finally:
            m.MLLP_CLOSED.labels(reason=why).inc()
            if task is not None:
                self._connections.discard(task)
            left = self._per_peer.get(peer, 1) - 1
            if left > 0:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)
            m.MLLP_CONNECTIONS.set(len(self._connections))
            try:
                writer.close()
            except Exception:
                pass

    async def _chunk(self, reader: asyncio.StreamReader, frame_deadline: float | None = None) -> bytes:
        timeout = self.idle_timeout
        if frame_deadline is not None:
            left = frame_deadline - time.monotonic()
            if left <= 0:
                raise FrameTimeout()
            if timeout is None or left < timeout:
                try:
                    return await asyncio.wait_for(reader.read(65536), left)
                except asyncio.TimeoutError:
                    raise FrameTimeout() from None
        read = reader.read(65536)
        return await (asyncio.wait_for(read, timeout) if timeout else read)

    async def _read_frame(self, reader: asyncio.StreamReader, buf: bytearray) -> tuple[bytes, int | None] | None:
        """Next frame's payload (framing removed), or None at EOF.

        Returns ``(payload, None)``, or ``(first max bytes, full length)`` when the frame
        is larger than ``max_message_bytes`` (the rest is read and discarded).
        """
        limit = self.max_message_bytes + 1  # payload plus the start block
        kept: bytearray | None = None
        total = 0
        scan = 0  # bytes before this offset hold no END_FRAME: never rescanned (linear)
        deadline: float | None = None
        while True:
            if deadline is None:
                # whitespace between frames does not start a frame (or its deadline)
                if buf[:1].isspace():
                    stripped = buf.lstrip()
                    buf[:] = stripped
                if buf and self.frame_timeout is not None:
                    deadline = time.monotonic() + self.frame_timeout
            end = buf.find(END_FRAME, scan)
            if end != -1:
                block = bytes(buf[:end])
                del buf[: end + len(END_FRAME)]
                if kept is None and len(block) <= limit:
                    start = block.find(START_BLOCK)
                    return (block[start + 1 :] if start != -1 else block), None
                kept = kept if kept is not None else bytearray()
                total += len(block)
                if len(kept) < limit:
                    kept += block[: limit - len(kept)]
                payload = bytes(kept)
                start = payload.find(START_BLOCK)
                payload = payload[start + 1 :] if start != -1 else payload
                return payload[: self.max_message_bytes], total
            if len(buf) > limit + 1:
                # oversized: keep the head, drop the rest (but keep a trailing 0x1c)
                if kept is None:
                    kept = bytearray()
                cut = len(buf) - 1
                total += cut
                if len(kept) < limit:
                    kept += buf[: min(cut, limit - len(kept))]
                del buf[:cut]
            scan = max(0, len(buf) - len(END_FRAME) + 1)
            chunk = await self._chunk(reader, deadline)
            if not chunk:
                if buf.strip() or kept:
                    log.warning("mllp: connection closed inside a frame; not acknowledged")
                return None
            buf += chunk

    # -- one message
    async def handle(self, raw: bytes, *, oversized_len: int | None = None) -> bytes:
        """Process one message payload and return the ACK bytes (unframed)."""
        ack = await self._handle(raw, oversized_len=oversized_len)
        code = ack[ack.find(b"MSA|") + 4 : ack.find(b"MSA|") + 6].decode("ascii", "replace")
        m.MLLP_MESSAGES.labels(ack=code if code in ("AA", "AE", "AR") else "other", type=message_type_label(raw)).inc()
        return ack

    async def _handle(self, raw: bytes, *, oversized_len: int | None = None) -> bytes:
        self.stats.messages += 1
        received_at = datetime.now(timezone.utc)
        try:
            if oversized_len is not None:
                raise Rejected(
                    Reason.PAYLOAD_TOO_LARGE,
                    f"frame of {oversized_len} bytes exceeds {self.max_message_bytes}; first bytes kept",
                )
            if not raw.strip():
                raise Rejected(Reason.EMPTY_PAYLOAD, "empty message")
            if detect_format(raw) != "hl7":
                raise Rejected(Reason.HL7_INVALID, "not an HL7 v2 message (no MSH segment)")
            handler = self._oru
            msh = read_msh(raw)
            if msh is not None:  # (no readable MSH: the ORU parser dead-letters it as hl7_invalid)
                # MSH screening: answered AR from the MSH alone, NOTHING stored (the sender keeps it)
                try:
                    check_processing_id(msh, getattr(self.limits, "hl7_processing_id", "P"))
                    handler = self.handlers.get(message_kind(msh))
                    if handler is None:
                        raise unsupported(msh, "/".join(k.upper() for k in self.handlers))
                except Rejected as rej:
                    return self._refuse_message(raw, rej)
            return await handler(raw, received_at)
        except Rejected as rej:
            return await self._dead_letter(raw, rej, received_at)
        except Exception as exc:  # a bug: still keep the bytes
            log.exception("mllp: unexpected error while decoding")
            return await self._dead_letter(
                raw, Rejected(Reason.INTERNAL_ERROR, f"internal error {type(exc).__name__}"), received_at
            )

    @property
    def handlers(self) -> dict[str, Callable]:
        """Message kind (``schemas.hl7v2.message_kind``) -> ``async handler(raw, received_at)``
        returning the ACK bytes (a ``Rejected`` it raises is dead-lettered, AE): the ONE
        dispatch table. A kind not listed is answered AR / ERR 200 and not stored."""
        return {"oru": self._oru, "adt": self._adt}

    async def _oru(self, raw: bytes, received_at: datetime) -> bytes:
        """ORU^R01: observations to ``observations``, then AA (AR if the broker fails)."""
        observations = self._decode(raw, received_at)
        records = [
            (self.observations_topic, o.patient_id.encode(), o.model_dump_json().encode(), None)
            for o in observations
        ]
        return await self._store(raw, records, observations=len(observations))

    async def _adt(self, raw: bytes, received_at: datetime) -> bytes:
        """ADT^A01/A04/A08/A31: the canonical ``PatientRecord`` to ``patients`` (keyed by patient
        id), then AA; an invalid one raises ``Rejected`` (dead-lettered, AE)."""
        from schemas.patients import patient_from_adt

        patient = patient_from_adt(raw.decode("utf-8", "replace"))
        topic = self.patients_topic or get_settings().topic_patients
        return await self._store(raw, [(topic, patient.patient_id.encode(), patient.model_dump_json().encode(), None)])

    async def _store(self, raw: bytes, records: list, *, observations: int = 0) -> bytes:
        """Write ``records``; AA once the broker acknowledged them, AR (resend) if it cannot."""
        try:
            await self.sink.send_all(records)
        except BrokerUnavailable as exc:
            self.stats.broker_failures += 1
            log.warning("mllp: broker write failed, answering AR: %s", exc)
            return build_ack(raw, "AR", "results not stored (broker unavailable); please resend")
        self.stats.accepted += 1
        self.stats.observations += observations
        log.debug("mllp: accepted a message with %d observations", observations)
        return build_ack(raw, "AA")

    #: where ADT^A01/A04/A08/A31 demographics go (canonical ``PatientRecord``, keyed by patient id)
    patients_topic: str | None = None

    def _refuse_message(self, raw: bytes, rej: Rejected) -> bytes:
        """AR from the MSH alone: wrong processing id (202) or unsupported type (200)."""
        self.stats.refused_by_reason[rej.reason.value] = self.stats.refused_by_reason.get(rej.reason.value, 0) + 1
        log.info("mllp: message refused (AR), reason %s", rej.reason.value)
        return build_ack(raw, "AR", f"{rej.reason.value}: {rej.message}", reason=rej.reason, location=rej.location)

    def _decode(self, raw: bytes, received_at: datetime):
        decoded = decode(LAB_RESULTS, raw, received_at=received_at, limits=self.limits, default_tz=self.default_tz)
        if not isinstance(decoded, list):
            raise Rejected(Reason.UNKNOWN_FORMAT, "not a lab result")
        return decoded

    async def _dead_letter(self, raw: bytes, rej: Rejected, received_at: datetime) -> bytes:
        m.MLLP_PARSE_ERRORS.labels(reason=rej.reason.value).inc()  # a bounded reason code (schemas.errors)
        # no source partition/offset: the bytes came over TCP, not from a topic
        headers = dead_letter_headers(rej.reason, rej.message, SOURCE_TOPIC, None, None, received_at)
        try:
            await self.sink.send_all([(self.dead_letter_topic, None, raw, headers)])
        except BrokerUnavailable as exc:
            self.stats.broker_failures += 1
            log.warning("mllp: dead-letter write failed (%s), answering AR: %s", rej.reason.value, exc)
            return build_ack(raw, "AR", "message not stored (broker unavailable); please resend")
        self.stats.dead_lettered += 1
        self.stats.rejected_by_reason[rej.reason.value] = self.stats.rejected_by_reason.get(rej.reason.value, 0) + 1
        log.info("mllp: message dead-lettered, reason %s", rej.reason.value)
        return build_ack(raw, "AE", f"{rej.reason.value}: {rej.message}", reason=rej.reason,
                         location=rej.location)


async def serve_mllp(
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    bootstrap: str | None = None,
    producer_factory: Callable[[], Any] | None = None,
    observations_topic: str = "observations",
    dead_letter_topic: str = "dead-letter",
    max_message_bytes: int = DEFAULT_LIMITS.max_bytes,
    send_timeout: float = 10.0,
    limits: Limits = DEFAULT_LIMITS,
    default_tz: tzinfo | None = None,
    idle_timeout: float | None = 300.0,
    client_config: dict[str, Any] | None = None,
    frame_timeout: float | None = 30.0,
    max_connections: int = 64,
    max_connections_per_peer: int = 16,
    allowed_peers=None,
    ssl_context: ssl.SSLContext | None = None,
) -> MllpServer:
    """Start the listener (port 0 picks a free port: see ``server.port``).

    Give ``bootstrap`` (an aiokafka producer with acks='all' is made) or a
    ``producer_factory`` returning an object with aiokafka's ``start``/``send``/``stop``.
    """
    sink = KafkaSink(bootstrap, producer_factory=producer_factory, send_timeout=send_timeout,
                     client_config=client_config)
    server = MllpServer(
        sink,
        observations_topic=observations_topic,
        dead_letter_topic=dead_letter_topic,
        max_message_bytes=max_message_bytes,
        limits=limits,
        default_tz=default_tz,
        idle_timeout=idle_timeout,
        frame_timeout=frame_timeout,
        max_connections=max_connections,
        max_connections_per_peer=max_connections_per_peer,
        allowed_peers=allowed_peers,
        ssl_context=ssl_context,
    )
    return await server.start(host, port)


# ---------------------------------------------------------------- CLI


def mllp_limits(settings) -> Limits:
    """The parsing options of the listener: processing id and code maps from the settings."""
    from dataclasses import replace

    from schemas.codemaps import load_code_maps

    return replace(DEFAULT_LIMITS, hl7_processing_id=settings.hl7_processing_id,
                   code_maps=load_code_maps(settings.code_maps_dir))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monitor mllp", description="HL7 v2 ORU^R01 MLLP listener -> Kafka")
    p.add_argument("--host", default=os.environ.get("MLLP_HOST", "127.0.0.1"),
                   help="address to bind (env MLLP_HOST; default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("MLLP_PORT", DEFAULT_PORT)),
                   help=f"port to bind (env MLLP_PORT; default: {DEFAULT_PORT})")
    settings = get_settings()
    p.add_argument("--bootstrap", default=settings.kafka_bootstrap_servers,
                   help="Kafka bootstrap servers (env KAFKA_BOOTSTRAP_SERVERS; default: %(default)s)")
    p.add_argument("--observations-topic", default=settings.topic_observations,
                   help="topic the canonical observations are written to (env TOPIC_OBSERVATIONS; default: %(default)s)")
    p.add_argument("--dead-letter-topic", default=settings.topic_dead_letter,
                   help="topic rejected messages are written to (env TOPIC_DEAD_LETTER; default: %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_LIMITS.max_bytes,
                   help="largest HL7 message accepted, bytes (default: %(default)s)")
    p.add_argument("--send-timeout", type=float, default=10.0, help="seconds to wait for the broker's ack (default: %(default)s)")
    p.add_argument(
        "--default-tz",
        default=None,
        help="IANA zone applied to HL7 timestamps without offset (default: reject them)",
    )
    env = os.environ.get
    p.add_argument("--max-connections", type=int, default=int(env("MLLP_MAX_CONNECTIONS", 64)),
                   help="connections open at once (env MLLP_MAX_CONNECTIONS; default: %(default)s)")
    p.add_argument("--max-connections-per-peer", type=int, default=int(env("MLLP_MAX_CONNECTIONS_PER_PEER", 16)),
                   help="connections open at once from one address (env MLLP_MAX_CONNECTIONS_PER_PEER; "
                        "default: %(default)s)")
    p.add_argument("--frame-timeout", type=float, default=float(env("MLLP_FRAME_TIMEOUT_SECONDS", 30)),
                   help="seconds from a frame's first byte to its end block (env MLLP_FRAME_TIMEOUT_SECONDS; default: %(default)s)")
    p.add_argument("--idle-timeout", type=float, default=float(env("MLLP_IDLE_TIMEOUT_SECONDS", 300)),
                   help="seconds without a byte between frames before the connection is closed "
                        "(env MLLP_IDLE_TIMEOUT_SECONDS; default: %(default)s)")
    p.add_argument("--allowed-peers", default=env("MLLP_ALLOWED_PEERS", ""),
                   help="comma-separated networks (CIDR) allowed to connect (env MLLP_ALLOWED_PEERS; default: empty = any)")
    p.add_argument("--tls-cert", default=env("MLLP_TLS_CERT", ""), help="PEM certificate (chain): serve MLLP over TLS (env MLLP_TLS_CERT; default: none, cleartext)")
    p.add_argument("--tls-key", default=env("MLLP_TLS_KEY", ""), help="PEM private key if not in --tls-cert (env MLLP_TLS_KEY; default: none)")
    p.add_argument("--tls-client-ca", default=env("MLLP_TLS_CLIENT_CA", ""),
                   help="PEM CA bundle: require a client certificate it signed, mutual TLS (env MLLP_TLS_CLIENT_CA; default: none)")
    p.add_argument("--metrics-port", type=int, default=int(env("MLLP_METRICS_PORT", 0)),
                   help="serve Prometheus metrics on this port (env MLLP_METRICS_PORT; default: 0 = off)")
    p.add_argument("--metrics-host", default=env("MLLP_METRICS_HOST", "127.0.0.1"),
                   help="address of the metrics endpoint (env MLLP_METRICS_HOST; default: %(default)s)")
    p.add_argument("--log-level", default="INFO", help="log level: DEBUG, INFO, WARNING or ERROR (default: %(default)s)")
    return p


def check_exposure(host: str, tls: bool, allowed_peers) -> str | None:
    """Why the listener must not start (None = fine): a non-loopback bind accepts
    results for any patient from anything that reaches the port, so it needs TLS
    (``MLLP_TLS_CERT``) or an allow-list (``MLLP_ALLOWED_PEERS``)."""
    if is_loopback(host) or tls or allowed_peers:
        return None
    return (f"refusing to listen on {host}: set MLLP_TLS_CERT (with MLLP_TLS_CLIENT_CA for mutual TLS) "
            "or MLLP_ALLOWED_PEERS, or bind to 127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tz = None
    if args.default_tz:
        from zoneinfo import ZoneInfo

        tz = ZoneInfo(args.default_tz)
    from .settings import secret_problems

    for problem in secret_problems("mllp", get_settings()):
        print(f"monitor mllp: refusing to start: {problem}", file=sys.stderr)
        return 2
    allowed = parse_networks(args.allowed_peers)
    problem = check_exposure(args.host, bool(args.tls_cert), allowed)
    if problem:
        print(f"monitor mllp: {problem}", file=sys.stderr)
        return 2
    ctx = server_ssl_context(args.tls_cert, args.tls_key or None, args.tls_client_ca or None) if args.tls_cert else None
    if args.metrics_port:
        from prometheus_client import start_http_server

        import platform
        from importlib import metadata

        try:
            version = metadata.version("sma-gene-therapy-monitor")
        except metadata.PackageNotFoundError:
            version = "unknown"
        m.BUILD_INFO.info({"version": version, "python": platform.python_version(), "component": "mllp"})
        # its own families only (monitor_mllp_*, build info): no worker gauge at zero in this scrape
        start_http_server(args.metrics_port, addr=args.metrics_host,
                          registry=m.component_registry("monitor_mllp_", "monitor_build"))

    async def run() -> None:
        server = await serve_mllp(
            args.host, args.port, bootstrap=args.bootstrap, observations_topic=args.observations_topic,
            dead_letter_topic=args.dead_letter_topic, max_message_bytes=args.max_message_bytes,
            send_timeout=args.send_timeout, default_tz=tz, client_config=aiokafka_config(get_settings()),
            limits=mllp_limits(get_settings()),
            frame_timeout=args.frame_timeout or None, idle_timeout=args.idle_timeout or None,
            max_connections=args.max_connections, max_connections_per_peer=args.max_connections_per_peer,
            allowed_peers=allowed, ssl_context=ctx,
        )
        log.info("mllp: listening on %s:%d", args.host, server.port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except NotImplementedError:  # pragma: no cover
                pass
        await stop.wait()
        log.info("mllp: stopping")
        await server.stop()
        s = server.stats
        log.info(
            "mllp: %d messages, %d accepted, %d dead-lettered, %d broker failures",
            s.messages, s.accepted, s.dead_lettered, s.broker_failures,
        )

    asyncio.run(run())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
