"""The delivery service's open alerts per outbox partition (``monitor.notify.open_alerts``): what
the Alertmanager refresh re-pushes, what the open-alerts index must be rewritten with, and when
the index is valid. Pure bookkeeping, no broker (the broker tests are in
``tests/integration/test_open_alerts_index_broker.py``)."""
from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition

from outbox_samples import alert_version, paged_alert
from monitor.notify.open_alerts import MARKER_KEY, OpenAlerts, marker_offset, marker_value
from schemas.alert import Alert, AlertStatus

TP = TopicPartition("alerts", 0)


@pytest.fixture(scope="module")
def opened() -> Alert:
    alert = paged_alert()
    assert alert.is_open and alert.notify
    return alert


def version(alert: Alert, alert_id: str, v: int, status: AlertStatus = AlertStatus.FIRING) -> Alert:
    return alert_version(alert, alert_id, v, closing=status == AlertStatus.RESOLVED)


def test_open_versions_are_kept_newest_first_and_a_close_forgets_the_alert(opened):
    book = OpenAlerts("open-alerts")
    book.built.add(TP)
    book.track(TP, version(opened, "a" * 32, 2), delivered=True)
    book.track(TP, version(opened, "a" * 32, 1), delivered=True)  # older: ignored
    assert book.open[TP]["a" * 32].version == 2
    book.track(TP, version(opened, "b" * 32, 1), delivered=False)  # Alertmanager was not given it
    assert "b" * 32 not in book.open[TP]
    book.track(TP, version(opened, "a" * 32, 3, AlertStatus.RESOLVED), delivered=True)
    assert book.open[TP] == {}
    assert book.dirty[TP] == {"a" * 32}  # its entry is rewritten: a tombstone


def test_while_building_a_closed_version_is_remembered_so_an_older_open_one_does_not_reopen_it(opened):
    """The outbox reader runs ahead of the index or history read: a close it saw must win over
    the older open version the build reads afterwards."""
    book = OpenAlerts("open-alerts")
    book.track(TP, version(opened, "a" * 32, 4, AlertStatus.RESOLVED), delivered=True)
    book.track(TP, version(opened, "a" * 32, 2), delivered=True)  # the history, behind the reader
    assert "a" * 32 not in book.open.get(TP, {})
    assert "a" * 32 not in book.dirty.get(TP, set())  # never known open here: the build decides
    book.track(TP, version(opened, "a" * 32, 5), delivered=True)  # reopened later: newer, kept
    assert book.open[TP]["a" * 32].version == 5


def test_the_index_learnt_behind_the_outbox_keeps_the_newer_versions_and_tombstones_what_closed(opened):
    book = OpenAlerts("open-alerts")
    book.track(TP, version(opened, "a" * 32, 4, AlertStatus.RESOLVED), delivered=True)  # read first
    book.track(TP, version(opened, "b" * 32, 3), delivered=True)
    book.dirty.clear()
    book.learn_index(TP, [version(opened, "a" * 32, 2), version(opened, "b" * 32, 2), version(opened, "c" * 32, 1)])
    assert {i: a.version for i, a in book.open[TP].items()} == {"b" * 32: 3, "c" * 32: 1}
    assert book.dirty[TP] == {"a" * 32}  # the index's entry of the closed alert: a tombstone


def test_the_index_is_flushed_for_changed_alerts_and_for_a_marker_behind_the_commit(opened):
    book = OpenAlerts("open-alerts")
    assert not book.needs_flush(TP, 10)  # nothing changed, not built: nothing to write
    book.track(TP, version(opened, "a" * 32, 1), delivered=True)
    assert book.needs_flush(TP, 10)
    book.dirty.clear()
    book.built.add(TP)
    assert book.needs_flush(TP, 10)  # built, and no marker written yet
    book.marked[TP] = 10
    assert not book.needs_flush(TP, 10)
    assert book.needs_flush(TP, 11)
    assert not OpenAlerts(None).needs_flush(TP, 11)  # no index (no Alertmanager sink)


def test_the_refresh_pushes_the_open_alerts_of_the_given_partitions_once_they_are_built(opened):
    book = OpenAlerts("open-alerts")
    other = TopicPartition("alerts", 1)
    book.track(TP, version(opened, "a" * 32, 1), delivered=True)
    book.track(other, version(opened, "b" * 32, 1), delivered=True)
    assert book.alerts({TP, other}) == []  # a close may come later in the read
    book.built |= {TP, other}
    assert [a.alert_id for a in book.alerts({TP})] == ["a" * 32]
    book.drop(TP)
    assert [a.alert_id for a in book.alerts({TP, other})] == ["b" * 32] and TP not in book.open


def test_marker_round_trip_and_unreadable_markers():
    assert marker_offset(marker_value(1234)) == 1234
    assert marker_offset(None) is None
    assert marker_offset(b"not json") is None
    assert marker_offset(b'{"other": 1}') is None
    assert len(MARKER_KEY) != 32  # never an alert id (32 hex characters)


class RecordingProducer:
    """Records what ``flush`` writes (topic, key, value, partition); ``during_send`` runs at the
    first send, as another task could while the writes are awaited."""

    def __init__(self, during_send=None) -> None:
        self.sent: list[tuple] = []
        self.during_send = during_send

    async def send(self, topic, key=None, value=None, partition=None):
        self.sent.append((topic, key, value, partition))
        if self.during_send is not None:
            self.during_send()
            self.during_send = None
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_a_flush_writes_the_changed_entries_then_the_marker_of_a_built_partition(opened):
    book = OpenAlerts("open-alerts")
    book.built.add(TP)
    book.track(TP, version(opened, "a" * 32, 1), delivered=True)
    book.track(TP, version(opened, "b" * 32, 1), delivered=True)
    book.track(TP, version(opened, "b" * 32, 2, AlertStatus.RESOLVED), delivered=True)
    producer = RecordingProducer()
    assert await book.flush(producer, TP, 42)
    assert [(k, v is None) for _, k, v, _ in producer.sent] == [
        (b"a" * 32, False), (b"b" * 32, True), (MARKER_KEY, False)]  # the marker last
    assert marker_offset(producer.sent[-1][2]) == 42 and {p for *_, p in producer.sent} == {0}
    assert not book.needs_flush(TP, 42)


async def test_a_build_that_ends_during_a_flush_does_not_count_as_marked(opened):
    """The marker is decided before the writes: a partition built while they are awaited has
    no marker written yet, so the next commit writes it."""
    book = OpenAlerts("open-alerts")
    book.track(TP, version(opened, "a" * 32, 1), delivered=True)
    producer = RecordingProducer(during_send=lambda: book.built.add(TP))
    assert not await book.flush(producer, TP, 42)
    assert MARKER_KEY not in [k for _, k, _, _ in producer.sent]
    assert book.needs_flush(TP, 42)
