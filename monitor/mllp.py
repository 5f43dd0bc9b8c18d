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

Acknowledgement codes, as used here: **AA** = stored; **AE** = stored in dead-letter,
do not resend unchanged; **AR** = NOT stored, resend. Delivery is at-least-once: if
a message with several observations fails half-way, the retry writes the earlier
ones again (same observation ids; consumers de-duplicate by id).

Frames larger than ``max_message_bytes`` are drained, their first
``max_message_bytes`` bytes go to dead-letter (``payload_too_large``) and the answer
is AE. A connection that closes mid-frame gets no answer (the sender retries).
No patient identifier is logged at INFO or above.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from typing import Any, Callable

from schemas.errors import Reason, Rejected
from schemas.hl7v2 import build_ack
from schemas.ingest import DEFAULT_LIMITS, LAB_RESULTS, Limits, decode, detect_format

from .dlq import dead_letter_headers
from .kafka_config import aiokafka_config
from .settings import get_settings

log = logging.getLogger("monitor.mllp")

START_BLOCK = b"\x0b"
END_FRAME = b"\x1c\x0d"
DEFAULT_PORT = 2575
SOURCE_TOPIC = "mllp"


class BrokerUnavailable(Exception):
    """The write was not acknowledged by the broker."""


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


# ---------------------------------------------------------------- server


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
        idle_timeout: float | None = 600.0,
    ) -> None:
        self.sink = sink
        self.observations_topic = observations_topic
        self.dead_letter_topic = dead_letter_topic
        self.max_message_bytes = max_message_bytes
        self.limits = limits
        self.default_tz = default_tz
        self.owns_sink = owns_sink
        self.idle_timeout = idle_timeout
        self.stats = Stats()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    # -- lifecycle
    async def start(self, host: str, port: int) -> "MllpServer":
        self._server = await asyncio.start_server(self._on_connection, host, port)
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
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        buf = bytearray()
        try:
            while True:
                frame = await self._read_frame(reader, buf)
                if frame is None:
                    break
                raw, oversized_len = frame
                ack = await self.handle(raw, oversized_len=oversized_len)
                writer.write(START_BLOCK + ack + END_FRAME)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.TimeoutError:
            log.info("mllp: closing idle connection")
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("mllp: connection handler failed")
        finally:
            if task is not None:
                self._connections.discard(task)
            try:
                writer.close()
            except Exception:
                pass

    async def _chunk(self, reader: asyncio.StreamReader) -> bytes:
        read = reader.read(65536)
        return await (asyncio.wait_for(read, self.idle_timeout) if self.idle_timeout else read)

    async def _read_frame(self, reader: asyncio.StreamReader, buf: bytearray) -> tuple[bytes, int | None] | None:
        """Next frame's payload (framing removed), or None at EOF.

        Returns ``(payload, None)``, or ``(first max bytes, full length)`` when the frame
        is larger than ``max_message_bytes`` (the rest is read and discarded).
        """
        limit = self.max_message_bytes + 1  # payload plus the start block
        kept: bytearray | None = None
        total = 0
        while True:
            end = buf.find(END_FRAME)
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
            chunk = await self._chunk(reader)
            if not chunk:
                if buf.strip() or kept:
                    log.warning("mllp: connection closed inside a frame; not acknowledged")
                return None
            buf += chunk

    # -- one message
    async def handle(self, raw: bytes, *, oversized_len: int | None = None) -> bytes:
        """Process one message payload and return the ACK bytes (unframed)."""
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
            observations = self._decode(raw, received_at)
        except Rejected as rej:
            return await self._dead_letter(raw, rej, received_at)
        except Exception as exc:  # a bug: still keep the bytes
            log.exception("mllp: unexpected error while decoding")
            return await self._dead_letter(
                raw, Rejected(Reason.INTERNAL_ERROR, f"internal error {type(exc).__name__}"), received_at
            )
        records = [
            (self.observations_topic, o.patient_id.encode(), o.model_dump_json().encode(), None)
            for o in observations
        ]
        try:
            await self.sink.send_all(records)
        except BrokerUnavailable as exc:
            self.stats.broker_failures += 1
            log.warning("mllp: broker write failed, answering AR: %s", exc)
            return build_ack(raw, "AR", "results not stored (broker unavailable); please resend")
        self.stats.accepted += 1
        self.stats.observations += len(observations)
        log.debug("mllp: accepted a message with %d observations", len(observations))
        return build_ack(raw, "AA")

    def _decode(self, raw: bytes, received_at: datetime):
        if self.default_tz is None:
            decoded = decode(LAB_RESULTS, raw, received_at=received_at, limits=self.limits)
        else:
            from schemas.hl7v2 import observations_from_hl7

            if len(raw) > self.limits.max_bytes:
                raise Rejected(Reason.PAYLOAD_TOO_LARGE, f"payload of {len(raw)} bytes exceeds {self.limits.max_bytes}")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            decoded = observations_from_hl7(
                text, received_at=received_at, limits=self.limits, default_tz=self.default_tz
            )
        if not isinstance(decoded, list):
            raise Rejected(Reason.UNKNOWN_FORMAT, "not a lab result")
        return decoded

    async def _dead_letter(self, raw: bytes, rej: Rejected, received_at: datetime) -> bytes:
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
        return build_ack(raw, "AE", f"{rej.reason.value}: {rej.message}", reason=rej.reason)


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
    idle_timeout: float | None = 600.0,
    client_config: dict[str, Any] | None = None,
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
    )
    return await server.start(host, port)


# ---------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monitor mllp", description="HL7 v2 ORU^R01 MLLP listener -> Kafka")
    p.add_argument("--host", default=os.environ.get("MLLP_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("MLLP_PORT", DEFAULT_PORT)))
    settings = get_settings()
    p.add_argument("--bootstrap", default=settings.kafka_bootstrap_servers)
    p.add_argument("--observations-topic", default=settings.topic_observations)
    p.add_argument("--dead-letter-topic", default=settings.topic_dead_letter)
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_LIMITS.max_bytes)
    p.add_argument("--send-timeout", type=float, default=10.0, help="seconds to wait for the broker's ack")
    p.add_argument(
        "--default-tz",
        default=None,
        help="IANA zone applied to HL7 timestamps without offset (default: reject them)",
    )
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    tz = None
    if args.default_tz:
        from zoneinfo import ZoneInfo

        tz = ZoneInfo(args.default_tz)

    async def run() -> None:
        server = await serve_mllp(
            args.host, args.port, bootstrap=args.bootstrap, observations_topic=args.observations_topic,
            dead_letter_topic=args.dead_letter_topic, max_message_bytes=args.max_message_bytes,
            send_timeout=args.send_timeout, default_tz=tz, client_config=aiokafka_config(get_settings()),
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
