"""``monitor dlq``: list, inspect and replay the dead-letter topic.

The dead-letter writer (``monitor/dlq.py``) stores each rejected input's original
bytes with ``dlq.*`` headers (reason, message, source topic/partition/offset,
received time). This module reads them back:

* ``list``   filter by reason, source topic and time range; a table or JSON lines;
* ``show``   one record: headers, reason, key, original bytes (decoded when text);
* ``replay`` re-publish the original bytes, with the original key, to their source
  topic, after a mapping or configuration fix.

Replay is idempotent. Every replayed dead letter is recorded in a compacted ledger
topic (``TOPIC_DEAD_LETTER_REPLAYS``, default ``<dead-letter topic>-replays``),
keyed by the dead letter's own coordinates ``<topic>/<partition>/<offset>``; the
republished record carries the same coordinates in its ``dlq.replay.of`` header.
A dead letter already in the ledger is never republished again. The ledger record
is written only after the broker acknowledged the republished record (acks=all),
so a crash between the two writes can republish one record twice, never lose
one: the service is idempotent per event id downstream.

Dead letters of the MLLP listener have the pseudo source ``mllp`` (the bytes came
over TCP, not from a topic); they are replayed to the lab-results topic, whose
ingest decodes HL7 v2 like the listener does. A dead letter whose source is not one of
the service's input topics (``replay_topics``) is never replayed: it is counted as
``not_an_input_topic``.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Iterator

from schemas.replay import ReplayLedgerEntry

from .settings import INPUT_TOPICS, Settings
from .topics_admin import TOPIC_METADATA_WAIT_SECONDS, KafkaUnreachable, topic_partitions

#: header names written by monitor/dlq.py (kept in one place here for readers)
H_REASON = "dlq.reason"
H_MESSAGE = "dlq.message"
H_SOURCE_TOPIC = "dlq.source.topic"
H_SOURCE_PARTITION = "dlq.source.partition"
H_SOURCE_OFFSET = "dlq.source.offset"
H_RECEIVED_AT = "dlq.received_at"
#: header added to a republished record: the dead letter it came from
H_REPLAY_OF = "dlq.replay.of"
#: header added to a republished record: when it was replayed (ISO 8601, UTC)
H_REPLAY_AT = "dlq.replay.at"

#: pseudo source topic of MLLP dead letters (monitor/mllp.py SOURCE_TOPIC)
MLLP_SOURCE = "mllp"

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class DlqError(ValueError):
    """A user mistake (bad filter, unknown record id): printed as one line."""


def replay_ledger_topic(s: Settings) -> str:
    return s.topic_dead_letter_replays or f"{s.topic_dead_letter}-replays"


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 with an offset (``2026-11-28T08:00:00+01:00``) or a duration ago (``30m``, ``24h``, ``7d``)."""
    now = now or datetime.now(timezone.utc)
    t = text.strip()
    m = _DURATION.match(t)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2)])
    try:
        dt = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise DlqError(f"cannot read time {text!r}: use ISO 8601 with an offset or a duration such as 30m, 24h, 7d") from None
    if dt.tzinfo is None:
        raise DlqError(f"time {text!r} has no UTC offset (write e.g. {t}+00:00)")
    return dt


@dataclass
class DeadLetter:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    replayed: dict | None = None  # the ledger entry, when already replayed

    @property
    def id(self) -> str:
        return f"{self.partition}:{self.offset}"

    @property
    def coordinates(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    def header(self, name: str) -> str:
        for k, v in self.headers:
            if k == name:
                return (v or b"").decode("utf-8", "replace")
        return ""

    @property
    def reason(self) -> str:
        return self.header(H_REASON)

    @property
    def source_topic(self) -> str:
        return self.header(H_SOURCE_TOPIC)

    @property
    def dead_lettered_at(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, timezone.utc)

    def source(self) -> str:
        src = self.source_topic or "?"
        p, o = self.header(H_SOURCE_PARTITION), self.header(H_SOURCE_OFFSET)
        return f"{src}[{p}]@{o}" if p or o else src

    def summary(self) -> dict[str, Any]:
        """What ``list --json`` prints: no key and no payload (they may carry patient data)."""
        return {
            "id": self.id, "topic": self.topic, "partition": self.partition, "offset": self.offset,
            "dead_lettered_at": self.dead_lettered_at.isoformat(), "reason": self.reason,
            "message": self.header(H_MESSAGE), "source_topic": self.source_topic,
            "source_partition": _int_or_none(self.header(H_SOURCE_PARTITION)),
            "source_offset": _int_or_none(self.header(H_SOURCE_OFFSET)),
            "received_at": self.header(H_RECEIVED_AT) or None, "size": len(self.value),
            "replay_of": self.header(H_REPLAY_OF) or None,
            "replayed": self.replayed,
        }

    def detail(self) -> dict[str, Any]:
        """What ``show --json`` prints: everything, the bytes as text when they decode, else base64."""
        import base64

        out = self.summary()
        out["headers"] = {k: (v or b"").decode("utf-8", "replace") for k, v in self.headers}
        out["key"] = None if self.key is None else self.key.decode("utf-8", "replace")
        text = decode_text(self.value)
        out["value_text"] = text
        out["value_base64"] = None if text is not None else base64.b64encode(self.value).decode()
        return out


def _int_or_none(s: str) -> int | None:
    return int(s) if s.isdigit() else None


def decode_text(raw: bytes) -> str | None:
    """The bytes as text if they are UTF-8 without control characters other than CR/LF/TAB."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 32 and c not in "\r\n\t" for c in text):
        return None
    return text


@dataclass
class Filter:
    reasons: frozenset[str] = frozenset()
    source_topics: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    ids: frozenset[tuple[int, int]] = frozenset()

    def matches(self, d: DeadLetter) -> bool:
        if self.ids and (d.partition, d.offset) not in self.ids:
            return False
        if self.reasons and d.reason not in self.reasons:
            return False
        if self.source_topics and d.source_topic not in self.source_topics:
            return False
        if self.since is not None and d.dead_lettered_at < self.since:
            return False
        if self.until is not None and d.dead_lettered_at >= self.until:
            return False
        return True

    @property
    def empty(self) -> bool:
        return not (self.reasons or self.source_topics or self.since or self.until or self.ids)


def parse_id(text: str) -> tuple[int, int]:
    """``PARTITION:OFFSET`` (as printed by ``list``) or ``TOPIC/PARTITION/OFFSET``."""
    t = text.strip()
    m = re.fullmatch(r"(?:.+/)?(\d+)[:/](\d+)", t)
    if not m:
        raise DlqError(f"cannot read record id {text!r}: use PARTITION:OFFSET as printed by 'monitor dlq list'")
    return int(m.group(1)), int(m.group(2))


# ------------------------------------------------------------------ Kafka access


def tool_consumer(s: Settings, timeout: float, client: str = "dlq-tool"):
    """A kafka-python consumer of no group for the operator tools (``dlq``, ``changelog``)."""
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from .kafka_config import kafka_python_config

    try:
        return KafkaConsumer(
            group_id=None, enable_auto_commit=False, allow_auto_create_topics=False,
            request_timeout_ms=max(int(timeout * 1000), 5000) + 1000,
            fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=s.max_message_bytes + 1024,
            client_id=f"{s.app_id}-{client}", **kafka_python_config(s, connect_timeout=timeout),
        )
    except KafkaError as exc:
        raise _unreachable(s, exc) from None


def _unreachable(s: Settings, exc: BaseException) -> KafkaUnreachable:
    return KafkaUnreachable(f"cannot use Kafka at {s.kafka_bootstrap_servers} ({s.kafka_security_protocol}): "
                            f"{type(exc).__name__}; check KAFKA_BOOTSTRAP_SERVERS and the TLS/SASL settings")


def read_topic(consumer, topic: str, since: datetime | None = None, must_exist: bool = True,
               stall_timeout: float = 30.0, named_by: str = "the dead-letter topic is TOPIC_DEAD_LETTER") -> Iterator:
    """Every record of ``topic`` from ``since`` (or the start) up to the end offsets seen at the start.
    ``named_by``: which setting names the topic, for the message when it does not exist.

    Raises ``KafkaTimeoutError`` when no partition advances for ``stall_timeout`` seconds
    (the broker went away mid-read), rather than waiting for ever.
    """
    import time

    from kafka import TopicPartition
    from kafka.errors import KafkaTimeoutError

    # a topic that must be there is asked for again while the metadata leaves it out
    parts = topic_partitions(consumer, topic, wait=TOPIC_METADATA_WAIT_SECONDS if must_exist else 0.0)
    if not parts:
        if must_exist:
            raise DlqError(f"topic {topic!r} does not exist, or this user may not describe it (checked for "
                           f"{TOPIC_METADATA_WAIT_SECONDS:.0f} s; {named_by})")
        return
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    end = consumer.end_offsets(tps)
    start: dict = {}
    if since is not None:
        found = consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
        start = {tp: (found[tp].offset if found.get(tp) is not None else end[tp]) for tp in tps}
    else:
        start = consumer.beginning_offsets(tps)
    todo = {tp for tp in tps if start[tp] < end[tp]}
    for tp in tps:
        consumer.seek(tp, start[tp])
    last_progress = time.monotonic()
    while todo:
        batch = consumer.poll(timeout_ms=1000, max_records=2000)
        if batch:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > stall_timeout:
            raise KafkaTimeoutError(f"no progress reading {topic} for {stall_timeout:.0f}s")
        for tp, records in batch.items():
            for r in records:
                if r.offset < end[tp]:
                    yield r
            if tp in todo and consumer.position(tp) >= end[tp]:
                todo.discard(tp)
        # partitions whose remaining offsets were compacted away or are transaction markers
        for tp in list(todo):
            if consumer.position(tp) >= end[tp]:
                todo.discard(tp)


def read_ledger(consumer, ledger_topic: str, must_exist: bool = False) -> dict[str, dict]:
    """The replay ledger: dead-letter coordinates -> what was republished (latest entry per key).

    ``must_exist``: the ledger was made sure of (a replay): a ledger the metadata leaves out
    for a moment must not read as "nothing replayed yet", which would replay it all again."""
    out: dict[str, dict] = {}
    for r in read_topic(consumer, ledger_topic, must_exist=must_exist):
        if r.key is None:
            continue
        if r.value is None:  # tombstone: an operator cleared the entry on purpose
            out.pop(r.key.decode(), None)
            continue
        try:
            out[r.key.decode()] = json.loads(r.value)
        except ValueError:
            out[r.key.decode()] = {"raw": r.value.decode("utf-8", "replace")}
    return out


def read_dead_letters(s: Settings, flt: Filter | None = None, *, timeout: float = 15.0,
                      with_ledger: bool = True, ledger_must_exist: bool = False) -> list[DeadLetter]:
    """The dead letters matching ``flt``, oldest first per partition, with their replay status
    (``ledger_must_exist``: the replay ledger was created if it was missing)."""
    from kafka.errors import KafkaError

    flt = flt or Filter()
    consumer = tool_consumer(s, timeout)
    try:
        ledger = read_ledger(consumer, replay_ledger_topic(s), must_exist=ledger_must_exist) if with_ledger else {}
        out = []
        for r in read_topic(consumer, s.topic_dead_letter, since=flt.since, stall_timeout=max(timeout, 30.0)):
            d = DeadLetter(s.topic_dead_letter, r.partition, r.offset, r.timestamp, r.key, r.value or b"",
                           [(k, v) for k, v in (r.headers or [])])
            if flt.matches(d):
                d.replayed = ledger_entry_for(d, ledger)
                out.append(d)
        out.sort(key=lambda d: (d.timestamp_ms, d.partition, d.offset))
        return out
    except KafkaError as exc:
        raise _unreachable(s, exc) from None
    finally:
        consumer.close()


def ledger_entry_for(d: DeadLetter, ledger: dict[str, dict]) -> dict | None:
    """The ledger entry of this very dead letter: same coordinates *and* the same dead-letter time.

    The time check keeps a re-created dead-letter topic (offsets start again at 0) from
    matching entries written for the records of the topic's previous life.
    """
    entry = ledger.get(d.coordinates)
    if entry is None:
        return None
    at = entry.get("dead_lettered_at")
    if at is not None:
        try:
            if datetime.fromisoformat(at) != d.dead_lettered_at:
                return None
        except (TypeError, ValueError):
            return None
    return entry


def ensure_ledger_topic(s: Settings, timeout: float = 15.0) -> None:
    """Create the compacted replay ledger when missing (same partition/replication settings as the service)."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from .topics_admin import admin_client

    name = replay_ledger_topic(s)
    admin = admin_client(s, timeout)
    try:
        if name in set(admin.list_topics()):
            return
        try:
            admin.create_topics([NewTopic(name, 1, s.topic_replication_factor,
                                          topic_configs={"cleanup.policy": "compact"})])
        except TopicAlreadyExistsError:
            pass
    finally:
        admin.close()


def replay_topics(s: Settings) -> frozenset[str]:
    """The topics a dead letter may go back to: the service's inputs, the actions topic and
    the patient stream (the clinical stage's dead letters of records ingest wrote there)."""
    return frozenset(getattr(s, field) for field in INPUT_TOPICS.values()) | {s.topic_alert_actions,
                                                                             s.topic_observations}


def replay_target(d: DeadLetter, s: Settings) -> str | None:
    """The topic a dead letter goes back to (None when it has no source to go back to, or
    names a topic that is not an input: a dead letter's source comes from the record that
    failed, and a replay must never write the service's own outputs, such as ``alerts`` or
    the delivery ledger)."""
    src = d.source_topic
    if not src:
        return None
    if src == MLLP_SOURCE:
        return s.topic_lab_results
    return src if src in replay_topics(s) else None


def replay(s: Settings, flt: Filter, *, dry_run: bool = False, timeout: float = 15.0,
           now: datetime | None = None) -> dict[str, Any]:
    """Republish the matching dead letters not replayed before; returns the counts."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    from .kafka_config import kafka_python_config

    if not dry_run:
        ensure_ledger_topic(s, timeout)
    records = read_dead_letters(s, flt, timeout=timeout, ledger_must_exist=not dry_run)
    counts: dict[str, Any] = {"matched": len(records), "replayed": 0, "already_replayed": 0,
                              "no_source_topic": 0, "not_an_input_topic": 0, "dry_run": dry_run, "to": {}}
    todo = []
    for d in records:
        if d.replayed is not None:
            counts["already_replayed"] += 1
            continue
        target = replay_target(d, s)
        if target is None:
            counts["not_an_input_topic" if d.source_topic else "no_source_topic"] += 1
            continue
        todo.append((d, target))
    if dry_run or not todo:
        for d, target in todo:
            counts["to"][target] = counts["to"].get(target, 0) + 1
        if dry_run:
            counts["would_replay"] = len(todo)
        return counts
    try:
        producer = KafkaProducer(acks="all", max_request_size=s.max_message_bytes,
                                 **kafka_python_config(s, connect_timeout=timeout))
    except KafkaError as exc:
        raise _unreachable(s, exc) from None
    ledger = replay_ledger_topic(s)
    try:
        for d, target in todo:
            at = (now or datetime.now(timezone.utc)).isoformat()
            headers = [(H_REPLAY_OF, d.coordinates.encode()), (H_REPLAY_AT, at.encode())]
            meta = producer.send(target, key=d.key, value=d.value, headers=headers).get(timeout=max(timeout, 30))
            entry = ReplayLedgerEntry(dead_letter=d.coordinates, dead_lettered_at=d.dead_lettered_at, reason=d.reason,
                                      replayed_to=target, partition=meta.partition, offset=meta.offset,
                                      replayed_at=at)
            producer.send(ledger, key=d.coordinates.encode(), value=entry.model_dump_json().encode()).get(
                timeout=max(timeout, 30))
            counts["replayed"] += 1
            counts["to"][target] = counts["to"].get(target, 0) + 1
    except KafkaError as exc:
        counts["error"] = f"{type(exc).__name__}: {exc}"
        raise ReplayInterrupted(counts) from exc
    finally:
        producer.close()
    return counts


class ReplayInterrupted(RuntimeError):
    """The broker failed mid-replay; ``counts`` says how far it got (a rerun continues, it does not repeat)."""

    def __init__(self, counts: dict) -> None:
        super().__init__(counts.get("error", "replay interrupted"))
        self.counts = counts


# ------------------------------------------------------------------ output


def format_table(rows: Iterable[DeadLetter], width: int = 60) -> str:
    rows = list(rows)
    head = ("ID", "DEAD-LETTERED AT (UTC)", "REASON", "SOURCE", "BYTES", "REPLAYED", "MESSAGE")
    lines = [head]
    for d in rows:
        msg = d.header(H_MESSAGE).replace("\n", " ")
        if len(msg) > width:
            msg = msg[: width - 1] + "…"
        lines.append((d.id, d.dead_lettered_at.strftime("%Y-%m-%d %H:%M:%S"), d.reason or "?", d.source(),
                      str(len(d.value)), "yes" if d.replayed else "", msg))
    widths = [max(len(r[i]) for r in lines) for i in range(len(head) - 1)]
    out = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in lines]
    out.append(f"{len(rows)} dead letter(s)")
    return "\n".join(out)


def format_detail(d: DeadLetter) -> str:
    lines = [f"id:               {d.id} ({d.coordinates})",
             f"dead-lettered at: {d.dead_lettered_at.isoformat()}",
             f"reason:           {d.reason or '?'}",
             f"message:          {d.header(H_MESSAGE)}",
             f"source:           {d.source()}",
             f"received at:      {d.header(H_RECEIVED_AT)}",
             f"replayed:         {json.dumps(d.replayed) if d.replayed else 'no'}",
             f"key:              {'(none)' if d.key is None else d.key.decode('utf-8', 'replace')}",
             "headers:"]
    lines += [f"  {k} = {(v or b'').decode('utf-8', 'replace')}" for k, v in d.headers]
    lines.append(f"original bytes ({len(d.value)}):")
    text = decode_text(d.value)
    if text is not None:
        lines.append(text.replace("\r", "\n") if "\r" in text and "\n" not in text else text)
    else:
        lines.append(_hexdump(d.value))
    return "\n".join(lines)


def _hexdump(raw: bytes, limit: int = 4096) -> str:
    out = []
    for i in range(0, min(len(raw), limit), 16):
        chunk = raw[i:i + 16]
        out.append(f"{i:08x}  {chunk.hex(' '):<47}  {''.join(chr(b) if 32 <= b < 127 else '.' for b in chunk)}")
    if len(raw) > limit:
        out.append(f"... {len(raw) - limit} more bytes")
    return "\n".join(out)


# ------------------------------------------------------------------ command line


def add_parser(sub, settings_help: str) -> None:
    """Add ``monitor dlq {list,show,replay}`` to the top-level sub-parsers."""
    import argparse

    dl = sub.add_parser("dlq", help="list, inspect and replay dead letters",
                        description="Dead-letter topic tools. Reads TOPIC_DEAD_LETTER on KAFKA_BOOTSTRAP_SERVERS "
                                    "(and the TLS/SASL settings). " + settings_help,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    dls = dl.add_subparsers(dest="dlq_command", required=True)

    def filters(q, ids_help: str | None = None) -> None:
        q.add_argument("--reason", action="append", default=[], metavar="REASON",
                       help="only this dead-letter reason (dlq.reason, e.g. unknown_loinc); repeatable; default: all")
        q.add_argument("--source-topic", action="append", default=[], metavar="TOPIC",
                       help="only dead letters from this source topic (dlq.source.topic; 'mllp' for the MLLP "
                            "listener); repeatable; default: all")
        q.add_argument("--since", default=None, metavar="TIME",
                       help="dead-lettered at or after TIME: ISO 8601 with offset or a duration ago (30m, 24h, 7d); "
                            "default: the start of the topic")
        q.add_argument("--until", default=None, metavar="TIME",
                       help="dead-lettered before TIME (same forms as --since); default: now")
        q.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                       help="seconds to wait for the broker before giving up (default: 15)")
        if ids_help:
            q.add_argument("ids", nargs="*", metavar="ID", help=ids_help)

    ls = dls.add_parser("list", help="list dead letters (table, or JSON lines with --json)")
    filters(ls)
    ls.add_argument("--json", action="store_true", help="print one JSON object per dead letter (default: a table)")
    ls.add_argument("--limit", type=int, default=None, metavar="N",
                    help="print only the N most recent matches (default: all)")
    ls.set_defaults(func=cmd_dlq_list)

    sh = dls.add_parser("show", help="show one dead letter: headers, reason, key and original bytes")
    sh.add_argument("id", metavar="ID", help="PARTITION:OFFSET of the dead letter, as printed by 'monitor dlq list'")
    sh.add_argument("--json", action="store_true",
                    help="print a JSON object (bytes as text when UTF-8, else base64) (default: readable text)")
    sh.add_argument("--raw", action="store_true", help="write only the original bytes to stdout (default: off)")
    sh.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                    help="seconds to wait for the broker before giving up (default: 15)")
    sh.set_defaults(func=cmd_dlq_show)

    rp = dls.add_parser("replay", help="re-publish dead letters to their source topic (idempotent)",
                        description="Re-publish the original bytes and key of the matching dead letters to their "
                                    "source topic, with a dlq.replay.of header. Each replay is recorded in the "
                                    "compacted ledger topic TOPIC_DEAD_LETTER_REPLAYS (default: "
                                    "<TOPIC_DEAD_LETTER>-replays); a dead letter already replayed is skipped. "
                                    "MLLP dead letters go to TOPIC_LAB_RESULTS.")
    filters(rp, ids_help="PARTITION:OFFSET of dead letters to replay (default: all that match the filters)")
    rp.add_argument("--all", action="store_true",
                    help="replay every dead letter not yet replayed when no filter or id is given (default: off, "
                         "so a bare 'replay' does nothing by accident)")
    rp.add_argument("--dry-run", action="store_true", help="count what would be replayed, publish nothing (default: off)")
    rp.set_defaults(func=cmd_dlq_replay)


def _filter(args) -> Filter:
    since = parse_time(args.since) if args.since else None
    until = parse_time(args.until) if args.until else None
    if since and until and since >= until:
        raise DlqError("--since must be before --until")
    ids = frozenset(parse_id(i) for i in (getattr(args, "ids", None) or []))
    return Filter(frozenset(args.reason), frozenset(args.source_topic), since, until, ids)


def _settings() -> Settings:
    from .settings import get_settings

    return get_settings()


def cmd_dlq_list(args) -> int:
    rows = read_dead_letters(_settings(), _filter(args), timeout=args.timeout)
    if args.limit is not None:
        rows = rows[-args.limit:] if args.limit > 0 else []
    if args.json:
        for d in rows:
            print(json.dumps(d.summary(), ensure_ascii=False))
    else:
        print(format_table(rows))
    return 0


def cmd_dlq_show(args) -> int:
    p, o = parse_id(args.id)
    rows = read_dead_letters(_settings(), Filter(ids=frozenset({(p, o)})), timeout=args.timeout)
    if not rows:
        raise DlqError(f"no dead letter {p}:{o} (removed by retention, or never written)")
    d = rows[0]
    if args.raw:
        sys.stdout.buffer.write(d.value)
        sys.stdout.flush()
    elif args.json:
        print(json.dumps(d.detail(), ensure_ascii=False, indent=2))
    else:
        print(format_detail(d))
    return 0


def cmd_dlq_replay(args) -> int:
    flt = _filter(args)
    if flt.empty and not args.all:
        raise DlqError("name what to replay: --reason, --source-topic, --since/--until, record ids, or --all")
    try:
        counts = replay(_settings(), flt, dry_run=args.dry_run, timeout=args.timeout)
    except ReplayInterrupted as exc:
        print(json.dumps(exc.counts))
        print(f"monitor: replay interrupted: {exc}; rerun the same command to continue", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0
