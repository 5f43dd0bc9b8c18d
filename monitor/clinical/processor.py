"""The clinical step without any framework: records of the patient stream in, records to
produce out.

The clinical stage reads ONE keyed stream (``observations``): canonical observations,
plus the treatment events and alert actions that ingest routes into it keyed by patient
(header ``kind``: ``treatment`` or ``action``; no header = observation). A patient's
events are therefore in one partition, in the order they were written: no cross-topic
ordering to reconstruct, and no producer key or partitioner can put a dose on another
partition than the patient's labs.

For each record the processor runs the rule engine and the alert lifecycle over the
patient's state from the :class:`~monitor.clinical.store.PatientStore`, marks the patient
changed, and returns what must be produced: findings, alert versions and dead letters.
Bad input is a dead letter (original bytes, a reason, the source coordinates), never an
exception. The clock (overdue samples, escalation, silence expiry) is :meth:`tick` over
the patients the caller owns.

No Kafka import: the runner (``runner.py``) does the I/O; unit tests call this directly.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

from pydantic import ValidationError

from alerts.engine import Engine
from alerts.lifecycle import ActionError, AlertBook, Forbidden, LifecycleConfig, UnknownAlert, apply_action, apply_finding, tick
from schemas.alert import Alert, AlertAction
from schemas.errors import Reason, Rejected
from schemas.events import Observation
from schemas.findings import Finding
from schemas.ingest import Limits, check_patient_id, check_value, decode

from ..actions_auth import ActionAuthority
from ..dlq import dead_letter_headers
from ..metrics import (
    LabelCache,
    ACTIONS_REFUSED,
    ALERT_ESCALATIONS,
    ALERT_TRANSITIONS,
    ALERTS_OPENED,
    CLINICAL_CLOCK_FAILURES,
    CLINICAL_REPLAYED,
    DEAD_LETTERS,
    EFFECTIVE_TO_ALERT,
    EVENTS_CONSUMED,
    FINDINGS,
    PROCESSING_SECONDS,
    RECEIPT_TO_ALERT,
    TIME_TO_ACK,
)
from .handoff import DecodedObservations
from .store import PatientStore, UnreadablePatientState

log = logging.getLogger(__name__)

#: the models' own JSON serializers: the bytes of ``model_dump_json().encode()``
_FINDING_JSON = Finding.__pydantic_serializer__.to_json
_ALERT_JSON = Alert.__pydantic_serializer__.to_json

#: header naming what a record of the patient stream is (absent: an observation)
KIND_HEADER = "kind"
KIND_TREATMENT = b"treatment"
KIND_ACTION = b"action"
#: where a routed record came from (its dead letter points back there)
SRC_TOPIC, SRC_PARTITION, SRC_OFFSET = "src.topic", "src.partition", "src.offset"


class _AlreadyApplied(Exception):
    """The record is one the patient's state already holds (``_skip_if_applied``)."""


class PatientStateLost(RuntimeError):
    """A patient's state could not be rebuilt after an unexpected error (a record applied
    before failed when applied again): the partition must be restored from the changelog
    and read again from its committed offset."""

    def __init__(self, partition: int) -> None:
        super().__init__(f"patient state of partition {partition} not recoverable in place")
        self.partition = partition


class _Uncounted:
    """A metric child that counts nothing (records applied again by ``_recover``)."""

    def inc(self, *_a, **_k) -> None:
        pass

    observe = set = inc


class _UncountedCache:
    _child = _Uncounted()

    def get(self, metric, *values):
        return self._child


_UNCOUNTED = _UncountedCache()


@dataclass(slots=True, frozen=True)
class Output:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: list | None = None


def routed_headers(kind: bytes, topic: str, partition: int | None, offset: int | None) -> list[tuple[str, bytes]]:
    """Headers of a treatment or action that ingest routes into the patient stream."""
    return [(KIND_HEADER, kind), (SRC_TOPIC, topic.encode()),
            (SRC_PARTITION, b"" if partition is None else str(partition).encode()),
            (SRC_OFFSET, b"" if offset is None else str(offset).encode())]


def _headers(rec: Any) -> dict[str, bytes]:
    """A record's headers by name; a header without a value (Kafka allows it) is empty."""
    h = getattr(rec, "headers", None)
    return {k: b"" if v is None else v for k, v in h} if h else {}


def _coordinate(value: bytes | None) -> int | None:
    """A partition or offset header as ``routed_headers`` writes it; anything else is none."""
    return int(value) if value and value.isdigit() and len(value) <= 19 else None


class ClinicalProcessor:
    """Engine + lifecycle over a batch of records of the partitions the caller owns."""

    def __init__(self, engine: Engine, lifecycle: LifecycleConfig, store: PatientStore, *, findings_topic: str,
                 alerts_topic: str, dead_letter_topic: str, limits: Limits | None = None,
                 clock_settle_seconds: float = 2.0, monotonic=time.monotonic,
                 authority: ActionAuthority | None = None, handoff: DecodedObservations | None = None,
                 routed_from: Iterable[str] = ("treatments", "alert-actions")) -> None:
        self.engine = engine
        #: the topics ingest routes records from (``src.topic``): a dead letter points back at
        #: one of these, never at a topic a record's header names otherwise (``_dead``)
        self.routed_from = frozenset(routed_from)
        #: observations this worker's ingest wrote, already decoded (taken only if the bytes match)
        self.handoff = handoff
        #: resolves an action's role from who sent it (review H4); None: every action is refused
        self.authority = authority
        self.lifecycle = lifecycle
        self.store = store
        self.findings_topic = findings_topic
        self.alerts_topic = alerts_topic
        self.dead_letter_topic = dead_letter_topic
        self.limits = limits or Limits()
        self._m = LabelCache()
        #: patients with an open ``schedule.overdue`` alert (a gauge)
        self.overdue: set[str] = set()
        #: the clock skips a patient whose records were processed this recently: a dose and
        #: the samples written right after it are judged together, not the dose alone
        self.clock_settle_seconds = clock_settle_seconds
        self._monotonic = monotonic
        self._last_input: dict[str, float] = {}
        #: the patient the record in progress loaded (recovered if it fails part-way)
        self._touched: str | None = None

    # -- batches -------------------------------------------------------------------------
    def process(self, records: Iterable[Any], now: datetime | None = None) -> list[Output]:
        """Records (``topic, partition, offset, key, value, headers``) -> outputs, in order."""
        now = now or datetime.now(timezone.utc)
        out: list[Output] = []
        for rec in records:
            self.process_one(rec, now, out)
        return out

    def process_one(self, rec: Any, now: datetime, out: list[Output]) -> None:
        headers = _headers(rec)
        started = time.perf_counter()
        mark = len(out)
        self._touched = None
        try:
            stage = self._apply(rec, headers, now, out)
            self._m.get(PROCESSING_SECONDS, stage).observe(time.perf_counter() - started)
        except Rejected as rej:
            del out[mark:]  # a record that ends as a dead letter writes nothing else
            self._dead(rec, headers, rej.reason, rej.message, now, out)
        except ValidationError as exc:
            del out[mark:]
            self._dead(rec, headers, Reason.SCHEMA_INVALID,
                       str(exc.errors(include_url=False, include_input=False)[:1]), now, out)
        except UnreadablePatientState as exc:  # never evaluated against a state guessed at
            del out[mark:]
            self._dead(rec, headers, Reason.PATIENT_STATE_UNREADABLE,
                       f"the patient's stored state cannot be read ({exc}); this record was not evaluated", now, out)
        except Exception as exc:  # the worker never crashes on input
            log.warning("unexpected %s on %s[%s]@%s", type(exc).__name__, rec.topic, rec.partition, rec.offset,
                        exc_info=log.isEnabledFor(logging.DEBUG))
            del out[mark:]
            if self._touched is not None:  # the patient goes back to its state before this record
                self._recover(self._touched, rec.partition)
            self._dead(rec, headers, Reason.INTERNAL_ERROR, f"{type(exc).__name__} while processing", now, out)

    def _apply(self, rec: Any, headers: dict[str, bytes], now: datetime, out: list[Output]) -> str:
        """One record of the patient stream applied; the patient marked changed with the
        record as its replay item (``_recover``). Returns the stage name for the metrics."""
        kind = headers.get(KIND_HEADER)
        try:
            if kind is None:
                pid, book = self._observation(rec, now, out)
                stage = "evaluate"
            elif kind == KIND_TREATMENT:
                pid, book = self._treatment(rec, now, out)
                stage = "treatment"
            elif kind == KIND_ACTION:
                pid, book = self._action(rec, now, out)
                stage = "action"
            else:
                raise Rejected(Reason.SCHEMA_INVALID, f"unknown record kind {kind[:40]!r} on the patient stream")
        except _AlreadyApplied:
            self._m.get(CLINICAL_REPLAYED, kind.decode(errors="replace") if kind else "observation").inc()
            return "replayed"
        self.store.mark_changed(pid, book=book, replay=(rec, now), offset=rec.offset)
        return stage

    def _skip_if_applied(self, patient_id: str, rec: Any) -> None:
        """(After ``load``.) Raise :class:`_AlreadyApplied` when the patient's state already
        holds ``rec``: its offset is at or below the last record applied to that state, on the
        same partition (a replay after a crash between a checkpoint and its commit, or after
        a rollback). The engine drops a replayed result by its id, but not a result's first
        version replayed after its correction or withdrawal: that would undo them for a
        moment, and the alerts would follow (a repeated page, or an alert reopened)."""
        applied = self.store.offset(patient_id)
        if applied is not None and rec.offset <= applied and self.store.partition_of(patient_id) == rec.partition:
            raise _AlreadyApplied()

    def _recover(self, patient_id: str, partition: int) -> None:
        """After an unexpected error part-way through a record: the patient back to its last
        written version, then the records applied since then applied again (their outputs are
        already written or in this batch: dropped; metrics not counted twice), so its state
        is exactly that before the failing record. A change that cannot be applied again (the
        clock's) keeps the state as it is; a replayed record that fails raises
        :class:`PatientStateLost` (the runner restores the partition from the changelog)."""
        items = self.store.discard(patient_id)
        if not items:
            return
        scratch: list[Output] = []
        metrics, self._m = self._m, _UNCOUNTED
        try:
            for rec, now in items:
                self._apply(rec, _headers(rec), now, scratch)
                scratch.clear()
        except Exception as exc:
            raise PatientStateLost(partition) from exc
        finally:
            self._m = metrics

    # -- one record ----------------------------------------------------------------------
    def _observation(self, rec: Any, now: datetime, out: list[Output]) -> tuple[str, bool]:
        handoff = self.handoff
        obs = (Observation.model_validate_json(rec.value) if handoff is None
               else handoff.decode(rec.value))
        check_patient_id(obs.patient_id)  # ingest's rules: the stream may hold records it did not write
        check_value(obs)
        self._last_input[obs.patient_id] = self._monotonic()
        state, book = self.store.load(obs.patient_id, rec.partition)
        self._skip_if_applied(obs.patient_id, rec)
        self._touched = obs.patient_id
        findings = self.engine.evaluate_observation(state, obs, now)
        if findings:
            self._emit(self._findings(findings, book, now, out), now, obs.received_at, out)
        # no finding: the lifecycle never saw the book, only the state changed
        return obs.patient_id, bool(findings)

    def _treatment(self, rec: Any, now: datetime, out: list[Output]) -> tuple[str, bool]:
        event = decode("treatments", rec.value, received_at=now, limits=self.limits)
        self._last_input[event.patient_id] = self._monotonic()
        state, book = self.store.load(event.patient_id, rec.partition)
        self._skip_if_applied(event.patient_id, rec)
        self._touched = event.patient_id
        findings = self.engine.apply_treatment(state, event, now)
        if findings:
            self._emit(self._findings(findings, book, now, out), now, None, out)
        return event.patient_id, bool(findings)

    def _action(self, rec: Any, now: datetime, out: list[Output]) -> tuple[str, bool]:
        action = AlertAction.model_validate_json(rec.value)
        patient_id = action.patient_id or (rec.key.decode(errors="replace") if rec.key else None)
        if not patient_id:
            raise Rejected(Reason.ACTION_INVALID, "action names no patient (set patient_id or the message key)")
        check_patient_id(patient_id)
        try:
            if self.authority is None:
                raise Rejected(Reason.ACTION_UNKNOWN_USER, "no user directory configured (INBOX_USERS_FILE): "
                                                           "actions cannot be authorised")
            role = self.authority.role_of(action)  # never the message's own role field
            if self.store.partition_of(patient_id) is None:  # no patient is added for a refused action
                raise Rejected(Reason.ACTION_UNKNOWN_ALERT, f"no alert {action.alert_id} for this patient")
            _state, book = self.store.load(patient_id, rec.partition)
            self._skip_if_applied(patient_id, rec)
            self._touched = patient_id
            try:
                alerts = apply_action(book, action, now, self.lifecycle, role=role)
            except UnknownAlert as exc:
                raise Rejected(Reason.ACTION_UNKNOWN_ALERT, str(exc)) from None
            except Forbidden as exc:
                raise Rejected(Reason.ACTION_FORBIDDEN, str(exc)) from None
            except ActionError as exc:
                raise Rejected(Reason.ACTION_INVALID, str(exc)) from None
        except Rejected as rej:
            self._m.get(ACTIONS_REFUSED, rej.reason.value).inc()
            raise
        self._emit(alerts, now, None, out)
        return patient_id, True

    # -- the clock -----------------------------------------------------------------------
    def tick(self, patient_ids: Sequence[str], now: datetime | None = None) -> list[Output]:
        """Overdue samples, escalation and silence expiry for these (owned) patients."""
        now = now or datetime.now(timezone.utc)
        out: list[Output] = []
        settled_before = self._monotonic() - self.clock_settle_seconds
        for pid in patient_ids:
            partition = self.store.partition_of(pid)
            if partition is None:
                continue
            if self._last_input.get(pid, settled_before) > settled_before:
                continue  # inputs of this patient are arriving now: the next tick judges them
            self._last_input.pop(pid, None)
            mark = len(out)
            try:
                state, book = self.store.load(pid, partition)
                findings = self.engine.check_schedule(state, now)
                alerts = self._findings(findings, book, now, out)
                alerts.extend(tick(book, now, self.lifecycle))
            except UnreadablePatientState:
                continue  # counted by the store (monitor_clinical_patients_unreadable), not a clock failure
            except Exception as exc:  # one patient's clock never stops the others
                log.warning("clock tick failed: %s", type(exc).__name__)
                CLINICAL_CLOCK_FAILURES.labels(scope="patient").inc()
                del out[mark:]
                self._recover(pid, partition)
                continue
            if findings or alerts:
                self.store.mark_changed(pid)
            if any(a.rule_id == "schedule.overdue" for a in book.open_alerts()):
                self.overdue.add(pid)
            else:
                self.overdue.discard(pid)
            self._emit(alerts, now, None, out)
        return out

    # -- outputs -------------------------------------------------------------------------
    def _findings(self, findings: list[Finding], book: AlertBook, now: datetime, out: list[Output]) -> list[Alert]:
        changed: list[Alert] = []
        for f in findings:
            self._m.get(FINDINGS, f.rule_id, f.severity.value if f.severity else "none", f.state).inc()
            out.append(Output(self.findings_topic, f.patient_id.encode(), _FINDING_JSON(f)))
            changed.extend(apply_finding(book, f, now, self.lifecycle))
        return changed

    def _emit(self, alerts: list[Alert], now: datetime, received_at: datetime | None, out: list[Output]) -> None:
        m = self._m.get
        remember = self.store.remember_alert_json
        for a in alerts:
            value = _ALERT_JSON(a)
            out.append(Output(self.alerts_topic, a.patient_id.encode(), value))
            remember(a, value)
            sev = a.severity.value if a.severity else "critical"
            if a.version == 1:
                m(ALERTS_OPENED, a.rule_id, sev).inc()
                if a.effective_at is not None:
                    m(EFFECTIVE_TO_ALERT, sev).observe(max(0.0, (now - a.effective_at).total_seconds()))
                if received_at is not None:
                    m(RECEIPT_TO_ALERT, sev).observe(max(0.0, (now - received_at).total_seconds()))
            if a.status_changed:
                m(ALERT_TRANSITIONS, a.rule_id, a.previous_status.value, a.status.value).inc()
                if a.status.value == "acknowledged":
                    m(TIME_TO_ACK, sev).observe(max(0.0, (now - a.opened_at).total_seconds()))
            if "escalated" in (a.changes or []):
                m(ALERT_ESCALATIONS, a.rule_id, sev).inc()

    def _dead(self, rec: Any, headers: dict[str, bytes], reason: Reason, message: str, now: datetime,
              out: list[Output]) -> None:
        """The original bytes to the dead-letter topic, pointing at where they came from
        (for a routed treatment or action: its source topic, not the patient stream). A
        source header that names no topic ingest routes from is not believed: the dead
        letter points at the patient stream, so that neither ``monitor dlq replay`` (which
        publishes to the source topic) nor a metric label takes a topic from a record."""
        topic, partition, offset = rec.topic, rec.partition, rec.offset
        source = headers.get(SRC_TOPIC, b"").decode(errors="replace")
        if source in self.routed_from:
            topic = source
            partition, offset = _coordinate(headers.get(SRC_PARTITION)), _coordinate(headers.get(SRC_OFFSET))
        kind = "treatments" if headers.get(KIND_HEADER) == KIND_TREATMENT else topic
        self._m.get(EVENTS_CONSUMED, kind, "invalid").inc()
        self._m.get(DEAD_LETTERS, topic, reason.value).inc()
        log.info("dead-lettered %s[%s]@%s: %s", topic, partition, offset, reason.value)
        out.append(Output(self.dead_letter_topic, rec.key, rec.value if rec.value is not None else b"",
                          dead_letter_headers(reason, message, topic, partition, offset, now)))


__all__ = ["ClinicalProcessor", "Output", "PatientStateLost", "routed_headers", "KIND_HEADER", "KIND_TREATMENT", "KIND_ACTION"]
