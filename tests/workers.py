"""Run the real ``monitor worker`` as a subprocess for integration tests."""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitor.settings import SERVICE_TOPICS as _SETTINGS_TOPICS  # noqa: E402

#: environment variable -> default topic name, from the service's one list of topics
SERVICE_TOPICS = {field.upper(): short for short, field in _SETTINGS_TOPICS.items()}


def raw_dose(pid: str, at) -> dict:
    """A JSON dose record for the treatments topic (IV product, a 200-day-old infant)."""
    from datetime import timedelta

    return {"type": "dose", "event_id": f"dose-{pid}", "patient_id": pid, "product": "onasemnogene-abeparvovec-iv",
            "administered_at": at.isoformat(), "birth_date": (at - timedelta(days=200)).date().isoformat(),
            "weight_kg": 7.5, "ward": "ward-a", "care_team": "team-a"}


def raw_alt(pid: str, eid: str, value: float, at, source: str) -> dict:
    """A JSON ALT result (U/L, reference 0-40) for the lab-results topic."""
    return {"event_id": eid, "patient_id": pid, "loinc": "1742-6", "value": value, "unit": "U/L",
            "reference_range": {"low": 0, "high": 40}, "effective_at": at.isoformat(), "source": source,
            "status": "final"}


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` in an exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(smp.value for fam in text_string_to_metric_families(text) for smp in fam.samples
               if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()))


def wait_for(fn, timeout: float, what: str, interval: float = 0.25):
    """``fn()`` until it returns something true (returned); an AssertionError naming ``what``
    and the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last={last!r}")


def log_tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a process's log file ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: secrets the tests pass explicitly (the service has no defaults: it refuses to start without them)
TEST_PSEUDONYM_SECRET = "test-pseudonym-5b0c1e2f9a7d4c3b8e6f1a2d3c4b5a69"
TEST_WEBHOOK_SECRET = "test-webhook-8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a"
TEST_INBOX_SECRET = "test-inbox-1f2e3d4c5b6a79880a1b2c3d4e5f6a7b8c"


def runner_settings(bootstrap: str, prefix: str, topic_factory, partitions: int = 3):
    """Settings and topics of a clinical runner run in the test's own process (its stream,
    outputs and changelog; a checkpoint 0.2 s after a batch)."""
    from monitor.settings import Settings

    topics = topic_factory("observations", "findings", "alerts", "dead-letter", "patients-changelog",
                           partitions=partitions, prefix=prefix)
    s = Settings(_env_file=None, kafka_bootstrap_servers=bootstrap, MONITOR_APP_ID=prefix,
                 topic_observations=topics["observations"], topic_findings=topics["findings"],
                 topic_alerts=topics["alerts"], topic_dead_letter=topics["dead-letter"],
                 topic_patient_changelog=topics["patients-changelog"],
                 clinical_checkpoint_interval_seconds=0.2)
    return s, topics


async def until(task, condition, what: str, seconds: float = 60, poll: float = 0.05) -> None:
    """Wait in a runner test until ``condition()`` holds; fail if ``task`` (the runner's
    ``run()``) ended or ``seconds`` passed first."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert not task.done(), task.exception()
        assert loop.time() < deadline, f"{what} not within {seconds} s"
        await asyncio.sleep(poll)


def runner_processor(s, store, clock_settle_seconds: float = 3600):
    """A runner test's clinical processor: the shipped protocols, ``s``'s lifecycle settings and
    output topics, and ``store``."""
    from alerts.engine import Engine
    from alerts.protocol import default_protocols
    from monitor.clinical.processor import ClinicalProcessor
    from monitor.worker import lifecycle_config

    protocols = default_protocols()
    return ClinicalProcessor(Engine(protocols), lifecycle_config(protocols, s), store,
                             findings_topic=s.topic_findings, alerts_topic=s.topic_alerts,
                             dead_letter_topic=s.topic_dead_letter, clock_settle_seconds=clock_settle_seconds)


def durable_to(runner, store, tp, n: int) -> bool:
    """A runner test's end: the stream committed to offset ``n`` with nothing pending, marked,
    being encoded or being written."""
    return (runner.positions.committed.get(tp) == n and not runner.pending and runner._collecting is None
            and not store.changed_count() and runner._persist_task is None)


async def stop_runner(runner, task) -> None:
    """Stop a runner test's runner and its ``run()`` task."""
    import asyncio

    await runner.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def service_env(topics: dict[str, str], app_id: str, **extra: str) -> dict[str, str]:
    """Environment naming the test's topics (``topics`` maps short name -> real name) and
    the secrets the worker needs (``PSEUDONYM_SECRET``; override through ``extra``)."""
    env = {var: topics[short] for var, short in SERVICE_TOPICS.items() if short in topics}
    env["MONITOR_APP_ID"] = app_id
    env["PSEUDONYM_SECRET"] = TEST_PSEUDONYM_SECRET
    env.update(extra)
    return env


def wait_committed(bootstrap: str, group: str, topics: list[str], timeout: float = 60.0) -> None:
    """Wait until consumer ``group`` has committed every record of ``topics`` (as their end
    offsets stand on each check)."""
    from kafka import KafkaConsumer, TopicPartition

    from monitor.topics_admin import topic_partitions

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in sorted(topic_partitions(consumer, t))]
        deadline = time.monotonic() + timeout
        while True:
            ends = consumer.end_offsets(tps)
            committed = {tp: consumer.committed(tp) or 0 for tp in tps}
            if all(committed[tp] >= ends[tp] for tp in tps):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{group} not caught up after {timeout}s: {committed} < {ends}")
            time.sleep(0.2)
    finally:
        consumer.close()


def wait_ingested(bootstrap: str, app_id: str, topics: list[str], timeout: float = 60.0) -> None:
    """Wait until the worker's ingest consumer group (``<app id>-ingest``) has committed every
    record of the input ``topics``. Ingest commits a batch only once its outputs (the
    observations stream, dead letters) are acknowledged, so from then on those topics hold
    everything these inputs produce."""
    wait_committed(bootstrap, f"{app_id}-ingest", topics, timeout)


def wait_processed(bootstrap: str, app_id: str, topics: dict[str, str], timeout: float = 60.0) -> None:
    """``wait_ingested`` for the inputs of ``topics`` (short name -> real name), then until the
    clinical stage (``<app id>-clinical``) has committed the whole patient stream: it commits
    a batch only once its outputs (findings, alerts, dead letters of routed treatments and
    actions) are acknowledged. Clock ticks may still add outputs later."""
    from monitor.settings import INPUT_TOPICS

    wait_ingested(bootstrap, app_id, [topics[t] for t in INPUT_TOPICS if t in topics], timeout)
    wait_committed(bootstrap, f"{app_id}-clinical", [topics["observations"]], timeout)


def wait_delivered(bootstrap: str, app_id: str, alerts_topic: str, timeout: float = 60.0) -> None:
    """Wait until the worker's delivery consumer group (``<app id>-delivery``) has committed
    every alert version on ``alerts_topic`` (as its end offsets stand on each check). The
    outbox commits past a version only once every sink has delivered it (the receiver has
    it) or skipped it as already delivered (monitor/notify/outbox.py ``committable``): from
    then on no version now on the topic can reach a sink again, unless a worker dies."""
    wait_committed(bootstrap, f"{app_id}-delivery", [alerts_topic], timeout)


class WorkerProcess:
    def __init__(self, bootstrap: str, env: dict[str, str], workdir: Path) -> None:
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.port = int(env.get("WEB_PORT") or free_port())
        self.env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "WEB_PORT": str(self.port),
                    "WEB_HOST": "127.0.0.1", "DATA_DIR": str(workdir / "data"), **env}
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "worker.log"

    def start(self, timeout: float = 90.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the process without waiting for it to be ready (``wait_ready``)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor.cli", "worker"], cwd=ROOT, env=self.env,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metric(self, name: str, **labels: str) -> float:
        """``name`` on this worker's ``/metrics`` now (the sum over series with ``labels``)."""
        status, body = self.get("/metrics")
        assert status == 200, status
        return metric(body.decode(), name, **labels)

    def wait_logged(self, text: bytes, timeout: float = 60.0) -> None:
        """Wait until the worker's log holds ``text``; an AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_bytes():
            assert time.monotonic() < deadline, f"{text!r} not logged within {timeout}s:\n{self.tail()}"
            time.sleep(0.1)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status, _ = self.get("/readyz", timeout=2)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return log_tail(self.log_path, n)

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait until the process has exited (SIGKILL after 20 s)."""
        if self.proc and self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def terminate(self) -> None:
        """Send SIGTERM (the start of ``stop``) without waiting."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop_services(self, timeout: float = 20.0) -> None:
        """A teardown's stop: SIGTERM, then wait until the worker has stopped every service
        (``SERVICES_STOPPED`` logged: its consumers left their groups, its producers are
        flushed and closed, its web server is closed) or has exited. What remains after
        that line is mode's fixed one-second sentinel sleep before the event loop closes;
        that exit is awaited in the background (``reap_stopping``, at the latest when the
        test session ends, SIGKILL after ``timeout``), not by the test. Without the line
        (another log level or format) it waits for the exit, as ``stop`` does."""
        if self.proc is None or self.proc.poll() is not None:
            self.stop()
            return
        self.terminate()
        deadline = time.monotonic() + timeout
        offset = 0
        while self.proc.poll() is None and time.monotonic() < deadline:
            try:
                with open(self.log_path, "rb") as fh:
                    fh.seek(max(0, offset - len(SERVICES_STOPPED)))
                    chunk = fh.read()
                    offset = fh.tell()
            except OSError:
                chunk = b""
            if SERVICES_STOPPED in chunk:
                _reap_in_background(self, deadline)
                return
            time.sleep(0.05)
        self.stop()  # exited (or timed out: killed)


#: mode's Worker logs this once every service has stopped, just before its fixed 1 s
#: sentinel sleep and the loop's close (mode/worker.py ``_shutdown_loop``)
SERVICES_STOPPED = b"Gathering all futures"

_reapers: list[threading.Thread] = []


def _reap_in_background(wp: "WorkerProcess", deadline: float) -> None:
    def reap() -> None:
        try:
            wp.proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            wp.kill()
        if getattr(wp, "_log", None):
            wp._log.close()

    t = threading.Thread(target=reap, name=f"reap-worker-{wp.proc.pid}", daemon=True)
    t.start()
    _reapers.append(t)


def reap_stopping(timeout: float = 30.0) -> None:
    """Wait for every worker ``stop_services`` left exiting in the background."""
    deadline = time.monotonic() + timeout
    while _reapers:
        _reapers.pop().join(max(0.1, deadline - time.monotonic()))


atexit.register(reap_stopping)


def stop_workers(workers, wait_exit: bool = False) -> None:
    """A teardown's stop of several workers: SIGTERM to all first (they shut down in
    parallel), then ``stop_services`` each (with ``wait_exit``: ``stop``, which also waits
    for the process to exit, for callers that read the complete logs afterwards); anything
    that goes wrong ends in a SIGKILL."""
    for wp in workers:
        try:
            wp.terminate()
        except Exception:
            pass
    for wp in workers:
        try:
            if wait_exit:
                wp.stop()
            else:
                wp.stop_services()
        except Exception:
            try:
                wp.kill()
            except Exception:
                pass
