"""What a crash can repeat: the dispatcher's ledger-write rules (pure, no broker) and the
crash test's criterion for an explained repeat (``reliability.harness.split_repeats``).

A delivery is written to the ledger only after the receiver answered; the next worker
skips exactly what is on the ledger. So after a SIGKILL the versions that can be sent again
are those answered but not yet on the ledger: each holds a concurrency slot until its
record is acknowledged (at most ``concurrency`` per sink), and a failed write is written
again until the broker takes it (not left off the ledger for good).
"""
from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from alerts.lifecycle import AlertBook, LifecycleConfig, apply_finding
from alerts.routing import RouteSpec
from monitor.notify.sinks import DEFAULT_CONCURRENCY, Backoff, DeliveryKey, Dispatcher
from reliability.harness import Verdict, split_repeats
from schemas.alert import Alert
from schemas.findings import Evidence, Finding, FindingText, ProtocolRef

UTC = timezone.utc
ROUTE = RouteSpec.model_validate({
    "id": "liver",
    "tiers": [{"name": "ward-nurse", "recipients": ["ward-nurse"],
               "escalate_after_minutes": {"critical": 5, "high": 10, "warning": 30}}],
    "failsafe": {"name": "coordinator", "recipients": ["coordinator"]},
})
CONFIG = LifecycleConfig(routes={"liver": ROUTE}, pseudonym_secret=b"pseudo-secret")


def _alerts(n: int) -> list[Alert]:
    """``n`` distinct paging alerts (one opening version each)."""
    t0 = datetime.now(UTC).replace(microsecond=0)
    out: list[Alert] = []
    for i in range(n):
        b = AlertBook(patient_id=f"P{i}")
        f = Finding(finding_id=f"f{i}", patient_id=f"P{i}", rule_id="liver.alt_increased", dedupe_key="",
                    state="present", severity="high", grade=3,
                    evidence=[Evidence(observation_id=f"o{i}", analyte="ALT", value=200.0, unit="U/L",
                                       limit=120.0, comparison=">")],
                    protocol=ProtocolRef(id="sma-oa", version="1.2.0"), effective_at=t0, evaluated_at=t0,
                    route="liver", text=FindingText(what="ALT high", why="liver", action="repeat LFTs"))
        out += [a for a in apply_finding(b, f, t0 + timedelta(seconds=i), CONFIG) if a.notify]
    assert len(out) == n
    return out


class RecordingSink:
    name = "webhook"
    paging = True

    def __init__(self) -> None:
        self.received: list[str] = []

    async def deliver(self, alert: Alert) -> None:
        self.received.append(alert.idempotency_key)

    async def close(self) -> None:
        pass


class HeldLedger:
    """A persistent ledger whose writes are acknowledged only when the test says so (a slow
    broker, or an event loop busy elsewhere), or fail the first ``fail`` times."""

    def __init__(self, fail: int = 0) -> None:
        self.keys: set[str] = set()
        self.durable: list[str] = []
        self.acks: list[asyncio.Future] = []
        self.fail = fail
        self.hold = False

    def seen(self, key: DeliveryKey) -> bool:
        return key.as_str() in self.keys

    def mark(self, key: DeliveryKey):
        self.keys.add(key.as_str())
        return self._write(key.as_str())

    async def _write(self, k: str) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("broker unavailable")
        if self.hold:
            fut = asyncio.get_running_loop().create_future()
            self.acks.append(fut)
            await fut
        self.durable.append(k)


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_answered_versions_off_the_ledger_are_bounded_by_the_concurrency():
    """While ledger writes are held, at most ``concurrency`` versions are answered without
    being on the ledger: what a SIGKILL at that moment can make the next worker repeat."""
    alerts = _alerts(3 * DEFAULT_CONCURRENCY)
    sink, ledger = RecordingSink(), HeldLedger()
    ledger.hold = True
    d = Dispatcher([sink], ledger)
    await d.start()
    try:
        for a in alerts:
            d.enqueue(a)
        await _until(lambda: len(ledger.acks) == DEFAULT_CONCURRENCY)
        await asyncio.sleep(0.2)  # nothing more goes out while the writes are held
        assert len(sink.received) == DEFAULT_CONCURRENCY
        assert ledger.durable == []
        ledger.hold = False
        for fut in ledger.acks:
            fut.set_result(None)
        await d.join(5)
        assert sorted(sink.received) == sorted(a.idempotency_key for a in alerts)
        assert len(ledger.durable) == len(alerts)
    finally:
        await d.stop()


async def test_a_failed_ledger_write_is_written_again():
    """A delivered version whose ledger write failed is not sent again by this worker, and its
    record reaches the ledger once the broker takes writes again (without that, a later crash
    could repeat it however long after the delivery)."""
    (alert,) = _alerts(1)
    sink, ledger = RecordingSink(), HeldLedger(fail=3)
    d = Dispatcher([sink], ledger, backoff=Backoff(base=0.01, max_delay=0.05))
    await d.start()
    try:
        d.enqueue(alert)
        await _until(lambda: ledger.durable)
        assert ledger.durable == [f"webhook|{alert.alert_id}|{alert.version}"]
        assert sink.received == [alert.idempotency_key]
        assert d.enqueue(alert) == 0
    finally:
        await d.stop()


def _verdict(dups: list[str]) -> Verdict:
    return Verdict([], 0, [], [], [], [], [], [], dups, 0, 10, 10)


def test_a_repeat_is_explained_by_the_ledger_at_the_kill_not_by_seconds():
    kills = [100.0, 200.0]
    first = {"a:1": 95.0,    # 5 s before the kill, not on the ledger then: in flight
             "b:2": 99.5,    # 0.5 s before the kill, but its record was on the ledger: a bug
             "c:1": 150.0,   # before the second kill, off the ledger: in flight
             "d:3": 250.0}   # no kill after it: a bug
    ledger = [frozenset({"webhook|b|2", "webhook|x|1"}), frozenset({"webhook|a|1", "webhook|b|2"})]
    in_flight, unexplained = split_repeats(_verdict(sorted(first)), first, kills, ledger)
    assert in_flight == ["a:1", "c:1"]
    assert unexplained == ["b:2", "d:3"]
    # the same repeats judged by a 2 s window get both wrong: a:1 blamed, b:2 excused
    in_flight, unexplained = split_repeats(_verdict(sorted(first)), first, kills)
    assert in_flight == ["b:2"]
    assert unexplained == ["a:1", "c:1", "d:3"]


def test_the_kill_that_counts_is_the_last_before_the_second_copy():
    kills = [100.0, 200.0, 300.0]
    first = {"a:1": 95.0, "b:1": 95.0, "c:1": 95.0, "e:1": 150.0}
    second = {"a:1": 250.0,  # the worker after kill 0 died before sending it; sent after kill 1
              "b:1": 250.0,  # on the ledger at kill 1: the sender of the second copy loaded it
              "c:1": 99.0,   # sent twice by the same worker (a retry): no kill in between
              "e:1": 320.0}
    ledger = [frozenset(), frozenset({"webhook|b|1"}), frozenset({"webhook|b|1", "webhook|e|1"})]
    in_flight, unexplained = split_repeats(_verdict(sorted(first)), first, kills, ledger, second_at=second)
    assert in_flight == ["a:1"]
    assert unexplained == ["b:1", "c:1", "e:1"]

