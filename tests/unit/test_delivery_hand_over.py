"""What a worker handing its outbox partitions over does with its deliveries (pure, no
broker): ``Dispatcher.withdraw`` starts no more versions of the alerts given up and lets the
ones in flight end on the ledger; ``Dispatcher.stop(finish_timeout=...)`` lets the ones in
flight (and ledger records being written again) end before it cancels anything. The
broker-level check is ``test_outbox_partitions_handed_over_between_live_workers_page_nothing_twice``.
"""
from __future__ import annotations

import asyncio

from monitor.notify.sinks import Dispatcher

from test_delivery_repeats import HeldLedger, _alerts, _until


class GatedSink:
    """A receiver that answers only when the test opens the gate (requests stay in flight)."""

    name = "webhook"
    paging = True

    def __init__(self) -> None:
        self.started: list[str] = []
        self.answered: list[str] = []
        self.gate = asyncio.Event()

    async def deliver(self, alert) -> None:
        self.started.append(alert.idempotency_key)
        await self.gate.wait()
        self.answered.append(alert.idempotency_key)

    async def close(self) -> None:
        pass


async def test_withdraw_lets_the_delivery_in_flight_end_and_starts_no_other_version():
    first, other = _alerts(2)
    # a later version of the first alert, queued behind the one in flight
    later = first.model_copy(update={"version": first.version + 1})
    sink, ledger = GatedSink(), HeldLedger()
    d = Dispatcher([sink], ledger)
    await d.start()
    try:
        d.enqueue(first)
        await _until(lambda: sink.started == [first.idempotency_key])
        d.enqueue(later)
        withdrawn = asyncio.ensure_future(d.withdraw({first.alert_id}, timeout=5.0))
        await asyncio.sleep(0.05)
        assert not withdrawn.done(), "withdraw returned while a delivery of the alert was in flight"
        sink.gate.set()
        assert await withdrawn == 0
        # the one in flight ended on the ledger; the queued later version was dropped, not sent
        assert ledger.durable == [f"webhook|{first.alert_id}|{first.version}"]
        assert sink.answered == [first.idempotency_key]
        assert d.pending_count() == 0
        # other alerts are not affected, and a withdrawn alert can be queued again later
        d.enqueue(other)
        d.enqueue(later)
        await d.join(5)
        assert sorted(sink.answered[1:]) == sorted([other.idempotency_key, later.idempotency_key])
    finally:
        await d.stop()


async def test_withdraw_gives_up_waiting_after_its_timeout_and_says_how_many_are_in_flight():
    (first,) = _alerts(1)
    sink, ledger = GatedSink(), HeldLedger()
    d = Dispatcher([sink], ledger)
    await d.start()
    try:
        d.enqueue(first)
        await _until(lambda: sink.started)
        assert await d.withdraw({first.alert_id}, timeout=0.1) == 1
    finally:
        sink.gate.set()
        await d.stop()


async def test_stop_waits_for_the_deliveries_in_flight_and_starts_no_queued_one():
    alerts = _alerts(3)
    sink, ledger = GatedSink(), HeldLedger()
    d = Dispatcher([sink], ledger, concurrency=2)
    await d.start()
    for a in alerts:
        d.enqueue(a)
    await _until(lambda: len(sink.started) == 2)
    stopping = asyncio.ensure_future(d.stop(finish_timeout=5.0))
    await asyncio.sleep(0.05)
    assert not stopping.done()
    sink.gate.set()
    await stopping
    # the two in flight were answered and are on the ledger; the third was never started and
    # is still pending (the next owner of its partition delivers it)
    assert len(sink.answered) == 2 and len(ledger.durable) == 2
    assert len(sink.started) == 2
    assert [a.idempotency_key for _sink, a in d.pending()] == [k for k in (a.idempotency_key for a in alerts)
                                                               if k not in sink.started]


async def test_stop_without_finish_timeout_cancels_what_is_in_flight():
    """The plain stop (the old behaviour, still used where no one takes over) does not wait."""
    (first,) = _alerts(1)
    sink, ledger = GatedSink(), HeldLedger()
    d = Dispatcher([sink], ledger)
    await d.start()
    d.enqueue(first)
    await _until(lambda: sink.started)
    await asyncio.wait_for(d.stop(), 1.0)
    assert sink.answered == [] and ledger.durable == []


async def test_stop_waits_for_a_ledger_record_being_written_again():
    (first,) = _alerts(1)
    sink, ledger = GatedSink(), HeldLedger(fail=1)  # the first ledger write fails
    sink.gate.set()
    d = Dispatcher([sink], ledger)
    await d.start()
    d.enqueue(first)
    await _until(lambda: sink.answered)
    await d.stop(finish_timeout=5.0)
    assert ledger.durable == [f"webhook|{first.alert_id}|{first.version}"]


async def test_a_dispatcher_started_again_after_a_stop_delivers():
    """The worker restarts a failed delivery loop with the same dispatcher: a stop that
    withheld every alert must not outlive it."""
    first, second = _alerts(2)
    sink, ledger = GatedSink(), HeldLedger()
    sink.gate.set()
    d = Dispatcher([sink], ledger)
    await d.start()
    d.enqueue(first)
    await d.join(5)
    await d.stop(finish_timeout=1.0)
    await d.start()
    try:
        d.enqueue(second)
        await d.join(5)
        assert sink.answered == [first.idempotency_key, second.idempotency_key]
    finally:
        await d.stop()


def test_the_hand_over_waits_long_enough_for_an_attempt_that_ends_by_its_sinks_timeout():
    """A webhook may take up to its HTTP timeout (10 s by default) to answer; a hand-over that
    gave up after a fixed 5 s let the next owner page again what the slow webhook was still
    taking. The wait now covers the longest sink timeout plus the ledger write."""
    from monitor.notify.outbox import HAND_OVER_SECONDS, LEDGER_WRITE_SECONDS, DeliveryService, hand_over_seconds
    from monitor.notify.sinks import AlertmanagerSink, WebhookSink
    from monitor.settings import Settings

    assert hand_over_seconds([]) == HAND_OVER_SECONDS
    assert hand_over_seconds([GatedSink()]) == HAND_OVER_SECONDS  # no timeout of its own
    slow = WebhookSink("http://127.0.0.1:9/hook", "s" * 32, timeout=30.0)
    quick = AlertmanagerSink("http://127.0.0.1:9", timeout=2.0)
    assert hand_over_seconds([quick]) == HAND_OVER_SECONDS
    assert hand_over_seconds([quick, slow]) == 30.0 + LEDGER_WRITE_SECONDS
    # the service's own sinks: the webhook's default timeout decides
    svc = DeliveryService(Settings(webhook_url="http://127.0.0.1:9/hook", webhook_secret="s" * 32))
    assert svc.hand_over_seconds == max(s.timeout_seconds for s in svc.sinks) + LEDGER_WRITE_SECONDS > HAND_OVER_SECONDS
