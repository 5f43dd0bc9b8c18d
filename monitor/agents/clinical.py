"""The per-patient clinical agent: evaluate (rule engine) and the alert lifecycle, in one step.

One agent reads, for the patients of its partitions, the canonical ``observations``,
the ``treatments`` (validated here; bad ones dead-lettered), ``alert-actions`` and
``patient-ticks`` (the clock). Per-patient state (rule-engine state and the alert book)
lives in one changelog-backed table, so evaluation and lifecycle change together and a
restarted worker rebuilds both from Kafka. Findings go to ``findings``; every alert
version goes to ``alerts`` and to the delivery sinks.

Why one agent rather than evaluate -> findings topic -> lifecycle: both stages are keyed
by patient, so one hop fewer halves the latency and the changelog traffic, and the
findings topic is still written for audit and other consumers.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import time
import weakref
from datetime import datetime, timedelta, timezone

from faust.streams import _current_event, current_event
from faust.types import TP
from pydantic import ValidationError

from alerts.engine import Engine
from alerts.lifecycle import ActionError, AlertBook, Forbidden, LifecycleConfig, UnknownAlert, apply_action, apply_finding, tick
from alerts.protocol import default_protocols, load_protocol
from alerts.routing import RouteSpec
from alerts.state import PatientState
from schemas.alert import Alert, AlertAction
from schemas.errors import Reason, Rejected
from schemas.events import Observation
from schemas.findings import Finding
from schemas.ingest import Limits, decode

from ..app import alerts_topic, app, clinical_topics, dead_letter_topic, findings_topic, settings, ticks_topic
from ..confirmed_table import confirmed_table, until_acknowledged
from ..kafka_config import aiokafka_config
from ..ownership import OffsetContinuity, kept_partitions
from ..skipped_records import SkippedRecordReader
from ..delivery import DeliveryService
from ..dlq import send_dead_letter
from ..metrics import (
    ALERT_ESCALATIONS,
    ALERT_TRANSITIONS,
    ALERTS_OPENED,
    EFFECTIVE_TO_ALERT,
    EVENTS_CONSUMED,
    FINDINGS,
    PATIENTS_MONITORED,
    PATIENTS_OVERDUE,
    PROCESSING_SECONDS,
    PROTOCOL_INFO,
    STREAM_OFFSET_GAPS,
    RECEIPT_TO_ALERT,
    TIME_TO_ACK,
)

log = logging.getLogger(__name__)

LIMITS = Limits(
    max_bytes=settings.max_payload_bytes,
    max_depth=settings.max_json_depth,
    max_future=timedelta(seconds=settings.max_future_skew_seconds),
)


def _load_protocols():
    if settings.protocol_files.strip():
        return [load_protocol(p.strip()) for p in settings.protocol_files.split(",") if p.strip()]
    return default_protocols()


PROTOCOLS = _load_protocols()
for _p in PROTOCOLS:
    PROTOCOL_INFO.labels(protocol_id=_p.id, version=_p.version).set(1)
ENGINE = Engine(PROTOCOLS)
ROUTES = {}
for _p in PROTOCOLS:
    for _r in _p.routes:
        ROUTES.setdefault(_r.id, RouteSpec.model_validate(_r.model_dump()))
LIFECYCLE = LifecycleConfig(routes=ROUTES, pseudonym_secret=settings.pseudonym_secret)
DELIVERY = DeliveryService(settings)

#: patient_id -> {"state": dict, "alerts": dict}; changelog-backed, and every batch waits
#: for its changelog writes before its events are acknowledged (see ConfirmedTable)
patients = confirmed_table(app, "patients", default=None, partitions=settings.topic_partitions)

# decoded objects for patients this worker owns; the table stays the source of truth for
# whoever owns a partition next. Each entry remembers its partition, so a rebalance drops
# only the patients of partitions that another worker may have written meanwhile.
_cache: dict[str, tuple[PatientState, AlertBook]] = {}
_cache_partition: dict[str, int] = {}
_overdue: set[str] = set()
_ownership: dict = {"generation": None, "partitions": frozenset()}
#: partitions whose decoded patients must be reloaded from the table at the next batch
_stale_partitions: set[int] = set()
_CLINICAL_TOPIC_NAMES = frozenset(clinical_topics.topics)
_continuity = OffsetContinuity()


@app.on_partitions_assigned.connect
async def _on_assigned(sender, assigned, **kwargs) -> None:  # pragma: no cover - wiring
    generation = app.consumer_generation_id
    now_held = frozenset(tp.partition for tp in assigned if tp.topic in _CLINICAL_TOPIC_NAMES)
    kept = kept_partitions(_ownership["generation"], _ownership["partitions"], generation, now_held)
    _stale_partitions.update(set(_cache_partition.values()) - kept)
    _ownership.update(generation=generation, partitions=now_held)
    # the consumer seeks to the committed offsets: for a kept partition what this process
    # already did is known (redeliveries are skipped); the others start afresh there
    _continuity.reset(keep_partitions=kept)
    _reconcile["pending"] = True


def _drop_stale_cache() -> None:
    """Between batches only: a batch in progress still writes what it changed (its events
    are replayed by the new owner if their offsets are not committed)."""
    if not _stale_partitions:
        return
    stale = set(_stale_partitions)
    _stale_partitions.clear()
    for pid in [p for p, part in _cache_partition.items() if part in stale and p not in _dirty]:
        _cache.pop(pid, None)
        _cache_partition.pop(pid, None)
        _overdue.discard(pid)


def _load(patient_id: str) -> tuple[PatientState, AlertBook]:
    hit = _cache.get(patient_id)
    if hit is not None:
        return hit
    stored = patients.get(patient_id)
    if stored:
        pair = (PatientState.from_dict(stored["state"]), AlertBook.from_dict(stored["alerts"]))
    else:
        pair = (PatientState(patient_id), AlertBook(patient_id=patient_id))
    _cache[patient_id] = pair
    event = current_event()
    if event is not None:
        _cache_partition[patient_id] = event.message.partition
    return pair


#: patients changed in the current batch -> the last event that touched them
_dirty: dict[str, object] = {}
#: findings and alerts produced in the current batch, until the broker acknowledged them:
#: (topic, key, value, future)
_inflight: list = []


async def _produce(topic, key: bytes, value: bytes) -> None:
    """Produce now (not at the next commit) and remember it until the broker acknowledged it."""
    _inflight.append((topic, key, value, await topic.send(key=key, value=value, force=True)))


async def _await_outputs() -> None:
    """Wait until the broker holds every output of the batch; resend what failed, with
    backoff, for as long as it takes (the batch is not acknowledged meanwhile)."""
    await until_acknowledged(_inflight, _produce, "outputs")


def _mark_changed(patient_id: str) -> None:
    """Mark the patient for writing at the end of the batch (once, however many events)."""
    _dirty[patient_id] = current_event()


def _flush_dirty() -> None:
    """Write each changed patient once to the changelog-backed table.

    The table picks the changelog partition from the current event; a batch holds events
    of several partitions, so each write runs with the patient's own last event as the
    current event (the same context faust's stream sets per event).
    """
    for patient_id, event in _dirty.items():
        state, book = _cache[patient_id]
        token = _current_event.set(weakref.ref(event)) if event is not None else None
        try:
            patients[patient_id] = {"state": state.to_dict(), "alerts": book.to_dict()}
        finally:
            if token is not None:
                _current_event.reset(token)
    _dirty.clear()


async def _emit_findings(findings: list[Finding], book: AlertBook, now: datetime, received_at: datetime | None) -> list[Alert]:
    changed: list[Alert] = []
    for f in findings:
        FINDINGS.labels(rule_id=f.rule_id, severity=(f.severity.value if f.severity else "none"), state=f.state).inc()
        await _produce(findings_topic, f.patient_id.encode(), f.model_dump_json().encode())
        changed.extend(apply_finding(book, f, now, LIFECYCLE))
    return changed


async def _emit_alerts(alerts: list[Alert], now: datetime, received_at: datetime | None) -> None:
    for a in alerts:
        await _produce(alerts_topic, a.patient_id.encode(), a.model_dump_json().encode())
        sev = a.severity.value if a.severity else "critical"
        if a.version == 1:
            ALERTS_OPENED.labels(rule_id=a.rule_id, severity=sev).inc()
            if a.effective_at is not None:
                EFFECTIVE_TO_ALERT.labels(severity=sev).observe(max(0.0, (now - a.effective_at).total_seconds()))
            if received_at is not None:
                RECEIPT_TO_ALERT.labels(severity=sev).observe(max(0.0, (now - received_at).total_seconds()))
        if a.status_changed:
            ALERT_TRANSITIONS.labels(rule_id=a.rule_id, from_status=a.previous_status.value, to_status=a.status.value).inc()
            if a.status.value == "acknowledged":
                TIME_TO_ACK.labels(severity=sev).observe(max(0.0, (now - a.opened_at).total_seconds()))
        if "escalated" in (a.changes or []):
            ALERT_ESCALATIONS.labels(rule_id=a.rule_id, severity=sev).inc()


async def handle_observation(raw: bytes) -> None:
    obs = Observation.model_validate_json(raw)
    now = datetime.now(timezone.utc)
    state, book = _load(obs.patient_id)
    findings = ENGINE.evaluate_observation(state, obs, now)
    alerts = await _emit_findings(findings, book, now, obs.received_at)
    _mark_changed(obs.patient_id)
    await _emit_alerts(alerts, now, obs.received_at)


async def handle_treatment(msg, received_at: datetime) -> None:
    event = decode("treatments", msg.value, received_at=received_at, limits=LIMITS)
    EVENTS_CONSUMED.labels(topic="treatments", format="json").inc()
    state, book = _load(event.patient_id)
    findings = ENGINE.apply_treatment(state, event, received_at)
    alerts = await _emit_findings(findings, book, received_at, received_at)
    _mark_changed(event.patient_id)
    await _emit_alerts(alerts, received_at, None)


async def handle_action(raw: bytes, key: bytes | None) -> None:
    action = AlertAction.model_validate_json(raw)
    patient_id = action.patient_id or (key.decode() if key else None)
    if not patient_id:
        raise Rejected(Reason.ACTION_INVALID, "action names no patient (set patient_id or the message key)")
    now = datetime.now(timezone.utc)
    state, book = _load(patient_id)
    try:
        alerts = apply_action(book, action, now, LIFECYCLE)
    except UnknownAlert as exc:
        raise Rejected(Reason.ACTION_UNKNOWN_ALERT, str(exc)) from None
    except Forbidden as exc:
        raise Rejected(Reason.ACTION_FORBIDDEN, str(exc)) from None
    except ActionError as exc:
        raise Rejected(Reason.ACTION_INVALID, str(exc)) from None
    _mark_changed(patient_id)
    await _emit_alerts(alerts, now, None)


async def handle_tick(key: bytes | None) -> None:
    if not key:
        return
    patient_id = key.decode()
    if patient_id not in _cache and patients.get(patient_id) is None:
        return
    now = datetime.now(timezone.utc)
    state, book = _load(patient_id)
    findings = ENGINE.check_schedule(state, now)
    alerts = await _emit_findings(findings, book, now, None)
    alerts.extend(tick(book, now, LIFECYCLE))
    if findings or alerts:
        _mark_changed(patient_id)
    if any(a.rule_id == "schedule.overdue" and a.is_open for a in book.open_alerts()):
        _overdue.add(patient_id)
    else:
        _overdue.discard(patient_id)
    await _emit_alerts(alerts, now, None)


BATCH_MAX = 500
BATCH_WITHIN = 0.01  # seconds


async def handle_event(event) -> None:
    """Process one event of a batch; bad input is dead-lettered, never raised."""
    msg = event.message
    topic = msg.topic
    received_at = datetime.now(timezone.utc)
    token = _current_event.set(weakref.ref(event))
    started = time.perf_counter()
    try:
        if topic == settings.topic_observations:
            await handle_observation(msg.value)
            stage = "evaluate"
        elif topic == settings.topic_treatments:
            await handle_treatment(msg, received_at)
            stage = "treatment"
        elif topic == settings.topic_alert_actions:
            await handle_action(msg.value, msg.key)
            stage = "action"
        else:
            await handle_tick(msg.key)
            stage = "tick"
        _stage_timer(stage).observe(time.perf_counter() - started)
    except Rejected as rej:
        kind = "treatments" if topic == settings.topic_treatments else topic
        EVENTS_CONSUMED.labels(topic=kind, format="invalid").inc()
        log.info("dead-lettered %s[%s]@%s: %s", topic, msg.partition, msg.offset, rej.reason.value)
        await send_dead_letter(dead_letter_topic, msg.value, msg.key, rej.reason, rej.message,
                               topic, msg.partition, msg.offset, received_at)
    except ValidationError as exc:
        await send_dead_letter(dead_letter_topic, msg.value, msg.key, Reason.SCHEMA_INVALID,
                               str(exc.errors(include_url=False, include_input=False)[:1]),
                               topic, msg.partition, msg.offset, received_at)
    except Exception as exc:  # the worker never crashes on input
        log.warning("unexpected %s on %s[%s]@%s", type(exc).__name__, topic, msg.partition, msg.offset,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        pid = msg.key.decode(errors="replace") if msg.key else ""
        if pid not in _dirty:  # reload a possibly half-updated state from the table
            _cache.pop(pid, None)
            _cache_partition.pop(pid, None)
        await send_dead_letter(dead_letter_topic, msg.value, msg.key, Reason.INTERNAL_ERROR,
                               f"{type(exc).__name__} while processing", topic, msg.partition, msg.offset, received_at)
    finally:
        _current_event.reset(token)


_stage_timers: dict[str, object] = {}


def _stage_timer(stage: str):
    t = _stage_timers.get(stage)
    if t is None:
        t = _stage_timers[stage] = PROCESSING_SECONDS.labels(stage=stage)
    return t


# Findings, alerts and dead letters are produced at once (force=True) rather than as
# faust "attachments", which wait for the next offset commit (every 2.8 s by default):
# faust flushes the producer before every commit, so nothing is committed unproduced.
@app.agent(clinical_topics)
async def clinical(stream):
    # Batches: events are acknowledged only after the whole batch is processed and each
    # changed patient was written once to the table (its changelog is produced before the
    # offsets are committed), so a crash replays at most the unfinished batch.
    async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN):
        async with _batch_lock:
            _drop_stale_cache()
            if _reconcile["pending"]:
                await _reconcile_backlog()
            for event in events:
                msg = event.message
                seen, missing = _continuity.observe(msg.topic, msg.partition, msg.offset)
                if seen == "repeat":
                    continue  # delivered again in this process: its effects are in the state
                if seen == "gap":
                    await _process_skipped(msg.topic, msg.partition, missing)
                await handle_event(event)
            await _finish_batch()


async def _finish_batch() -> None:
    # Outputs first, state second: the table must never record an alert as sent that
    # the broker does not hold, or a replay after a crash would find nothing new to
    # emit and the alert would be lost. (A crash between the two replays the batch
    # and re-emits the same alert versions; sinks drop them by their ledger.)
    await _await_outputs()
    _flush_dirty()
    # faust's own flush before a commit may leave changelog writes buffered; the
    # batch's events are acknowledged (and later committed) only after this returns
    await patients.confirm_changelog()
    # records read past the stream count as acknowledged only now
    for (topic, partition), offsets in _refetched_unacked.items():
        _mark_acknowledged(topic, partition, offsets)
    _refetched_unacked.clear()


class _RefetchedEvent:
    """A record read by ``SkippedRecordReader``, shaped like the faust event handle_event
    expects (``.message`` with topic, partition, offset, key, value)."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, record) -> None:
        self.message = record


#: serialises the agent's batches and the skipped-record check (one writer of the state)
_batch_lock = asyncio.Lock()
SKIPPED = SkippedRecordReader(aiokafka_config(settings), settings.app_id, settings.max_message_bytes)
#: (topic, partition) -> offsets processed from SKIPPED, to acknowledge when the batch ends
_refetched_unacked: dict[tuple[str, int], list[int]] = {}


async def _handle_read_record(rec) -> None:
    """Process a record read by SKIPPED; it is acknowledged when the batch ends."""
    await handle_event(_RefetchedEvent(rec))
    _refetched_unacked.setdefault((rec.topic, rec.partition), []).append(rec.offset)


async def _process_skipped(topic: str, partition: int, missing: range) -> None:
    """Process records the stream never delivered, read straight from the broker."""
    STREAM_OFFSET_GAPS.labels(topic=topic).inc(len(missing))
    log.warning("stream did not deliver %s[%s] offsets %d..%d; reading them from the broker",
                topic, partition, missing.start, missing.stop - 1)
    records = await SKIPPED.read(topic, partition, missing)
    for rec in records:
        _continuity.observe(topic, partition, rec.offset)
        await _handle_read_record(rec)
    if len(records) < len(missing):
        log.warning("%d of offsets %d..%d on %s[%s] are no longer in the log", len(missing) - len(records),
                    missing.start, missing.stop - 1, topic, partition)


def _mark_acknowledged(topic: str, partition: int, offsets: list[int]) -> None:
    """Tell faust's consumer these offsets are done, so its commits can pass them.

    Writes the consumer's bookkeeping as ``Consumer.ack`` does (private fields of the
    pinned faust-streaming 0.15.3): the records were never faust messages to ack."""
    consumer = app.consumer
    tp = TP(topic, partition)
    index, acked = consumer._acked_index[tp], consumer._acked[tp]
    committed = consumer._committed_offset[tp]
    for o in offsets:
        if (committed is None or o >= committed) and o not in index:
            index.add(o)
            acked.append(o)


_reconcile = {"pending": False}
#: above this many records the backlog after an assignment is left to the stream (and the
#: checks below), rather than read into memory at once
RECONCILE_MAX_RECORDS = 20_000


async def _reconcile_backlog() -> None:
    """After an assignment, before anything else: read the backlog of every partition
    this worker now holds (committed offset -> log end) straight from the broker, merged
    across topics in the order the records were written, and process it.

    Why: after a restart faust 0.15.3 was seen to skip ranges of records and to deliver
    nothing at all from some partitions; the checks below would find them, but only after
    the records of other topics (a patient's labs before its dose) were processed. The
    stream's later deliveries of these offsets are redeliveries and are skipped."""
    _reconcile["pending"] = False
    positions = await _held_positions()
    ranges = {}
    for key, (end, committed, start) in positions.items():
        first = _last_processed(key, committed, start) + 1
        _continuity.last.setdefault(key, first - 1)
        if end > first:
            ranges[key] = range(first, end)
    backlog = sum(len(r) for r in ranges.values())
    if not backlog:
        return
    if backlog > RECONCILE_MAX_RECORDS:
        log.info("backlog of %d records after the assignment is left to the stream", backlog)
        return
    lists = [await SKIPPED.read(t, p, r) for (t, p), r in ranges.items()]
    n = 0
    for rec in heapq.merge(*lists, key=lambda r: r.timestamp):
        seen, _ = _continuity.observe(rec.topic, rec.partition, rec.offset)
        if seen == "repeat":
            continue
        await _handle_read_record(rec)
        n += 1
    log.info("read the backlog after the assignment from the broker: %d records", n)


#: (topic, partition) -> (consecutive checks that found it behind the log without
#: progress, the last processed offset then)
_behind: dict[tuple[str, int], tuple[int, int]] = {}
STALL_CHECKS = 3


async def _held_positions() -> dict[tuple[str, int], tuple[int, int | None, int]]:
    """Log end, committed offset (only where nothing was processed since the assignment)
    and log start of every clinical partition this worker holds."""
    keys = [(t, p) for t in sorted(_CLINICAL_TOPIC_NAMES) for p in sorted(_ownership["partitions"])]
    if not keys:
        return {}
    return await SKIPPED.positions(keys, {k for k in keys if k not in _continuity.last})


def _last_processed(key: tuple[str, int], committed: int | None, start: int) -> int:
    last = _continuity.last.get(key)
    if last is None:  # nothing processed since the assignment: the stream starts at the commit
        last = (committed if committed is not None else start) - 1
    return last


@app.timer(interval=5.0)
async def check_nothing_skipped() -> None:
    """Compare, for every partition this worker holds, what the agent processed with the
    log end. A partition that stays behind without progress for three checks (15 s) holds
    records the stream will not deliver: read and process them here."""
    recovered = app.tables.recovery.completed.is_set() and not app.in_recovery
    if app.rebalancing or not recovered or not _ownership["partitions"]:
        _behind.clear()
        return
    if _batch_lock.locked():
        return  # busy: look again at the next check
    if _reconcile["pending"]:  # the stream delivered nothing since the assignment
        async with _batch_lock:
            await _reconcile_backlog()
            await _finish_batch()
        return
    try:
        positions = await _held_positions()
    except Exception as exc:  # the broker may be away; the next check tries again
        log.info("skipped-record check failed: %s", type(exc).__name__)
        return
    stalled = []
    for key, (end, committed, start) in positions.items():
        last = _last_processed(key, committed, start)
        if end - 1 <= last:
            _behind.pop(key, None)
            continue
        n, seen_last = _behind.get(key, (0, last))
        n = n + 1 if seen_last == last else 1
        _behind[key] = (n, last)
        if n >= STALL_CHECKS:
            stalled.append(key)
    if not stalled:
        return
    async with _batch_lock:
        for key in stalled:
            end, committed, start = positions[key]
            last = _last_processed(key, committed, start)
            if end - 1 > last:
                await _process_skipped(key[0], key[1], range(last + 1, end))
            _behind.pop(key, None)
        await _finish_batch()


@app.timer(interval=settings.tick_interval_seconds)
async def clock_ticks() -> None:
    """The clock: a tick per patient this worker holds drives overdue labs and escalation."""
    keys = sorted(set(_cache) | set(patients.keys()))
    PATIENTS_MONITORED.set(len(keys))
    PATIENTS_OVERDUE.set(len(_overdue))
    for patient_id in keys:
        await ticks_topic.send(key=patient_id.encode(), value=b"tick")


async def _run_delivery() -> None:
    try:
        await DELIVERY.start()
    except Exception:
        log.exception("alert delivery failed to start")


@app.task
async def start_delivery() -> None:
    # not a faust-managed task: faust cancels those when it restarts its services
    asyncio.ensure_future(_run_delivery())


@app.on_before_shutdown.connect
async def _stop_delivery(sender, **kwargs) -> None:  # pragma: no cover - wiring
    await DELIVERY.stop()
    await SKIPPED.stop()
