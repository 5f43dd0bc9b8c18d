"""A real Prometheus (Debian's /usr/bin/prometheus, on loopback) scrapes a real worker, a real
inbox and a real MLLP listener (each on its own metrics port), as jobs sma-monitor,
sma-monitor-inbox and sma-monitor-mllp.

The worker runs on isolated topics against the real broker. Prometheus loads the shipped
``deploy/prometheus/rules.yml`` unchanged, scrapes ``/metrics`` every second, and the
first test forces the shipped ``MonitorDeadLetterRateHigh`` rule (more than 0.1 dead letters/s
over 5 minutes, ``for: 1m``) by publishing a burst of malformed events, then waits for
it to be ``firing`` in ``/api/v1/alerts``. ``MonitorWorkerDown`` is the control: it must
stay inactive. The second forces ``InboxLoginFailuresSpike`` (also ``for: 1m``). One
Prometheus serves both tests (module fixture ``stack``), and both rules are forced before
either test waits, so the two minutes of ``for:`` overlap.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from kafka import KafkaProducer

from workers import free_port, service_env, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
T0 = "2026-10-01T08:00:00+00:00"
FORCED_RULE = "MonitorDeadLetterRateHigh"
BURST = 150


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str] | dict[str, list[str]]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(RULES)],
            # a list: the workers (job sma-monitor); a dict: job name -> targets
            "scrape_configs": [{"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": t}]}
                               for job, t in (targets.items() if isinstance(targets, dict)
                                              else [("sma-monitor", targets)])],
        }))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"prometheus not ready:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()


def lab(pid: str, eid: str, value: float = 30.0) -> dict:
    return {"event_id": eid, "patient_id": pid, "loinc": "1742-6", "value": value, "unit": "U/L",
            "reference_range": {"low": 0, "high": 40}, "effective_at": T0, "status": "final", "source": "lab-prom"}


def alerts_named(prom: Prometheus, name: str) -> list[dict]:
    return [a for a in prom.api("alerts")["alerts"] if a["labels"].get("alertname") == name]



def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "monitor.cli", *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def _failed_login(opener, base: str, username: str) -> int:
    """One sign-in with a wrong password through the real login form (CSRF double-submit)."""
    import re
    import urllib.error

    html = opener.open(base + "/login", timeout=5).read().decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)
    data = urllib.parse.urlencode({"username": username, "password": "not-the-password", "csrf_token": token})
    try:
        return opener.open(base + "/login", data=data.encode(), timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


class Stack:
    """What the module's one Prometheus scrapes, and what was done to it before the tests look."""
    prom: Prometheus
    worker: object
    topics: dict[str, str]
    patients: list[str]
    inbox_base: str
    procs: list[subprocess.Popen]
    mllp_acks: list[bytes]
    login_codes: list[int]


@pytest.fixture(scope="module")
def stack(kafka_bootstrap, tmp_path_factory):
    """One Prometheus (the shipped rules, 1 s scrapes) for both tests: job sma-monitor (a
    worker), sma-monitor-inbox (an inbox's metrics port) and sma-monitor-mllp (an MLLP
    listener's metrics port). Both shipped rules the tests force have ``for: 1m``; both are
    forced here, one after the other, so their minutes run together instead of one test
    after the other. The worker gets valid events and one dead letter first (every series
    exists before the burst), then the burst of malformed events; the listener one stored
    and one unreadable message; the inbox a burst of failed sign-ins. The tests then wait
    for, and check, what Prometheus makes of each."""
    from kafka_broker import create_topics, drop_test_topics
    from monitor.inbox.auth import hash_password
    from workers import TEST_INBOX_SECRET, TEST_PSEUDONYM_SECRET, WorkerProcess

    if not os.access(PROMETHEUS, os.X_OK):
        pytest.fail(f"{PROMETHEUS} missing: run `make debs` (Debian package prometheus)")
    tmp = tmp_path_factory.mktemp("prom")
    st = Stack()
    prefix, fe_prefix = f"prom{uuid.uuid4().hex[:8]}", f"promfe{uuid.uuid4().hex[:8]}"
    st.topics = {n: f"{prefix}.{n}" for n in ("lab-results", "vital-signs", "liver-function", "treatments",
                                              "observations", "dead-letter", "findings", "alerts", "alert-actions",
                                              "patient-ticks")}
    fe_topics = {n: f"{fe_prefix}.{n}" for n in ("observations", "dead-letter", "alerts", "alert-actions",
                                                 "treatments", "patients")}
    all_topics = [*st.topics.values(), *fe_topics.values()]
    create_topics(kafka_bootstrap, all_topics, partitions=3)
    st.procs, st.worker, st.prom = [], None, None
    try:
        # the inbox and the listener start while the worker does
        users = tmp / "users.json"
        users.write_text(json.dumps({"users": [{"username": "nurse1", "role": "nurse", "wards": ["picu"],
                                                "password_hash": hash_password("right-password-1", n=2**14)}]}))
        inbox_port, inbox_metrics, mllp_port, mllp_metrics = free_port(), free_port(), free_port(), free_port()
        common = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "PSEUDONYM_SECRET": TEST_PSEUDONYM_SECRET,
                  "TOPIC_OBSERVATIONS": fe_topics["observations"], "TOPIC_DEAD_LETTER": fe_topics["dead-letter"],
                  "TOPIC_ALERTS": fe_topics["alerts"], "TOPIC_ALERT_ACTIONS": fe_topics["alert-actions"],
                  "TOPIC_TREATMENTS": fe_topics["treatments"], "TOPIC_PATIENTS": fe_topics["patients"]}
        st.procs = [
            _start(["inbox", "serve", "--host", "127.0.0.1", "--port", str(inbox_port), "--metrics-port",
                    str(inbox_metrics)], {**common, "INBOX_USERS_FILE": str(users), "INBOX_SECRET": TEST_INBOX_SECRET},
                   tmp / "inbox.log"),
            _start(["mllp", "--port", str(mllp_port), "--metrics-port", str(mllp_metrics)], common, tmp / "mllp.log"),
        ]
        st.mllp_port = mllp_port
        st.inbox_base = f"http://127.0.0.1:{inbox_port}"
        st.worker = WorkerProcess(kafka_bootstrap, service_env(st.topics, app_id=prefix,
                                                               MONITOR_LAG_INTERVAL_SECONDS="2"), tmp / "w")
        st.worker.launch()

        def ready() -> bool:
            try:
                with urllib.request.urlopen(st.inbox_base + "/readyz", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for(ready, 60, "inbox ready (store caught up)", interval=0.3)
        # Prometheus starts while the worker still does (its port is chosen already; the
        # targets-up wait below covers it)
        st.prom = Prometheus(tmp / "prometheus", {"sma-monitor": [f"127.0.0.1:{st.worker.port}"],
                                                  "sma-monitor-inbox": [f"127.0.0.1:{inbox_metrics}"],
                                                  "sma-monitor-mllp": [f"127.0.0.1:{mllp_metrics}"]})
        st.prom.start()
        st.worker.wait_ready(90)
        prom = st.prom
        try:
            wait_for(lambda: len(prom.query('up{job=~"sma-monitor|sma-monitor-inbox|sma-monitor-mllp"} == 1')) == 3,
                     30, "worker, inbox and listener targets up")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\ntargets: {prom.api('targets')}\n{prom.tail()}") from None

        # the worker: valid events and one dead letter, so every series exists before the burst
        st.patients = [f"PROMPAT-{uuid.uuid4().hex[:12]}" for _ in range(5)]
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        try:
            for i, pid in enumerate(st.patients):
                producer.send(st.topics["lab-results"], key=pid.encode(),
                              value=json.dumps(lab(pid, f"ok-{i}")).encode())
            producer.send(st.topics["lab-results"], key=st.patients[0].encode(), value=b'{"event_id": "bad-0", ')
            producer.flush()
            wait_for(lambda: prom.query('sum(monitor_dead_letters_total{job="sma-monitor"}) >= 1'), 60,
                     "first dead letter scraped")
            wait_for(lambda: prom.query('sum(monitor_events_consumed_total{job="sma-monitor",format="json"}) >= 5'), 60,
                     "valid events scraped")
            # ... then the burst that forces MonitorDeadLetterRateHigh
            for i in range(BURST):
                pid = st.patients[i % len(st.patients)]
                producer.send(st.topics["lab-results"], key=pid.encode(),
                              value=f'{{"event_id": "bad-{i + 1}", "patient_id": "{pid}"'.encode())
            producer.flush()
        finally:
            producer.close()

        # the listener: one result stored (AA), one unreadable (AE)
        sys_path = str(ROOT / "tests" / "integration")
        if sys_path not in sys.path:
            sys.path.insert(0, sys_path)
        from test_mllp import ORU, send_batch

        st.mllp_acks = send_batch(mllp_port, [ORU.format(ctl="P-1", mrn="MRN-PROM-1", n=1, alt=41, ast=31),
                                              "not HL7"])
        # the inbox: a burst of failed sign-ins (wrong passwords, then throttled), which
        # forces InboxLoginFailuresSpike
        import http.cookiejar

        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        st.login_codes = [_failed_login(opener, st.inbox_base, "nurse1" if i % 2 else f"guess{i}") for i in range(24)]
        yield st
    finally:
        if st.prom is not None:
            st.prom.stop()
        for p in st.procs:
            _stop(p)
        if st.worker is not None:
            st.worker.stop_services()
        drop_test_topics(kafka_bootstrap, all_topics, [prefix, fe_prefix])


def test_prometheus_scrapes_worker_and_shipped_rule_fires(stack):
    prom, topics, patients = stack.prom, stack.topics, stack.patients
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

    # the shipped rule goes pending, then firing (for: 1m)
    wait_for(lambda: alerts_named(prom, FORCED_RULE), 60, f"{FORCED_RULE} pending")
    firing = wait_for(lambda: [a for a in alerts_named(prom, FORCED_RULE) if a["state"] == "firing"], 120,
                      f"{FORCED_RULE} firing")
    alert = firing[0]
    assert alert["labels"]["topic"] == topics["lab-results"]
    assert alert["labels"]["severity"] == "warning" and alert["labels"]["category"] == "ops"
    assert float(alert["value"]) > 0.1

    rules = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert rules[FORCED_RULE]["state"] == "firing"
    assert rules[FORCED_RULE]["health"] == "ok"
    # control: every shipped rule evaluates without error, and the worker is not "down"
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

    # nothing Prometheus holds names a patient
    series = prom.api("series", **{"match[]": '{job="sma-monitor"}'})
    text = json.dumps(series) + json.dumps(prom.api("alerts"))
    for pid in patients:
        assert pid not in text


def test_prometheus_scrapes_inbox_and_mllp_listener_with_their_rules(stack):
    """Issue 14 item 7: a real inbox (metrics on its own port) and a real MLLP listener scraped
    as jobs sma-monitor-inbox / sma-monitor-mllp with the shipped rules: both up, the inbox caught
    up (InboxStoreStale inactive), MLLP messages by ack and type; a burst of failed sign-ins fires
    InboxLoginFailuresSpike; stopping the listener makes MllpListenerDown pending (for: 2m)."""
    prom, inbox_base = stack.prom, stack.inbox_base
    wait_for(lambda: len(prom.query('up{job=~"sma-monitor-inbox|sma-monitor-mllp"} == 1')) == 2, 30,
             "inbox and listener targets up")
    assert prom.query('monitor_inbox_caught_up{job="sma-monitor-inbox"} == 1')
    # the user-facing port has no metrics; the metrics port nothing else
    assert urllib.request.urlopen(inbox_base + "/metrics", timeout=5).url.endswith("/login")

    # MLLP: one result stored (AA), one unreadable (AE)
    assert len(stack.mllp_acks) == 2
    wait_for(lambda: prom.query('sum(monitor_mllp_messages_total{job="sma-monitor-mllp",ack="AA",'
                                'type="ORU^R01"}) == 1'), 30, "MLLP AA scraped")
    assert prom.query('monitor_mllp_parse_errors_total{job="sma-monitor-mllp",reason="hl7_invalid"} == 1')
    assert prom.query('monitor_mllp_max_connections{job="sma-monitor-mllp"} == 64')
    assert not prom.query('monitor_ready{job="sma-monitor-mllp"}'), "a worker gauge in the listener's scrape"

    # the burst of failed sign-ins (wrong passwords, then throttled) fires the shipped rule
    codes = stack.login_codes
    assert set(codes) <= {401, 429} and 401 in codes, codes
    wait_for(lambda: prom.query('sum(monitor_inbox_logins_total{job="sma-monitor-inbox",'
                                'outcome=~"failed|throttled"}) >= 24'), 30, "failed sign-ins scraped")
    firing = wait_for(lambda: [a for a in alerts_named(prom, "InboxLoginFailuresSpike") if a["state"] == "firing"],
                      120, "InboxLoginFailuresSpike firing")
    assert firing[0]["labels"]["job"] == "sma-monitor-inbox" and firing[0]["labels"]["category"] == "ops"
    rules = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert all(r["health"] == "ok" for r in rules.values()), {n: r.get("lastError") for n, r in rules.items()}
    # idle topics all along (a minute and more): the broker's fetch answers keep the store fresh
    assert prom.query('time() - monitor_inbox_last_fetch_timestamp_seconds{job="sma-monitor-inbox"} < 10'), \
        prom.query('time() - monitor_inbox_last_fetch_timestamp_seconds')
    for quiet in ("InboxDown", "InboxStoreStale", "MllpListenerDown", "MllpConnectionsNearCap"):
        assert rules[quiet]["state"] == "inactive", (quiet, rules[quiet])

    # the listener stops: its job's down rule goes pending (for: 2m), the inbox's does not
    listener = stack.procs[1]
    os.killpg(listener.pid, signal.SIGTERM)
    listener.wait(15)
    wait_for(lambda: alerts_named(prom, "MllpListenerDown"), 30, "MllpListenerDown pending")
    assert not alerts_named(prom, "InboxDown")
    text = json.dumps(prom.api("series", **{"match[]": '{job=~"sma-monitor-inbox|sma-monitor-mllp"}'}))
    assert "MRN-PROM-1" not in text and "nurse1" not in text
