"""The Prometheus stack of ``tests/integration/test_prometheus_scrape.py``, started first.

A real Prometheus (Debian's /usr/bin/prometheus, on loopback) scrapes a real worker, a real
inbox and a real MLLP listener (each on its own metrics port) as jobs sma-monitor,
sma-monitor-inbox and sma-monitor-mllp, with the shipped ``deploy/prometheus/rules.yml``
unchanged and 1 s scrapes. The stack forces three shipped rules that have ``for: 1m``
(``MonitorDeadLetterRateHigh``: a burst of malformed events; ``InboxLoginFailuresSpike``: a
burst of failed sign-ins; ``MonitorPatientStateUnreadable``, critical: a patient whose
changelog value is a newer release's, on the worker's changelog before it starts).

Why it lives here: those rules need a minute of ``for:``, and both look at a 5-minute window,
so they are firing from about one minute to about five minutes after the bursts. The session
starts the stack before its first test (``prometheus_stack_started_first``, autouse, only when
a selected test uses ``prometheus_stack``), a ``RuleWatcher`` thread polls the real
Prometheus every second and keeps what ``/api/v1/alerts`` and ``/api/v1/rules`` said when each
forced rule was first firing, and the two scrape tests run last (``tests/conftest.py`` moves
them): the minute of ``for:`` passes while the rest of the suite runs instead of being waited
out. Under pytest-xdist (``make test``) the worker that is sent their module (first) starts
the stack and waits the minute out while the other worker runs the rest. The tests wait for
the watcher's record (a run of the module alone waits the minute as before) and check
everything else against the live Prometheus.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from workers import free_port, log_tail, service_env, wait_for

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
T0 = "2026-10-01T08:00:00+00:00"
FORCED_RULE = "MonitorDeadLetterRateHigh"
LOGIN_RULE = "InboxLoginFailuresSpike"
#: forced by a patient whose changelog value is a newer release's (written before the worker
#: starts): the worker's clock loads it, cannot read it, and counts it
UNREADABLE_RULE = "MonitorPatientStateUnreadable"
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
        return log_tail(self.log_path, n)

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
    unreadable_patient: str
    inbox_base: str
    procs: list[subprocess.Popen]
    mllp_acks: list[bytes]
    login_codes: list[int]
    watcher: "RuleWatcher | None"


class RuleWatcher(threading.Thread):
    """Polls the real Prometheus every second and keeps, for each rule named, what
    ``/api/v1/alerts`` (its alerts) and ``/api/v1/rules`` (every rule) said at the first
    evaluation where that rule had a firing alert. Stops once it has them all, or after
    ``deadline`` seconds (the rules are firing from about 1 to about 5 minutes after the
    bursts)."""

    def __init__(self, prom: Prometheus, names: list[str], deadline: float = 240.0) -> None:
        super().__init__(name="prometheus-rule-watcher", daemon=True)
        self.prom, self.names, self.deadline = prom, names, deadline
        self.first_firing: dict[str, dict] = {}
        self.errors: list[str] = []
        self._done = threading.Event()
        self._stop_asked = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.deadline
        try:
            while not self._stop_asked.is_set() and time.monotonic() < end:
                try:
                    alerts = self.prom.api("alerts")["alerts"]
                    for name in self.names:
                        firing = [a for a in alerts if a["labels"].get("alertname") == name and a["state"] == "firing"]
                        if firing and name not in self.first_firing:
                            rules = {r["name"]: r for g in self.prom.api("rules")["groups"] for r in g["rules"]}
                            self.first_firing[name] = {"at": time.time(), "alerts": firing, "rules": rules}
                    if len(self.first_firing) == len(self.names):
                        return
                except (OSError, ValueError, KeyError, AssertionError) as exc:
                    self.errors.append(repr(exc)[:300])
                self._stop_asked.wait(1.0)
        finally:
            self._done.set()

    def firing(self, name: str, timeout: float) -> dict:
        """The record of ``name``'s first firing evaluation; waits up to ``timeout`` seconds
        for the watcher; an AssertionError if the rule was never seen firing."""
        self._done.wait(timeout)
        if name not in self.first_firing:
            raise AssertionError(f"{name} never seen firing (watched {self.deadline:.0f} s; "
                                 f"seen: {sorted(self.first_firing)}; errors: {self.errors[-3:]})\n{self.prom.tail()}")
        return self.first_firing[name]

    def stop(self) -> None:
        self._stop_asked.set()
        self.join(5)


def build_stack(kafka_bootstrap: str, tmp: Path):
    """A generator: yields the started, forced ``Stack``, then stops it all. One Prometheus
    (the shipped rules, 1 s scrapes): job sma-monitor (a worker), sma-monitor-inbox (an
    inbox's metrics port) and sma-monitor-mllp (an MLLP listener's metrics port). The worker
    gets valid events and one dead letter first (every series exists before the burst), then
    the burst of malformed events; the listener one stored and one unreadable message; the
    inbox a burst of failed sign-ins. A ``RuleWatcher`` then records when each forced rule is
    firing."""
    from kafka import KafkaProducer

    from kafka_broker import create_topics, drop_test_topics
    from monitor.inbox.auth import hash_password
    from workers import TEST_INBOX_SECRET, TEST_PSEUDONYM_SECRET, WorkerProcess

    if not os.access(PROMETHEUS, os.X_OK):
        raise RuntimeError(f"{PROMETHEUS} missing: run `make debs` (Debian package prometheus)")
    st = Stack()
    st.watcher = None
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
        # a patient whose stored state a newer release wrote (format version 2), on the changelog
        # the worker restores (created here as the worker would, keyed and partitioned as its
        # patient stream): its clock's first pass loads it and counts it unreadable
        from monitor.clinical.store import FORMAT_VERSION
        from monitor.settings import Settings
        from monitor.topics_admin import changelog_topic, ensure_topics

        changelog = changelog_topic(Settings(_env_file=None, MONITOR_APP_ID=prefix))
        ensure_topics(Settings(_env_file=None, kafka_bootstrap_servers=kafka_bootstrap, MONITOR_APP_ID=prefix,
                               topic_observations=st.topics["observations"]), [changelog])
        all_topics.append(changelog)
        st.unreadable_patient = f"PROMPAT-{uuid.uuid4().hex[:12]}"
        newer = {"v": FORMAT_VERSION + 1, "patient": st.unreadable_patient, "layout": "of a newer release"}
        with KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all") as producer:
            producer.send(changelog, key=st.unreadable_patient.encode(), value=json.dumps(newer).encode())
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
        st.watcher = RuleWatcher(st.prom, [FORCED_RULE, LOGIN_RULE, UNREADABLE_RULE])
        st.watcher.start()
        yield st
    finally:
        if st.watcher is not None:
            st.watcher.stop()
        if st.prom is not None:
            st.prom.stop()
        for p in st.procs:
            _stop(p)
        if st.worker is not None:
            st.worker.stop_services()
        drop_test_topics(kafka_bootstrap, all_topics, [prefix, fe_prefix])




#: the fixture the scrape tests use; ``tests/conftest.py`` runs the tests that use it last
FIXTURE = "prometheus_stack"


class _Started:
    stack: Stack | None = None
    error: BaseException | None = None


def xdist_worker() -> str | None:
    """The pytest-xdist worker this process is (``gw0``, ``gw1``...), or None in a plain run."""
    return os.environ.get("PYTEST_XDIST_WORKER") or None


@pytest.fixture(scope="session", autouse=True)
def prometheus_stack_started_first(request, tmp_path_factory):
    """Starts the stack before the session's first test when a selected test uses
    ``prometheus_stack`` (nothing otherwise). A failure to start is kept for those tests
    and does not fail the others.

    Under pytest-xdist a worker does not know at its start which tests it will be sent, so
    there the stack starts at the first request of ``prometheus_stack`` instead, on the one
    worker that runs the scrape tests (a module goes to one worker whole, ``--dist loadfile``,
    and theirs is sent first: ``tests/conftest.py``); its minute of ``for:`` then passes while
    the other worker runs the rest of the suite."""
    started = _Started()
    if xdist_worker() or not any(FIXTURE in item.fixturenames for item in request.session.items):
        yield started
        return
    gen = None
    try:
        gen = build_stack(request.getfixturevalue("kafka_bootstrap"), tmp_path_factory.mktemp("prom"))
        started.stack = next(gen)
    except Exception as exc:  # noqa: BLE001 - reported by the tests that use the stack
        started.error = exc
    try:
        yield started
    finally:
        if gen is not None:
            gen.close()


@pytest.fixture(scope="session")
def prometheus_stack(prometheus_stack_started_first, kafka_bootstrap, tmp_path_factory) -> Iterator[Stack]:
    started = prometheus_stack_started_first
    if started.stack is None and started.error is None:
        # not started with the session (under pytest-xdist, see above): started now, on this
        # worker, and stopped at its end
        gen = build_stack(kafka_bootstrap, tmp_path_factory.mktemp("prom"))
        try:
            yield next(gen)
        finally:
            gen.close()
        return
    if started.stack is None:
        raise RuntimeError(f"the Prometheus stack did not start: {started.error!r}") from started.error
    yield started.stack
