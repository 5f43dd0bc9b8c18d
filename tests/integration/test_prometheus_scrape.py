"""A real Prometheus (Debian's /usr/bin/prometheus, on loopback) scrapes a real worker, a real
inbox and a real MLLP listener (each on its own metrics port), as jobs sma-monitor,
sma-monitor-inbox and sma-monitor-mllp.

The worker runs on isolated topics against the real broker. Prometheus loads the shipped
``deploy/prometheus/rules.yml`` unchanged, scrapes ``/metrics`` every second, and the
first test forces the shipped ``MonitorDeadLetterRateHigh`` rule (more than 0.1 dead letters/s
over 5 minutes, ``for: 1m``) by publishing a burst of malformed events, and checks that it
was ``firing`` in ``/api/v1/alerts``. ``MonitorWorkerDown`` is the control: it must
stay inactive. The second forces ``InboxLoginFailuresSpike`` (also ``for: 1m``). One
Prometheus serves both tests (session fixture ``prometheus_stack``, ``tests/prometheus_stack.py``):
it starts before the session's first test and these tests run last (under pytest-xdist, as
``make test`` runs the suite: on the worker that gets this module, which is sent first), so the
minute of ``for:`` passes while the rest of the suite runs; a thread records what Prometheus
said when each forced rule was first firing (the 5-minute windows have let them go by the end
of a full run), and everything else is checked live.
"""
from __future__ import annotations

import json
import os
import signal
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from prometheus_stack import BURST, FORCED_RULE, LOGIN_RULE, RULES, UNREADABLE_RULE, alerts_named
from workers import wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_prometheus_scrapes_worker_and_shipped_rule_fires(prometheus_stack):
    prom, topics, patients = prometheus_stack.prom, prometheus_stack.topics, prometheus_stack.patients
    wait_for(lambda: prom.query(f'sum(monitor_dead_letters_total{{job="sma-monitor",reason="malformed_json"}}) >= {BURST + 1}'), 90,
             "burst of dead letters scraped")

    # the service's own metrics, faust's sensor, lag, build info: all through the real scrape
    consumed = prom.query('monitor_events_consumed_total{job="sma-monitor"}')
    assert {(r["metric"]["topic"], r["metric"]["format"]) for r in consumed} >= {("lab-results", "json"),
                                                                                 ("lab-results", "invalid")}
    dead = prom.query('monitor_dead_letters_total{job="sma-monitor"}')
    assert {r["metric"]["reason"] for r in dead} == {"malformed_json"}
    assert {r["metric"]["topic"] for r in dead} == {topics["lab-results"]}
    assert prom.query('monitor_observations_total{job="sma-monitor",analyte="alt"}')
    assert prom.query('monitor_build_info{job="sma-monitor",version!=""}')
    # the worker runs the clinical core as make core built it (alerts/compiled_core.py)
    assert prom.query('monitor_build_info{job="sma-monitor",clinical_core="compiled"}')
    assert prom.query('monitor_ready{job="sma-monitor"} == 1')
    # faust no longer reads Kafka here (the hot paths are aiokafka loops): its sensor counts
    # the web requests it serves, this scrape among them
    assert prom.query('monitor_faust_http_status_codes_total{job="sma-monitor"} > 0'), "faust's sensor is not in the shared registry"
    # a partition's series appears once the worker has both its end offset (from a fetch) and
    # a commit (monitor/kafka_batch.py lag): wait for the three, however the scrapes fall
    def lag_series():
        series = prom.query(f'monitor_consumer_lag_messages{{topic="{topics["lab-results"]}"}}')
        return series if {r["metric"]["partition"] for r in series} == {"0", "1", "2"} else None
    lag = wait_for(lag_series, 30, "consumer lag series of every partition")
    assert {r["metric"]["partition"] for r in lag} == {"0", "1", "2"}
    wait_for(lambda: prom.query(f'sum(monitor_consumer_lag_messages{{topic="{topics["lab-results"]}"}}) == 0'), 60,
             "lag back to zero once the burst is processed")

    # the shipped rule went pending, then firing (for: 1m): what Prometheus said then
    seen = prometheus_stack.watcher.firing(FORCED_RULE, timeout=240)
    alert = seen["alerts"][0]
    assert alert["labels"]["topic"] == topics["lab-results"]
    assert alert["labels"]["severity"] == "warning" and alert["labels"]["category"] == "ops"
    assert float(alert["value"]) > 0.1
    # it was pending for the rule's minute first
    assert seen["at"] - datetime.fromisoformat(alert["activeAt"]).timestamp() >= 60, alert

    rules = seen["rules"]
    assert rules[FORCED_RULE]["state"] == "firing"
    assert rules[FORCED_RULE]["health"] == "ok"
    # control: every shipped rule evaluates without error, and the worker is not "down",
    # then and now
    for rules in (seen["rules"], {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}):
        assert all(r["health"] == "ok" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}
        assert rules["MonitorWorkerDown"]["state"] == "inactive"
        assert set(rules) == {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}

    # every dashboard query is valid PromQL against this server
    dash = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "sma-monitor.json").read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$job", ".*").replace("$__rate_interval", "1m")
            prom.query(expr)  # raises on a parse/evaluation error (HTTP 400)
    assert prom.query('sum by (topic, format) (rate(monitor_events_consumed_total{job=~".*"}[1m]))')
    # the worker times its garbage collections (monitor.metrics.time_garbage_collections)
    assert prom.query('sum(monitor_gc_pause_seconds_count{job="sma-monitor"}) > 0')
    # and the clinical processor's CPU over the records it processed (the dashboard's CPU per record)
    assert prom.query('sum(monitor_clinical_processor_cpu_seconds_total{job="sma-monitor"}) > 0')
    assert prom.query('sum(monitor_clinical_records_total{job="sma-monitor"}) > 0')
    # the clinical stage's durability, as the durability rules read it: partitions owned,
    # checkpoints written, and every rollback and commit-failure series there at 0 from the
    # start (increase() does not count the first sample of a series, so one born at 1 would
    # hide the first failure from MonitorRollingBack)
    assert prom.query('monitor_clinical_partitions_owned{job="sma-monitor"} > 0')
    assert prom.query('sum(monitor_clinical_checkpoints_total{job="sma-monitor",outcome="written"}) > 0')
    assert len(prom.query('monitor_rollbacks_total{job="sma-monitor"} == 0')) == 4
    assert len(prom.query('monitor_commit_failures_total{job="sma-monitor"} == 0')) == 2
    # the clinical clock completes its passes (MonitorClinicalClockStalled's condition is false)
    # and none failed
    assert prom.query('time() - monitor_clinical_clock_last_run_timestamp_seconds{job="sma-monitor"} '
                      '< 3 * monitor_clinical_clock_interval_seconds{job="sma-monitor"} + 60')
    assert len(prom.query('monitor_clinical_clock_failures_total{job="sma-monitor"} == 0')) == 2
    # every loop of the worker (ingest, clinical, delivery) has its restart series, at 0
    loops = prom.query('monitor_loop_restarts_total{job="sma-monitor"} == 0')
    assert {r["metric"]["loop"] for r in loops} == {"ingest", "clinical", "delivery"}

    # a patient whose stored state the worker cannot read (a newer release's value on its
    # changelog) pages operations: counted by the clock's first pass, not as a clock failure
    # (the failure series above are at 0), and the critical rule fires after its minute
    seen = prometheus_stack.watcher.firing(UNREADABLE_RULE, timeout=240)
    alert = seen["alerts"][0]
    assert alert["labels"]["severity"] == "critical" and alert["labels"]["category"] == "ops"
    assert alert["labels"]["instance"] == f"127.0.0.1:{prometheus_stack.worker.port}"
    assert float(alert["value"]) == 1.0
    assert seen["at"] - datetime.fromisoformat(alert["activeAt"]).timestamp() >= 60, alert
    assert prom.query('monitor_clinical_patients_unreadable{job="sma-monitor"} == 1')

    # nothing Prometheus holds names a patient
    series = prom.api("series", **{"match[]": '{job="sma-monitor"}'})
    text = json.dumps(series) + json.dumps(prom.api("alerts"))
    for pid in [*patients, prometheus_stack.unreadable_patient]:
        assert pid not in text


def test_prometheus_scrapes_inbox_and_mllp_listener_with_their_rules(prometheus_stack):
    """Issue 14 item 7: a real inbox (metrics on its own port) and a real MLLP listener scraped
    as jobs sma-monitor-inbox / sma-monitor-mllp with the shipped rules: both up, the inbox caught
    up (InboxStoreStale inactive), MLLP messages by ack and type; a burst of failed sign-ins fires
    InboxLoginFailuresSpike; stopping the listener makes MllpListenerDown pending (for: 2m)."""
    prom, inbox_base = prometheus_stack.prom, prometheus_stack.inbox_base
    wait_for(lambda: len(prom.query('up{job=~"sma-monitor-inbox|sma-monitor-mllp"} == 1')) == 2, 30,
             "inbox and listener targets up")
    assert prom.query('monitor_inbox_caught_up{job="sma-monitor-inbox"} == 1')
    # the user-facing port has no metrics; the metrics port nothing else
    assert urllib.request.urlopen(inbox_base + "/metrics", timeout=5).url.endswith("/login")

    # MLLP: one result stored (AA), one unreadable (AE)
    assert len(prometheus_stack.mllp_acks) == 2
    wait_for(lambda: prom.query('sum(monitor_mllp_messages_total{job="sma-monitor-mllp",ack="AA",'
                                'type="ORU^R01"}) == 1'), 30, "MLLP AA scraped")
    assert prom.query('monitor_mllp_parse_errors_total{job="sma-monitor-mllp",reason="hl7_invalid"} == 1')
    assert prom.query('monitor_mllp_max_connections{job="sma-monitor-mllp"} == 64')
    assert not prom.query('monitor_ready{job="sma-monitor-mllp"}'), "a worker gauge in the listener's scrape"

    # the burst of failed sign-ins (wrong passwords, then throttled) fires the shipped rule
    codes = prometheus_stack.login_codes
    assert set(codes) <= {401, 429} and 401 in codes, codes
    wait_for(lambda: prom.query('sum(monitor_inbox_logins_total{job="sma-monitor-inbox",'
                                'outcome=~"failed|throttled"}) >= 24'), 30, "failed sign-ins scraped")
    seen = prometheus_stack.watcher.firing(LOGIN_RULE, timeout=240)
    firing = seen["alerts"]
    assert firing[0]["labels"]["job"] == "sma-monitor-inbox" and firing[0]["labels"]["category"] == "ops"
    assert seen["at"] - datetime.fromisoformat(firing[0]["activeAt"]).timestamp() >= 60, firing[0]
    assert seen["rules"][LOGIN_RULE]["state"] == "firing"
    rules = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert all(r["health"] == "ok" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}
    # idle topics all along (a minute and more): the broker's fetch answers keep the store fresh
    assert prom.query('time() - monitor_inbox_last_fetch_timestamp_seconds{job="sma-monitor-inbox"} < 10'), \
        prom.query('time() - monitor_inbox_last_fetch_timestamp_seconds')
    for quiet in ("InboxDown", "InboxStoreStale", "MllpListenerDown", "MllpConnectionsNearCap"):
        assert rules[quiet]["state"] == "inactive", (quiet, rules[quiet])

    # the listener stops: its job's down rule goes pending (for: 2m), the inbox's does not
    listener = prometheus_stack.procs[1]
    os.killpg(listener.pid, signal.SIGTERM)
    listener.wait(15)
    wait_for(lambda: alerts_named(prom, "MllpListenerDown"), 30, "MllpListenerDown pending")
    assert not alerts_named(prom, "InboxDown")
    text = json.dumps(prom.api("series", **{"match[]": '{job=~"sma-monitor-inbox|sma-monitor-mllp"}'}))
    assert "MRN-PROM-1" not in text and "nurse1" not in text
