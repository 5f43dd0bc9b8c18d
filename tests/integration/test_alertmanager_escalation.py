"""Paging that escalates (issue 14), against the real Alertmanager (Debian ``prometheus-alertmanager``)
and a real broker: the delivery service (``monitor.notify.outbox.DeliveryService``) reads ``alerts``
and pushes to Alertmanager, whose routing tree (routes on the ``escalation_tier`` LABEL) sends tier 0/1
to one receiver and the failsafe tier to another (real HTTP receivers record them). generatorURL links
to the inbox alert page (opaque id only). After an Alertmanager restart (it keeps no alerts) the open
alert is back after the next refresh push."""
from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import timedelta

import pytest

from receivers import WebhookReceiver
from schemas.alert import HistoryEntry
from test_sinks import AM_BIN, PID, Alertmanager, _scenario

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

ROUTING = """
route:
  receiver: tiers
  group_by: [alert_ref, rule_id, escalation_tier]
  group_wait: 0s
  group_interval: 1s
  repeat_interval: 1h
  routes:
    - matchers: ['escalation_tier="failsafe"']
      receiver: failsafe
receivers:
  - name: tiers
    webhook_configs: [{{url: "{tier_url}", send_resolved: true}}]
  - name: failsafe
    webhook_configs: [{{url: "{failsafe_url}", send_resolved: true}}]
"""


async def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _refs(receiver: WebhookReceiver) -> list[tuple[str, str, str]]:
    with receiver.lock:
        return [(a["labels"]["alert_ref"], a["labels"]["escalation_tier"], a["status"])
                for r in receiver.received for a in (r["body"] or {}).get("alerts", [])]


async def test_tier_label_routes_and_restart_recovers(kafka_bootstrap, topic_factory, tmp_path):
    if not os.path.exists(AM_BIN):
        pytest.skip("prometheus-alertmanager not installed")
    from kafka import KafkaProducer

    from monitor.notify.outbox import DeliveryService
    from monitor.settings import Settings

    topics = topic_factory("alerts", "alert-deliveries", "open-alerts")
    versions = _scenario()
    alt = [v for v in versions if v.rule_id == "liver.alt_increased"][-1]  # open (acknowledged), tier < failsafe
    assert alt.is_open and alt.escalation_tier < len(alt.route["tiers"])
    failsafe = len(alt.route["tiers"])
    escalated = alt.model_copy(update={
        "version": alt.version + 1, "escalation_tier": failsafe, "updated_at": alt.updated_at + timedelta(minutes=1),
        "history": [*alt.history, HistoryEntry(at=alt.updated_at + timedelta(minutes=1), by="system",
                                               action="escalated", tier=failsafe)]})

    with WebhookReceiver() as tier_rx, WebhookReceiver() as failsafe_rx:
        am = Alertmanager(tmp_path, ROUTING.format(tier_url=tier_rx.url, failsafe_url=failsafe_rx.url))
        am.start()
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        svc = DeliveryService(Settings(
            kafka_bootstrap_servers=kafka_bootstrap, topic_alerts=topics["alerts"],
            topic_deliveries=topics["alert-deliveries"], topic_open_alerts=topics["open-alerts"], MONITOR_APP_ID=topics["alerts"].split(".")[0],
            alertmanager_url=am.url, alertmanager_refresh_seconds=1.0,
            inbox_public_url="https://inbox.example.org"))
        try:
            producer.send(topics["alerts"], key=PID.encode(), value=alt.model_dump_json().encode()).get(30)
            await svc.start()
            tier = svc.sinks[0].tier_label(alt)
            await _until(lambda: (alt.pseudonym, tier, "firing") in _refs(tier_rx), 30, "tier receiver")
            assert not _refs(failsafe_rx)
            (active,) = [a for a in am.alerts() if a["labels"]["alert_ref"] == alt.pseudonym]
            assert active["generatorURL"] == f"https://inbox.example.org/alerts/{alt.alert_id}"
            assert PID not in json.dumps(am.alerts()) and alt.text.what not in json.dumps(am.alerts())

            # escalation to the failsafe: a new tier LABEL, so the failsafe receiver is paged
            producer.send(topics["alerts"], key=PID.encode(), value=escalated.model_dump_json().encode()).get(30)
            await _until(lambda: (alt.pseudonym, "failsafe", "firing") in _refs(failsafe_rx), 30, "failsafe receiver")
            await _until(lambda: (alt.pseudonym, tier, "resolved") in _refs(tier_rx), 30,
                         "the previous tier's label set ended")

            # Alertmanager restarts and keeps no alerts: the refresh brings the open one back
            am.stop()
            am.start()
            assert [a for a in am.alerts() if a["labels"]["alert_ref"] == alt.pseudonym] == []
            t0 = time.monotonic()
            back = await _until(lambda: [a for a in am.alerts() if a["labels"]["alert_ref"] == alt.pseudonym
                                         and a["status"]["state"] == "active"], 10, "alert back after restart")
            assert time.monotonic() - t0 < 5.0  # within a few refresh intervals (1 s)
            assert back[0]["labels"]["escalation_tier"] == "failsafe"
        finally:
            await svc.stop()
            producer.close()
            am.stop()
