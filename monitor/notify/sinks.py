"""Delivery sinks and a non-blocking, never-dropping, idempotent dispatcher.

No Kafka here: the worker feeds :meth:`Dispatcher.enqueue` with the alert versions the
lifecycle emits (or reads back from the ``alerts`` topic).

Sinks
-----
* :class:`AlertmanagerSink` - pushes to Alertmanager API v2 (``POST /api/v2/alerts``).
  Labels: ``alertname`` (= rule id), ``rule_id``, ``severity``, ``team`` (care team),
  ``alert_ref`` (the alert's pseudonym). No patient identifier unless
  ``include_patient_id=True`` (adds ``patient_id``). Annotations carry status, escalation
  level, version and protocol, and the nurse text (``summary``/``description``/``action``)
  only with ``include_text=True``. ``startsAt`` = opened_at; a resolved or retracted alert
  is pushed with ``endsAt`` = its closing time; an open one with ``endsAt`` = now +
  ``active_ttl`` (Alertmanager auto-resolves alerts that are not refreshed, so the worker
  should re-push open alerts well within that window). When the severity label changed,
  the label sets of earlier severities are pushed as resolved so they do not linger.
* :class:`WebhookSink` - POSTs the alert JSON (without ``patient_id`` unless
  ``include_patient_id=True``) with ``Idempotency-Key: <alert_id>:<version>``,
  ``X-Signature-Timestamp: <unix seconds>`` and
  ``X-Signature-SHA256: <hex HMAC-SHA256(secret, "<timestamp>.<idempotency key>." + body)>``:
  the timestamp and the key are signed, so a receiver that checks the signature
  (:func:`verify_signature`), rejects timestamps older than a few minutes and dedupes on the
  key cannot be replayed to (security review L4). Success = any 2xx; redirects are not
  followed (a 3xx is a failed attempt: the body and signature never go to another host),
  and receivers' error bodies are never logged.

Delivery policy (:func:`should_deliver`)
----------------------------------------
A *paging* sink (``sink.paging`` True: Alertmanager, pager webhooks) gets a version when
``alert.notify`` is True (open, severity rise, escalation, end of inhibition/silence) or
when the status changed from the previous version (acknowledged, resolved, retracted,
back to firing), so receivers learn that a page is answered or over. Other versions
(evidence updates, notes, severity falls, inhibited/info openings) go only to non-paging
sinks (``paging=False``, e.g. an inbox or audit webhook), which get every version.

Dispatcher guarantees
---------------------
* ``enqueue`` never blocks and never awaits: it appends to an unbounded in-memory lane
  (one lane per sink and alert, ordered by version) and wakes that sink's worker task.
* Nothing is dropped: a failed attempt is retried with capped exponential backoff with
  jitter, forever, keeping the item pending (``pending()`` shows it). Versions of one
  alert are delivered to one sink in order; one stuck alert does not hold up others.
* Idempotency: a :class:`DeliveryLedger` remembers ``(sink, alert_id, version)`` keys
  delivered; already-delivered or already-pending keys are skipped at enqueue and checked
  again before each attempt. The key is marked after a successful delivery, so a crash
  between delivery and mark can repeat one delivery: receivers dedupe on the
  ``Idempotency-Key`` / ``alert_ref``+version. The worker's ledger
  (``monitor.notify.outbox.KafkaLedger``) lives on the compacted ``alert-deliveries``
  topic; after a restart the outbox replays the ``alerts`` topic from its commit and the
  ledger suppresses what was already delivered.
* Metrics hooks: :class:`DeliveryHooks` callbacks (all optional, exceptions swallowed).
"""
from __future__ import annotations

import asyncio
import inspect
import hashlib
import hmac
import json
import logging
import random
import time
from bisect import insort
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Protocol, runtime_checkable

import aiohttp

from schemas.alert import Alert, CLOSED_STATUSES

__all__ = [
    "DeliveryError", "Sink", "AlertmanagerSink", "WebhookSink", "sign_body", "verify_signature", "DeliveryKey",
    "DeliveryLedger", "InMemoryLedger", "Backoff", "DeliveryHooks", "should_deliver", "Dispatcher",
    "DEFAULT_CONCURRENCY",
]

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """A failed delivery attempt (retried by the dispatcher)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@runtime_checkable
class Sink(Protocol):
    name: str
    paging: bool

    async def deliver(self, alert: Alert) -> None:
        """Deliver one alert version or raise."""

    async def close(self) -> None:
        ...


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class _HttpSink:
    name: str = "http"
    paging: bool = True

    def __init__(self, timeout: float, session: aiohttp.ClientSession | None):
        #: the longest one attempt (one HTTP request) takes before it fails
        self.timeout_seconds = timeout
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session = session
        self._own_session = session is None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._own_session = True
        return self._session

    async def _post(self, url: str, data: bytes, headers: dict[str, str]) -> None:
        try:
            async with self._get_session().post(url, data=data, headers=headers, timeout=self._timeout,
                                                allow_redirects=False) as resp:
                if not 200 <= resp.status < 300:
                    # the receiver's body is not read into the message: it may echo the
                    # alert or carry anything (review L4); status code only
                    raise DeliveryError(f"{self.name}: HTTP {resp.status}", status=resp.status)
        except DeliveryError:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            # the type only: aiohttp's messages carry the URL (which may hold a token)
            raise DeliveryError(f"{self.name}: {type(exc).__name__}") from exc

    async def close(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()


class AlertmanagerSink(_HttpSink):
    def __init__(self, url: str, *, name: str = "alertmanager", include_patient_id: bool = False,
                 include_text: bool = False, active_ttl: timedelta = timedelta(hours=24),
                 generator_url: str | None = None, timeout: float = 10.0,
                 session: aiohttp.ClientSession | None = None, paging: bool = True,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        super().__init__(timeout, session)
        self.url = url.rstrip("/")
        self.name = name
        self.paging = paging
        self.include_patient_id = include_patient_id
        self.include_text = include_text
        self.active_ttl = active_ttl
        self.generator_url = generator_url
        self._clock = clock

    @staticmethod
    def tier_label(alert: Alert, tier: int | None = None) -> str:
        """The escalation tier as a label value: ``"0"``, ``"1"``... or ``"failsafe"`` past the last
        tier. A LABEL (Alertmanager routes and re-notifies on labels only), so an escalation
        reaches the receiver its tier is routed to (deploy/alertmanager/alertmanager.yml)."""
        t = alert.escalation_tier if tier is None else tier
        return "failsafe" if t >= len(alert.route.get("tiers", [])) else str(t)

    def labels(self, alert: Alert, severity: str | None = None, tier: int | None = None) -> dict[str, str]:
        labels = {
            "alertname": alert.rule_id,
            "rule_id": alert.rule_id,
            "severity": severity or alert.severity.value,
            "escalation_tier": self.tier_label(alert, tier),
            "team": alert.care_team or "unassigned",
            "alert_ref": alert.pseudonym,
        }
        if self.include_patient_id:
            labels["patient_id"] = alert.patient_id
        return labels

    def payload(self, alert: Alert) -> list[dict[str, Any]]:
        now = self._clock()
        annotations = {
            "status": alert.status.value,
            "escalation_level": str(alert.escalation_tier),
            "version": str(alert.version),
            "protocol": f"{alert.protocol.id}@{alert.protocol.version}",
        }
        if alert.inhibited_by:
            annotations["inhibited"] = "true"
        link = f"{self.generator_url.rstrip('/')}/alerts/{alert.alert_id}" if self.generator_url else None
        # a short non-identifying summary (rule, severity, tier, opaque reference); the nurse text
        # only when configured (NOTIFY_INCLUDE_TEXT-style opt-in)
        annotations["summary"] = (f"{alert.severity.value} {alert.rule_id} alert {alert.pseudonym} "
                                  f"({alert.status.value}, escalation tier {self.tier_label(alert)})")
        annotations["description"] = ("Open the alert in the SMA monitor inbox" + (f": {link}" if link else "")
                                      + ". No patient details are sent here.")
        if self.include_text:
            annotations.update(summary=alert.text.what, description=alert.text.why, action=alert.text.action)
        if alert.status in CLOSED_STATUSES:
            # never in the future (Alertmanager would keep it active until then)
            ends = min(alert.closed_at or alert.updated_at, now)
        else:
            ends = now + self.active_ttl
        item: dict[str, Any] = {
            "labels": self.labels(alert), "annotations": annotations,
            "startsAt": _iso(alert.opened_at), "endsAt": _iso(ends),
        }
        if link:
            item["generatorURL"] = link  # the inbox alert page: the opaque alert id only
        out = [item]
        # earlier severities and tiers had other label sets: end them
        sevs = {h.severity.value for h in alert.history if h.severity is not None} | {alert.severity.value}
        tiers = {h.tier for h in alert.history if h.tier is not None} | {0, alert.escalation_tier}
        current = (alert.severity.value, self.tier_label(alert))
        seen = {current}
        for sev in sorted(sevs):
            for tier in sorted(tiers):
                combo = (sev, self.tier_label(alert, tier))
                if combo in seen:
                    continue
                seen.add(combo)
                out.append({"labels": self.labels(alert, sev, tier), "annotations": {"status": "superseded"},
                            "startsAt": _iso(alert.opened_at), "endsAt": _iso(min(now, alert.updated_at))})
        return out

    async def deliver(self, alert: Alert) -> None:
        body = json.dumps(self.payload(alert)).encode("utf-8")
        await self._post(f"{self.url}/api/v2/alerts", body, {"Content-Type": "application/json"})


#: how old a webhook timestamp a receiver should accept (seconds; :func:`verify_signature`)
SIGNATURE_TOLERANCE_SECONDS = 300


def sign_body(secret: bytes | str, body: bytes, timestamp: int | str, idempotency_key: str) -> str:
    """hex HMAC-SHA256(secret, "<timestamp>.<idempotency key>." + body)."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return hmac.new(key, f"{timestamp}.{idempotency_key}.".encode("utf-8") + body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes | str, body: bytes, headers: Mapping[str, str], *, now: float | None = None,
                     tolerance: float = SIGNATURE_TOLERANCE_SECONDS) -> bool:
    """What a receiver checks: the signature over timestamp, idempotency key and body, and
    a timestamp within ``tolerance`` of ``now`` (a captured request cannot be replayed
    later; within the window the receiver dedupes on ``Idempotency-Key``)."""
    ts = headers.get("X-Signature-Timestamp") or ""
    key = headers.get("Idempotency-Key") or ""
    got = (headers.get("X-Signature-SHA256") or "").removeprefix("sha256=")
    if not ts.isdigit() or not key:
        return False
    if abs((time.time() if now is None else now) - int(ts)) > tolerance:
        return False
    return hmac.compare_digest(sign_body(secret, body, ts, key), got)


class WebhookSink(_HttpSink):
    def __init__(self, url: str, secret: bytes | str, *, name: str = "webhook", include_patient_id: bool = False,
                 timeout: float = 10.0, session: aiohttp.ClientSession | None = None, paging: bool = True):
        super().__init__(timeout, session)
        if not secret:
            raise ValueError("webhook secret must not be empty")
        self.url = url
        self.secret = secret
        self.name = name
        self.paging = paging
        self.include_patient_id = include_patient_id

    def body(self, alert: Alert) -> bytes:
        return json.dumps(alert.public_dict(self.include_patient_id), sort_keys=True,
                          separators=(",", ":")).encode("utf-8")

    def headers(self, alert: Alert, body: bytes, now: float | None = None) -> dict[str, str]:
        ts = str(int(time.time() if now is None else now))  # per attempt: a retry is signed afresh
        return {
            "Content-Type": "application/json",
            "Idempotency-Key": alert.idempotency_key,
            "X-Signature-Timestamp": ts,
            "X-Signature-SHA256": sign_body(self.secret, body, ts, alert.idempotency_key),
        }

    async def deliver(self, alert: Alert) -> None:
        body = self.body(alert)
        await self._post(self.url, body, self.headers(alert, body))


# --------------------------------------------------------------------------- ledger


class DeliveryKey(NamedTuple):
    sink: str
    alert_id: str
    version: int

    def as_str(self) -> str:
        """Flat form for a table key: ``sink|alert_id|version``."""
        return f"{self.sink}|{self.alert_id}|{self.version}"


class DeliveryLedger(Protocol):
    """Which (sink, alert_id, version) were delivered (the worker's: ``KafkaLedger``)."""

    def seen(self, key: DeliveryKey) -> bool: ...

    def mark(self, key: DeliveryKey) -> None: ...


class InMemoryLedger:
    def __init__(self) -> None:
        self._keys: set[DeliveryKey] = set()

    def seen(self, key: DeliveryKey) -> bool:
        return key in self._keys

    def mark(self, key: DeliveryKey) -> None:
        self._keys.add(key)

    def __len__(self) -> int:
        return len(self._keys)


# --------------------------------------------------------------------------- dispatcher


@dataclass(frozen=True)
class Backoff:
    base: float = 0.5
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.2  # +/- fraction

    def delay(self, attempt: int) -> float:
        """Delay after the ``attempt``-th consecutive failure (1-based), capped."""
        d = min(self.max_delay, self.base * self.factor ** max(0, attempt - 1))
        if self.jitter:
            d *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return min(d, self.max_delay)


@dataclass
class DeliveryHooks:
    """Optional callbacks for metrics; exceptions raised by them are logged and ignored."""

    on_enqueued: Callable[[str, Alert], None] | None = None
    on_skipped: Callable[[str, Alert, str], None] | None = None  # reason: duplicate|policy
    on_attempt: Callable[[str, Alert, int], None] | None = None  # attempt number (1-based)
    on_delivered: Callable[[str, Alert, int, float], None] | None = None  # attempts, seconds since enqueue
    on_failure: Callable[[str, Alert, int, BaseException, float], None] | None = None  # attempt, exc, retry in s

    def call(self, name: str, *args: Any) -> None:
        fn = getattr(self, name)
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:  # pragma: no cover - metrics must never break delivery
            log.exception("delivery hook %s failed", name)


def should_deliver(sink: Any, alert: Alert) -> bool:
    """Paging sinks: versions that page or change status; other sinks: every version."""
    if not getattr(sink, "paging", True):
        return True
    return alert.notify or alert.status_changed


#: attempts in flight per sink. A slot is held from the request until the delivery's ledger
#: record is acknowledged (``Dispatcher._attempt``), so at most this many versions per sink
#: can have been answered without being on the ledger: what one crash can repeat.
DEFAULT_CONCURRENCY = 8


@dataclass(order=True)
class _Item:
    version: int
    alert: Alert = field(compare=False)
    key: DeliveryKey = field(compare=False)
    enqueued_at: float = field(compare=False)
    attempts: int = field(default=0, compare=False)
    next_attempt_at: float = field(default=0.0, compare=False)


class _SinkState:
    def __init__(self, sink: Sink):
        self.sink = sink
        self.lanes: dict[str, list[_Item]] = {}  # alert_id -> items sorted by version
        self.pending_keys: set[DeliveryKey] = set()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        #: alert id -> the version being delivered (one at a time per alert and sink)
        self.busy: dict[str, _Item] = {}


class Dispatcher:
    """Fans alert versions out to sinks in background tasks; see module doc."""

    def __init__(self, sinks: Iterable[Sink], ledger: DeliveryLedger | None = None, *,
                 backoff: Backoff | None = None, hooks: DeliveryHooks | None = None,
                 policy: Callable[[Any, Alert], bool] = should_deliver,
                 attempt_timeout: float | None = 30.0, concurrency: int = DEFAULT_CONCURRENCY,
                 clock: Callable[[], float] = time.monotonic):
        self.sinks = list(sinks)
        names = [s.name for s in self.sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique: {names}")
        self.ledger: DeliveryLedger = ledger if ledger is not None else InMemoryLedger()
        self.backoff = backoff or Backoff()
        self.hooks = hooks or DeliveryHooks()
        self.policy = policy
        self.attempt_timeout = attempt_timeout
        self.concurrency = max(1, concurrency)
        self._clock = clock
        self._states = {s.name: _SinkState(s) for s in self.sinks}
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = False
        #: ledger records written again after a failed write (``_rewrite``)
        self._rewrites: set[asyncio.Task] = set()
        #: alerts whose queued versions must not be started (``withdraw``); None: all (stopping)
        self._withheld: set[str] | None = set()
        #: set whenever an attempt ends (``withdraw`` and ``stop`` wait on it)
        self._attempt_ended = asyncio.Event()

    # -- producer side (sync, never blocks) ---------------------------------------
    def enqueue(self, alert: Alert) -> int:
        """Queue ``alert`` for every sink that should get it; returns how many were queued."""
        queued = 0
        now = self._clock()
        for st in self._states.values():
            name = st.sink.name
            if not self.policy(st.sink, alert):
                self.hooks.call("on_skipped", name, alert, "policy")
                continue
            key = DeliveryKey(name, alert.alert_id, alert.version)
            if key in st.pending_keys or self.ledger.seen(key):
                self.hooks.call("on_skipped", name, alert, "duplicate")
                continue
            insort(st.lanes.setdefault(alert.alert_id, []),
                   _Item(alert.version, alert.model_copy(deep=True), key, now, 0, now))
            st.pending_keys.add(key)
            st.wake.set()
            queued += 1
            self.hooks.call("on_enqueued", name, alert)
        if queued:
            self._idle.clear()
        return queued

    def forget(self, alert_ids: Iterable[str]) -> int:
        """Drop queued (not in-flight) versions of these alerts, e.g. when another worker
        took over their partition and will deliver them from its own commit point."""
        ids = set(alert_ids)
        dropped = 0
        for st in self._states.values():
            for alert_id in ids & set(st.lanes):
                flying = st.busy.get(alert_id)
                lane = st.lanes.pop(alert_id)
                for item in lane:
                    if item is flying:  # finishes, then leaves the lane (_done)
                        st.lanes[alert_id] = [item]
                        continue
                    st.pending_keys.discard(item.key)
                    dropped += 1
        if not self.pending_count():
            self._idle.set()
        return dropped

    def in_flight(self, alert_ids: Iterable[str] | None = None) -> int:
        """Deliveries in flight (of these alerts; None: all)."""
        if alert_ids is None:
            return sum(len(st.busy) for st in self._states.values())
        ids = set(alert_ids)
        return sum(len(ids & st.busy.keys()) for st in self._states.values())

    async def withdraw(self, alert_ids: Iterable[str], timeout: float) -> int:
        """Stop delivering these alerts (another worker took their outbox partition over):
        drop their queued versions, start none of them again, and wait up to ``timeout`` s
        for the ones in flight to end (delivered and on the ledger, or failed and dropped).
        Returns how many were still in flight at the timeout."""
        ids = set(alert_ids)
        if self._withheld is not None:
            self._withheld |= ids
        try:
            self.forget(ids)
            await self._wait_landed(lambda: self.in_flight(ids), timeout)
            return self.in_flight(ids)
        finally:
            self.forget(ids)
            if self._withheld is not None:
                self._withheld -= ids

    def _withholds(self, alert_id: str) -> bool:
        """No version of this alert may be started now (``withdraw``, or a stop)."""
        return self._withheld is None or alert_id in self._withheld

    async def _wait_landed(self, count: Callable[[], int], timeout: float) -> None:
        """Wait until ``count()`` is 0 (re-checked whenever an attempt ends), at most ``timeout`` s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while count() and loop.time() < deadline:
            self._attempt_ended.clear()
            try:
                await asyncio.wait_for(self._attempt_ended.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break

    def pending(self) -> list[tuple[str, Alert]]:
        """Everything not yet delivered, as (sink name, alert version)."""
        return [(st.sink.name, it.alert) for st in self._states.values()
                for lane in st.lanes.values() for it in lane]

    def pending_count(self) -> int:
        return sum(len(st.pending_keys) for st in self._states.values())

    # -- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._withheld = set()  # a stop withheld everything
        for st in self._states.values():
            st.task = asyncio.create_task(self._worker(st), name=f"dispatch:{st.sink.name}")

    async def stop(self, drain_timeout: float = 0.0, close_sinks: bool = True, finish_timeout: float = 0.0) -> None:
        """Stop workers (after waiting up to ``drain_timeout`` s for the queue to drain).

        With ``finish_timeout`` > 0, no attempt is started after the drain and the ones in
        flight, and the ledger records being written again, get up to that long to end: a
        delivery cancelled after its request left, or a ledger record not written, would be
        sent again by the next owner of its outbox partition.
        Undelivered items stay in :meth:`pending`; they are not dropped.
        """
        if drain_timeout > 0:
            try:
                await self.join(drain_timeout)
            except asyncio.TimeoutError:
                log.warning("dispatcher stopping with %d deliveries pending", self.pending_count())
        if finish_timeout > 0:
            self._withheld = None
            await self._wait_landed(self.in_flight, finish_timeout)
            if self._rewrites:
                await asyncio.wait(list(self._rewrites), timeout=finish_timeout)
            if self.in_flight() or self._rewrites:
                log.warning("dispatcher stopping with %d deliveries in flight and %d ledger records not written",
                            self.in_flight(), len(self._rewrites))
        self._running = False
        for t in list(self._rewrites):
            t.cancel()
        for st in self._states.values():
            if st.task is not None:
                st.task.cancel()
        for st in self._states.values():
            if st.task is not None:
                try:
                    await st.task
                except (asyncio.CancelledError, Exception):
                    pass
                st.task = None
        if close_sinks:
            for s in self.sinks:
                close = getattr(s, "close", None)
                if close is not None:
                    await close()

    async def join(self, timeout: float | None = None) -> None:
        """Wait until nothing is pending (raises asyncio.TimeoutError)."""
        await asyncio.wait_for(self._wait_idle(), timeout)

    async def _wait_idle(self) -> None:
        while self.pending_count():
            self._idle.clear()
            await self._idle.wait()

    # -- worker -------------------------------------------------------------------
    async def _worker(self, st: _SinkState) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        inflight: set[asyncio.Task] = set()
        try:
            while True:
                st.wake.clear()
                now = self._clock()
                due: list[tuple[str, _Item]] = []
                next_at: float | None = None
                for alert_id, lane in st.lanes.items():
                    if not lane or alert_id in st.busy or self._withholds(alert_id):
                        continue
                    head = lane[0]
                    if head.next_attempt_at <= now:
                        due.append((alert_id, head))
                    elif next_at is None or head.next_attempt_at < next_at:
                        next_at = head.next_attempt_at
                for alert_id, item in due:
                    await sem.acquire()
                    # while waiting for a slot, the alert may have been withdrawn or forgotten
                    lane = st.lanes.get(alert_id)
                    if self._withholds(alert_id) or not lane or lane[0] is not item:
                        sem.release()
                        continue
                    st.busy[alert_id] = item
                    t = asyncio.create_task(self._attempt(st, alert_id, item, sem))
                    inflight.add(t)
                    t.add_done_callback(inflight.discard)
                if due:
                    await asyncio.sleep(0)
                    continue
                timeout = None if next_at is None else max(0.0, next_at - self._clock())
                try:
                    await asyncio.wait_for(st.wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
        finally:
            for t in list(inflight):
                t.cancel()

    async def _attempt(self, st: _SinkState, alert_id: str, item: _Item, sem: asyncio.Semaphore) -> None:
        name = st.sink.name
        try:
            if self.ledger.seen(item.key):
                self._done(st, alert_id, item)
                self.hooks.call("on_skipped", name, item.alert, "duplicate")
                return
            item.attempts += 1
            self.hooks.call("on_attempt", name, item.alert, item.attempts)
            try:
                if self.attempt_timeout:
                    await asyncio.wait_for(st.sink.deliver(item.alert), self.attempt_timeout)
                else:
                    await st.sink.deliver(item.alert)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self.backoff.delay(item.attempts)
                item.next_attempt_at = self._clock() + delay
                log.warning("delivery to %s failed (attempt %d, retry in %.2fs): %s",
                            name, item.attempts, delay, exc if isinstance(exc, DeliveryError) else type(exc).__name__)
                self.hooks.call("on_failure", name, item.alert, item.attempts, exc, delay)
                return
            answered = self._clock()
            # a persistent ledger: wait until the record is durable, so a crash right after a
            # delivery leaves as small a window for a repeat as possible
            try:
                await self._mark(item.key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # delivered anyway, and the in-memory mark stands (this worker does not send
                # it again); the record is written again in the background until the broker
                # takes it, or a crash could repeat this version at any later time (the
                # outbox commit may stay behind it for long, e.g. while another sink is down)
                log.warning("delivery ledger write for %s failed: %s; writing it again", name, type(exc).__name__)
                t = asyncio.create_task(self._rewrite(item.key), name=f"ledger:{name}")
                self._rewrites.add(t)
                t.add_done_callback(self._rewrites.discard)
            else:
                # alert ids are keyed pseudonyms (no patient id); DEBUG only
                log.debug("ledger record %s durable %.3fs after the answer", item.key.as_str(),
                          self._clock() - answered)
            self._done(st, alert_id, item)
            self.hooks.call("on_delivered", name, item.alert, item.attempts, self._clock() - item.enqueued_at)
        finally:
            st.busy.pop(alert_id, None)
            sem.release()
            st.wake.set()
            self._attempt_ended.set()

    async def _mark(self, key: DeliveryKey) -> None:
        """Record ``key`` on the ledger; with a persistent ledger, until it is durable."""
        marked = self.ledger.mark(key)
        if inspect.isawaitable(marked):
            await marked

    async def _rewrite(self, key: DeliveryKey) -> None:
        """Write a delivered key's ledger record again (backoff) until it is durable."""
        attempt = 1
        while True:
            await asyncio.sleep(self.backoff.delay(attempt))
            attempt += 1
            try:
                await self._mark(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("delivery ledger write for %s failed again (attempt %d): %s", key.sink, attempt,
                            type(exc).__name__)
                continue
            log.info("delivery ledger record for %s written after %d attempts", key.sink, attempt)
            return

    def _done(self, st: _SinkState, alert_id: str, item: _Item) -> None:
        lane = st.lanes.get(alert_id)
        if lane and lane[0] is item:
            lane.pop(0)
        elif lane and item in lane:  # pragma: no cover - defensive
            lane.remove(item)
        if lane is not None and not lane:
            del st.lanes[alert_id]
        st.pending_keys.discard(item.key)
        if not self.pending_count():
            self._idle.set()
