"""The delivery ledger read back at start-up: a key that is not UTF-8 (a writer that is not
this service) is kept as text, never an exception that stops the delivery loop (which then
restarted, read the ledger from its start and met the same record again)."""
from __future__ import annotations

from monitor.notify.outbox import KafkaLedger
from monitor.notify.sinks import DeliveryKey


def test_a_ledger_key_that_is_not_utf8_is_kept_without_raising():
    ledger = KafkaLedger()
    ledger.add_raw(b"\xff\xfe|a1|3")
    ledger.add_raw(DeliveryKey("webhook", "a1", 3).as_str().encode())
    assert len(ledger) == 2
    assert ledger.seen(DeliveryKey("webhook", "a1", 3))
    assert not ledger.seen(DeliveryKey("webhook", "a1", 4))
