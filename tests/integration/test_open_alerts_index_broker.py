"""The open-alerts index on a real broker (``monitor.notify.open_alerts``): a delivery service
taking an outbox partition over learns the open alerts it must keep re-pushing to Alertmanager
from the compacted index, not from the partition's whole history, and falls back to the history
whenever the index may be behind the group's commit.

Three owners of one outbox partition in turn, each a real ``DeliveryService`` with an
Alertmanager sink (a real HTTP receiver on loopback):

1. an upgrade: an older release delivered everything and committed, the index is empty: the
   first owner reads the history, then writes the index and its marker without a new record;
2. the next owner reads the index only, and knows the same open alerts;
3. an older release commits again without writing the index (a rolling upgrade), after alerts
   closed and others opened: the next owner sees the marker behind the commit, reads the
   history, and rewrites the index, tombstones for the alerts that closed meanwhile included.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from outbox_samples import alert_version, commit_without_index, paged_alert
from receivers import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

def _template():
    return paged_alert()


def _versions(template, alert_id: str, closed_at: int | None, first: int = 1, last: int = 3):
    """Versions ``first``..``last`` of one alert: opened (a page), updated (no page), and,
    when ``closed_at`` is that version, resolved (a page)."""
    return [alert_version(template, alert_id, v, closing=v == closed_at) for v in range(first, last + 1)]


def _open_versions(history) -> dict[str, int]:
    """The latest version of each alert that is open at the end of ``history``."""
    latest = {}
    for a in history:
        latest[a.alert_id] = a
    return {i: a.version for i, a in latest.items() if a.is_open}


def _produce(bootstrap: str, topic: str, alerts) -> int:
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    try:
        futures = [p.send(topic, partition=0, key=a.patient_id.encode(), value=a.model_dump_json().encode())
                   for a in alerts]
        return max(f.get(30).offset for f in futures) + 1
    finally:
        p.close()


def _index(bootstrap: str, topic: str) -> tuple[dict[str, int], int | None]:
    """The index partition as a reader of it sees it: open alert id -> version, and the marker."""
    import json

    from kafka import KafkaConsumer, TopicPartition

    from monitor.notify.open_alerts import MARKER_KEY, marker_offset

    tp = TopicPartition(topic, 0)
    c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        c.assign([tp])
        c.seek_to_beginning(tp)
        end = c.end_offsets([tp])[tp]
        entries, marker = {}, None
        while c.position(tp) < end:
            for r in c.poll(timeout_ms=1000).get(tp, []):
                if r.key == MARKER_KEY:
                    marker = marker_offset(r.value)
                elif r.value is None:
                    entries.pop(r.key.decode(), None)
                else:
                    entries[r.key.decode()] = json.loads(r.value)["version"]
        return entries, marker
    finally:
        c.close()


def _rebuilds(source: str) -> float:
    from monitor.metrics import REGISTRY

    return REGISTRY.get_sample_value("monitor_delivery_open_alerts_rebuilds_total", {"source": source}) or 0.0


async def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await pred() if asyncio.iscoroutinefunction(pred) else pred()
        if got:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def _owner(settings, source: str):
    """A delivery service that has taken the partition over and learnt its open alerts from ``source``."""
    from aiokafka import TopicPartition

    from monitor.notify.outbox import DeliveryService

    before = {s: _rebuilds(s) for s in ("index", "history", "outbox")}
    svc = DeliveryService(settings)
    await svc.start()
    tp = TopicPartition(settings.topic_alerts, 0)
    await _until(lambda: tp in svc.open_alerts.built, 60, "the partition's open alerts learnt")
    after = {s: _rebuilds(s) - before[s] for s in before}
    assert after == {s: float(s == source) for s in before}, after
    return svc, tp


async def test_a_new_owner_learns_the_open_alerts_from_the_index_and_from_the_history_when_it_is_behind(
        kafka_bootstrap, topic_factory):
    from monitor.settings import Settings

    topics = topic_factory("alerts", "alert-deliveries", "open-alerts", partitions=1)
    app_id = topics["alerts"].split(".")[0]
    template = _template()
    # 90 alerts, one in three resolved at version 3
    history = [v for i in range(90) for v in _versions(template, uuid.uuid4().hex, 3 if i % 3 == 0 else None)]
    end = _produce(kafka_bootstrap, topics["alerts"], history)
    expected = _open_versions(history)
    assert len(expected) == 60

    with WebhookReceiver() as am:
        settings = Settings(
            kafka_bootstrap_servers=kafka_bootstrap, topic_alerts=topics["alerts"],
            topic_deliveries=topics["alert-deliveries"], topic_open_alerts=topics["open-alerts"],
            MONITOR_APP_ID=app_id, alertmanager_url=am.url, alertmanager_refresh_seconds=3600)

        # 1. an upgrade: everything delivered and committed by a release without the index
        commit_without_index(kafka_bootstrap, f"{app_id}-delivery", topics["alerts"], end)
        first, tp = await _owner(settings, "history")
        try:
            assert {i: a.version for i, a in first.open_alerts.open[tp].items()} == expected
            # the index and its marker are written though no new record came
            await _until(lambda: _index(kafka_bootstrap, topics["open-alerts"]) == (expected, end), 30,
                         "the index written from the history")
            assert am.received == []  # nothing delivered again
        finally:
            await first.stop()

        # 2. the next owner reads the index, not the history; five alerts close as it starts
        closing = [v for i in sorted(expected)[-5:] for v in _versions(template, i, 4, first=4, last=4)]
        end = _produce(kafka_bootstrap, topics["alerts"], closing)
        history += closing
        expected = _open_versions(history)
        second, tp = await _owner(settings, "index")
        try:
            await _until(lambda: {i: a.version for i, a in second.open_alerts.open[tp].items()} == expected, 30,
                         "the closes read")
            assert await second.refresh_once() == len(expected)  # what Alertmanager is given again
            await _until(lambda: _index(kafka_bootstrap, topics["open-alerts"]) == (expected, end), 30,
                         "the closed alerts tombstoned in the index")
        finally:
            await second.stop()

        # 3. alerts close and others open; a release without the index delivers them and commits
        still_open = sorted(expected)
        changes = [v for i in still_open[:20] for v in _versions(template, i, 4, first=4, last=4)]
        changes += [v for _ in range(10) for v in _versions(template, uuid.uuid4().hex, None)]
        end = _produce(kafka_bootstrap, topics["alerts"], changes)
        commit_without_index(kafka_bootstrap, f"{app_id}-delivery", topics["alerts"], end)
        expected = _open_versions(history + changes)
        assert len(expected) == 55 - 20 + 10
        third, tp = await _owner(settings, "history")
        try:
            assert {i: a.version for i, a in third.open_alerts.open[tp].items()} == expected
            # the index is rewritten: the 20 closed alerts tombstoned, the 10 new ones added
            await _until(lambda: _index(kafka_bootstrap, topics["open-alerts"]) == (expected, end), 30,
                         "the index rewritten from the history")
        finally:
            await third.stop()


async def test_without_the_index_topic_the_history_is_read_and_the_gauge_says_so(kafka_bootstrap, topic_factory):
    """A deployment without the topic (no KafkaTopic, no ACL): not used, said on /metrics (and by
    MonitorOpenAlertsIndexNotKept), and the open alerts still learnt from the history."""
    from monitor.metrics import REGISTRY
    from monitor.settings import Settings

    topics = topic_factory("alerts", "alert-deliveries", partitions=1)
    app_id = topics["alerts"].split(".")[0]
    history = [v for i in range(10) for v in _versions(_template(), uuid.uuid4().hex, 3 if i < 4 else None)]
    end = _produce(kafka_bootstrap, topics["alerts"], history)
    commit_without_index(kafka_bootstrap, f"{app_id}-delivery", topics["alerts"], end)
    with WebhookReceiver() as am:
        settings = Settings(
            kafka_bootstrap_servers=kafka_bootstrap, topic_alerts=topics["alerts"],
            topic_deliveries=topics["alert-deliveries"], topic_open_alerts=f"{app_id}.open-alerts",
            MONITOR_APP_ID=app_id, alertmanager_url=am.url, alertmanager_refresh_seconds=3600)
        svc, tp = await _owner(settings, "history")
        try:
            assert REGISTRY.get_sample_value("monitor_delivery_open_alerts_index_unusable") == 1
            assert {i: a.version for i, a in svc.open_alerts.open[tp].items()} == _open_versions(history)
            assert svc.open_alerts.topic is None  # nothing is written to a topic that is not there
        finally:
            await svc.stop()


async def test_an_alert_closed_after_the_commit_is_not_pushed_again_while_the_outbox_catches_up(
        kafka_bootstrap, topic_factory):
    """The index says an alert is open; it closed after the commit the new owner resumes from,
    behind 20,000 other records. The refresh (every 0.1 s here) must not push it to Alertmanager
    as firing again before the outbox has read that far: Alertmanager would page a resolved alert."""
    from monitor.settings import Settings

    topics = topic_factory("alerts", "alert-deliveries", "open-alerts", partitions=1)
    app_id = topics["alerts"].split(".")[0]
    template = _template()
    x = uuid.uuid4().hex
    _produce(kafka_bootstrap, topics["alerts"], _versions(template, x, None, last=1))
    with WebhookReceiver() as am:
        settings = Settings(
            kafka_bootstrap_servers=kafka_bootstrap, topic_alerts=topics["alerts"],
            topic_deliveries=topics["alert-deliveries"], topic_open_alerts=topics["open-alerts"],
            MONITOR_APP_ID=app_id, alertmanager_url=am.url, alertmanager_refresh_seconds=0.1)
        first, tp = await _owner(settings, "outbox")
        try:
            await _until(lambda: _index(kafka_bootstrap, topics["open-alerts"]) == ({x: 1}, 1), 30,
                         "the open alert indexed")
        finally:
            await first.stop()
        # 20,000 updates that page nobody (of alerts Alertmanager never had), then the close
        fillers = [alert_version(template, uuid.uuid4().hex, 2) for _ in range(20_000)]
        end = _produce(kafka_bootstrap, topics["alerts"], fillers + _versions(template, x, 2, first=2, last=2))
        with am.lock:
            seen = len(am.received)
        second, tp = await _owner(settings, "index")
        try:
            await _until(lambda: second._next.get(tp, 0) >= end, 60, "the outbox read to its end")
            await _until(lambda: any(item["annotations"]["status"] == "resolved"
                                     for r in am.received[seen:] for item in r["body"]), 30, "the close delivered")
            await asyncio.sleep(0.5)  # refreshes after it push nothing: no alert is open
            with am.lock:
                pushed = [item["annotations"] for r in am.received[seen:] for item in r["body"]]
            assert [p for p in pushed if p["status"] != "resolved"] == [], pushed[:3]
        finally:
            await second.stop()
