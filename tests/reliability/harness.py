"""Shared machinery of the reliability suite: a cohort with ground truth (plus
deliberately invalid inputs), a publisher that remembers where every record landed,
a reader of the output topics, and the checks every scenario ends with.

Ground truth per input record is computed offline with the same pure decoder the worker
uses (``schemas.ingest.decode``): a valid record must yield its observation ids on
``observations``; an invalid one must land on ``dead-letter`` with a reason, its source
topic/partition/offset pointing back at it. Expected alerts come from the simulator's
design-derived truth (``Cohort.expected``), not from the engine.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from workers import SERVICE_TOPICS, WorkerProcess, stop_workers  # noqa: E402

from monitor.notify.sinks import DeliveryKey  # noqa: E402
from monitor.settings import INPUT_TOPICS as SETTINGS_INPUT_TOPICS  # noqa: E402
from monitor.topics_admin import topic_partitions  # noqa: E402
from schemas.findings import SEVERITY_RANK  # noqa: E402

ALL_TOPICS = tuple(SERVICE_TOPICS.values())
INPUT_TOPICS = tuple(SETTINGS_INPUT_TOPICS)
SEV_RANK = SEVERITY_RANK


def kills_default(ci: int = 3) -> int:
    return int(os.environ.get("RELIABILITY_KILLS", str(ci)))


# ----------------------------------------------------------------------------- inputs

def bad_inputs(pid: str, at: datetime) -> list[tuple[str, bytes]]:
    """Known-invalid records (short topic name, raw bytes), each carrying a patient id."""
    iso = at.isoformat()
    lab = {"event_id": f"bad-{pid}-x", "patient_id": pid, "loinc": "1742-6", "value": 30, "unit": "U/L",
           "reference_range": {"low": 0, "high": 40}, "effective_at": iso, "status": "final", "source": "lab-x"}
    deep: object = 1
    for _ in range(60):
        deep = [deep]
    out = [
        ("lab-results", b"\x00\xff\xfe not json " + pid.encode()),
        ("lab-results", b""),
        ("lab-results", json.dumps({**lab, "event_id": f"bad-{pid}-naive", "effective_at": "2025-01-01T08:00:00"}).encode()),
        ("lab-results", json.dumps({**lab, "event_id": f"bad-{pid}-loinc", "loinc": "99999-9"}).encode()),
        ("lab-results", json.dumps({**lab, "event_id": f"bad-{pid}-unit", "unit": "furlong"}).encode()),
        ("vital-signs", json.dumps({"patient_id": pid, "deep": deep}).encode()),
        ("vital-signs", b'{"patient_id": "' + pid.encode() + b'", "value": NaN'),
        ("liver-function", json.dumps({"resourceType": "Observation", "id": f"bad-{pid}", "status": "final",
                                       "code": {"coding": [{"system": "http://loinc.org", "code": "1742-6"}]},
                                       "effectiveDateTime": iso, "valueQuantity": {"value": 40, "unit": "U/L"}}).encode()),
        ("lab-results", f"MSH|^~\\&|LAB|X|||20250101||ORU^R01|c-{pid}|P|2.5\rPID|||{pid}\rOBX|1|NM|1742-6^ALT^LN||abc|U/L\r".encode()),
        ("treatments", json.dumps({"type": "dose", "event_id": f"bad-dose-{pid}", "patient_id": pid}).encode()),
        ("lab-results", b"x" * (1_048_576 + 10)),
    ]
    return out


@dataclass
class Sent:
    topic: str          # short name
    key: str
    raw: bytes
    observation_ids: tuple[str, ...] = ()
    reason: str | None = None     # dead-letter reason expected (None = valid)
    partition: int | None = None
    offset: int | None = None


@dataclass
class Scenario:
    """A cohort, its raw records (valid + invalid) and their offline classification."""

    cohort: object
    records: list[Sent]
    patient_ids: list[str]

    @property
    def expected_observations(self) -> set[str]:
        return {o for r in self.records for o in r.observation_ids}

    @property
    def sent_copies(self) -> Counter:
        """Observation id -> how many inputs carry it: a correction is sent with its
        original's id (a FHIR Observation ``corrected``, an HL7 re-sent result), so some
        ids come twice by design."""
        return Counter(o for r in self.records for o in r.observation_ids)

    @property
    def expected_dead_letters(self) -> dict[tuple[str, int, int], str]:
        return {(r.topic, r.partition, r.offset): r.reason for r in self.records if r.reason is not None}

    def expected_rules(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for pid, pairs in self.cohort.expected.items():
            for rule, sev in pairs:
                out.setdefault(pid, {})[rule] = sev
        return out


def build_scenario(n_patients: int, seed: int, days: int = 60, formats=("mixed",), invalid_every: int = 4,
                   id_prefix: str | None = None) -> Scenario:
    from monitor import simulate as sim
    from schemas.errors import Rejected
    from schemas.ingest import decode

    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    start = today - timedelta(days=days)
    cohort = sim.generate_cohort(n_patients, seed, start=start, days=days, formats=formats, id_prefix=id_prefix)
    now = datetime.now(timezone.utc)
    recs: list[Sent] = []
    for e, rec in zip(cohort.events, sim.records(cohort)):
        v = rec["value"]
        raw = v.encode() if isinstance(v, str) else json.dumps(v, separators=(",", ":")).encode()
        recs.append(Sent(e.topic, e.patient_id, raw))
    rng = random.Random(seed)
    pids = [p.patient_id for p in cohort.patients]
    for i, pid in enumerate(pids):
        if i % invalid_every == 0:
            for topic, raw in bad_inputs(pid, now - timedelta(days=1)):
                recs.insert(rng.randrange(len(recs) + 1), Sent(topic, pid, raw))
    for r in recs:
        try:
            decoded = decode(r.topic, r.raw, received_at=now)
            if isinstance(decoded, list):
                r.observation_ids = tuple(o.observation_id for o in decoded)
        except Rejected as rej:
            r.reason = rej.reason.value
    return Scenario(cohort, recs, pids)


def publish(bootstrap: str, topics: dict[str, str], records: Iterable[Sent], **client_cfg) -> None:
    """Publish records in order (acks=all); remember the partition/offset of each."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=4 * 1024 * 1024,
                      **client_cfg)
    try:
        futs = [(r, p.send(topics[r.topic], key=r.key.encode(), value=r.raw)) for r in records]
        p.flush(60)
        for r, f in futs:
            md = f.get(30)
            r.partition, r.offset = md.partition, md.offset
    finally:
        p.close(10)


# ----------------------------------------------------------------------------- outputs

@dataclass
class Outputs:
    observations: Counter = field(default_factory=Counter)          # observation_id -> copies
    alerts: list[dict] = field(default_factory=list)
    dead_letters: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)


class TopicReader:
    """Reads observations, alerts and dead-letter from the beginning; incremental."""

    def __init__(self, bootstrap: str, topics: dict[str, str], **client_cfg) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.topics = topics
        self.c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                               auto_offset_reset="earliest", max_partition_fetch_bytes=4 * 1024 * 1024,
                               fetch_max_bytes=16 * 1024 * 1024, **client_cfg)
        parts = []
        for short in ("observations", "alerts", "dead-letter"):
            for p in topic_partitions(self.c, topics[short]):
                parts.append(TopicPartition(topics[short], p))
        self.c.assign(parts)
        self.c.seek_to_beginning(*parts)
        self.out = Outputs()
        self._short = {topics[s]: s for s in ("observations", "alerts", "dead-letter")}

    def poll(self, rounds: int = 50) -> Outputs:
        for _ in range(rounds):
            batch = self.c.poll(timeout_ms=200, max_records=5000)
            if not batch:
                break
            for tp, msgs in batch.items():
                short = self._short[tp.topic]
                for m in msgs:
                    if short == "observations" and m.headers:
                        continue  # a treatment or action routed into the patient stream
                    self.out.counts[short] += 1
                    if short == "observations":
                        self.out.observations[json.loads(m.value)["observation_id"]] += 1
                    elif short == "alerts":
                        self.out.alerts.append(json.loads(m.value))
                    else:
                        h = {k: v.decode(errors="replace") for k, v in (m.headers or [])}
                        self.out.dead_letters.append({"headers": h, "value": m.value, "key": m.key})
        return self.out

    def drain(self, timeout: float = 60.0) -> Outputs:
        """``poll`` until every partition is read up to its end offset as it stands now."""
        parts = list(self.c.assignment())
        ends = self.c.end_offsets(parts)
        deadline = time.monotonic() + timeout
        while any(self.c.position(tp) < ends[tp] for tp in parts) and time.monotonic() < deadline:
            self.poll()
        return self.out

    def close(self) -> None:
        self.c.close()


# ----------------------------------------------------------------------------- checks

@dataclass
class Verdict:
    missing_observations: list[str]
    duplicated_observations: int
    missing_dead_letters: list[tuple]
    unaccounted_dead_letters: list[dict]
    wrong_reason: list[tuple]
    missing_alerts: list[tuple]
    missing_critical: list[tuple]
    missing_deliveries: list[str]
    duplicate_deliveries: list[str]
    conflicting_versions: int
    alert_versions: int
    deliveries: int

    @property
    def lost(self) -> int:
        return (len(self.missing_observations) + len(self.missing_dead_letters) + len(self.missing_alerts)
                + len(self.missing_deliveries))

    @property
    def duplicated(self) -> int:
        return len(self.duplicate_deliveries)

    @property
    def ok(self) -> bool:
        return self.ok_allowing(())

    def ok_allowing(self, in_flight_repeats) -> bool:
        """``ok``, except for repeats explained by a SIGKILL (see ``split_repeats``)."""
        return (self.lost == 0 and not set(self.duplicate_deliveries) - set(in_flight_repeats)
                and not self.unaccounted_dead_letters and not self.wrong_reason)

    def summary(self) -> dict:
        return {
            "missing_observations": len(self.missing_observations),
            "redelivered_observations(at-least-once)": self.duplicated_observations,
            "missing_dead_letters": len(self.missing_dead_letters),
            "unaccounted_dead_letters": len(self.unaccounted_dead_letters),
            "wrong_reason": len(self.wrong_reason),
            "missing_alerts": len(self.missing_alerts),
            "missing_critical": len(self.missing_critical),
            "missing_deliveries": len(self.missing_deliveries),
            "duplicate_deliveries": len(self.duplicate_deliveries),
            "conflicting_alert_versions": self.conflicting_versions,
            "alert_versions": self.alert_versions,
            "deliveries": self.deliveries,
        }

    def explain(self) -> str:
        return json.dumps({
            **self.summary(),
            "examples": {
                "missing_observations": self.missing_observations[:5],
                "missing_dead_letters": self.missing_dead_letters[:5],
                "unaccounted_dead_letters": [d["headers"] for d in self.unaccounted_dead_letters[:3]],
                "wrong_reason": self.wrong_reason[:5],
                "missing_alerts": self.missing_alerts[:8],
                "missing_deliveries": self.missing_deliveries[:5],
                "duplicate_deliveries": self.duplicate_deliveries[:5],
            }}, indent=1, default=str)


def paging_keys(alerts: list[dict]) -> set[str]:
    """alert_id:version of every version a paging sink must deliver."""
    out = set()
    for a in alerts:
        changed = a.get("previous_status") is not None and a.get("previous_status") != a.get("status")
        if a.get("notify") or changed:
            out.add(f"{a['alert_id']}:{a['version']}")
    return out


def verdict(sc: Scenario, out: Outputs, hook_keys: list[str] | None, topics: dict[str, str]) -> Verdict:
    exp_obs = sc.expected_observations
    missing_obs = sorted(exp_obs - set(out.observations))
    # written more often than sent: a replay after a crash (at least once); corrections,
    # sent with their original's id, are not counted
    sent = sc.sent_copies
    dup_obs = sum(n - sent[o] for o, n in out.observations.items() if n > sent[o])
    exp_dlq = sc.expected_dead_letters
    full_to_short = {v: k for k, v in topics.items()}
    seen_dlq: dict[tuple, str] = {}
    unaccounted, wrong = [], []
    for d in out.dead_letters:
        h = d["headers"]
        try:
            k = (full_to_short.get(h.get("dlq.source.topic"), "?"), int(h["dlq.source.partition"]),
                 int(h["dlq.source.offset"]))
        except (KeyError, ValueError):
            unaccounted.append(d)
            continue
        if k not in exp_dlq or not h.get("dlq.reason") or not h.get("dlq.message"):
            unaccounted.append(d)
            continue
        if h["dlq.reason"] != exp_dlq[k]:
            wrong.append((k, exp_dlq[k], h["dlq.reason"]))
        seen_dlq[k] = h["dlq.reason"]
    missing_dlq = sorted(set(exp_dlq) - set(seen_dlq))
    # alerts: every expected (patient, rule) at (at least) its severity in some version
    best: dict[tuple[str, str], int] = {}
    versions: dict[tuple[str, int], tuple] = {}
    conflicts = 0
    for a in out.alerts:
        k = (a["patient_id"], a["rule_id"])
        best[k] = max(best.get(k, -1), SEV_RANK.get(a.get("severity") or "critical", 3))
        vk = (a["alert_id"], a["version"])
        sig = (a.get("status"), a.get("severity"), a.get("escalation_tier"))
        if vk in versions and versions[vk] != sig:
            conflicts += 1
        versions.setdefault(vk, sig)
    missing_alerts, missing_crit = [], []
    for pid, rules in sc.expected_rules().items():
        for rule, sev in rules.items():
            if best.get((pid, rule), -1) < SEV_RANK[sev]:
                missing_alerts.append((pid, rule, sev, best.get((pid, rule))))
                if sev == "critical":
                    missing_crit.append((pid, rule))
    missing_del, dup_del = [], []
    if hook_keys is not None:
        must = paging_keys(out.alerts)
        missing_del = sorted(must - set(hook_keys))
        dup_del = sorted(k for k, n in Counter(hook_keys).items() if n > 1)
    return Verdict(missing_obs, dup_obs, missing_dlq, unaccounted, wrong, missing_alerts, missing_crit,
                   missing_del, dup_del, conflicts, len(versions), len(hook_keys or ()))


class LedgerReader:
    """The delivery ledger topic (``alert-deliveries``: ``sink|alert_id|version`` keys) as it
    stands on the broker; incremental. Read right after a SIGKILL (the worker is dead, so
    nothing more is written until the next one starts), it is exactly the ledger the next
    worker loads before it delivers anything."""

    def __init__(self, bootstrap: str, topic: str, **client_cfg) -> None:
        from kafka import KafkaConsumer, TopicPartition

        self.c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                               auto_offset_reset="earliest", **client_cfg)
        self.parts = [TopicPartition(topic, p) for p in sorted(topic_partitions(self.c, topic))]
        assert self.parts, f"no partitions for {topic}"
        self.c.assign(self.parts)
        self.c.seek_to_beginning(*self.parts)
        self.keys: set[str] = set()

    def snapshot(self, timeout: float = 30.0) -> frozenset[str]:
        """Every key on the topic up to its end offsets as of this call."""
        ends = self.c.end_offsets(self.parts)
        deadline = time.monotonic() + timeout
        while any(self.c.position(tp) < ends[tp] for tp in self.parts):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ledger not read to {ends} within {timeout}s")
            for msgs in self.c.poll(timeout_ms=200, max_records=5000).values():
                for m in msgs:
                    if m.key:
                        self.keys.add(m.key.decode())
        return frozenset(self.keys)

    def close(self) -> None:
        self.c.close()


def copy_times(copies: Iterable[tuple[str, float]]) -> dict[str, list[float]]:
    """Idempotency-Key -> wall times of its copies, in arrival order."""
    out: dict[str, list[float]] = {}
    for key, at in copies:
        out.setdefault(key, []).append(at)
    return out


def first_delivery_times(hook) -> dict[str, float]:
    """Idempotency-Key -> wall time of its first delivery to a ``WebhookReceiver``."""
    with hook.lock:
        times = copy_times((r["key"], r["at"]) for r in hook.received)
    return {k: ts[0] for k, ts in times.items()}


def ledger_key(idempotency_key: str, sink: str = "webhook") -> str:
    """The delivery ledger's key (``DeliveryKey.as_str``) of a delivery whose Idempotency-Key
    is ``alert_id:version``."""
    alert_id, version = idempotency_key.split(":", 1)
    return DeliveryKey(sink, alert_id, int(version)).as_str()


def counting_kill(first: float, second: float | None, kill_times: list[float]) -> int | None:
    """The SIGKILL that can explain a repeat whose copies came at ``first`` and ``second``:
    the last one before the second copy (the ledger its sender loaded) and after the first;
    without ``second``, the first SIGKILL after the first copy. None: no such SIGKILL."""
    if second is not None:
        return max((j for j, t in enumerate(kill_times) if first <= t < second), default=None)
    return next((j for j, t in enumerate(kill_times) if t >= first), None)


def split_repeats(v: Verdict, first_at: dict[str, float], kill_times: list[float],
                  ledger_at_kill: list[frozenset[str]] | None = None, sink: str = "webhook",
                  window: float = 2.0, second_at: dict[str, float] | None = None) -> tuple[list[str], list[str]]:
    """(in-flight repeats, unexplained repeats) of ``sink``'s deliveries (Idempotency-Key
    ``alert_id:version``).

    HTTP delivery after a SIGKILL is at least once. The worker writes a version's ledger
    record (``sink|alert_id|version`` on ``alert-deliveries``) only after the receiver
    answered, and the next worker skips exactly the versions on the ledger when it starts.
    So a repeat is explained, whatever the seconds between its first copy and the kill
    (the answer, the worker's event loop and the broker's acknowledgement all lie in
    between), when its first copy came before a SIGKILL and its ledger record was NOT on
    the broker right after that SIGKILL (``ledger_at_kill[i]``, read while no worker ran).
    With ``second_at`` (the time of each repeat's second copy) that SIGKILL is the last one
    before the second copy (the ledger its sender loaded) and must come after the first;
    without it, the first SIGKILL after the first copy. A repeat whose record was on the
    ledger when the next worker started, or with no SIGKILL between its copies, is a bug.

    Without ``ledger_at_kill`` (a caller that did not read the ledger at its kills) the
    approximation is a first copy within ``window`` seconds before a SIGKILL; it misjudges
    a repeat whose ledger write was held longer than that (a busy event loop or broker)."""
    if ledger_at_kill is None:
        explained = [k for k in v.duplicate_deliveries
                     if any(t - window <= first_at.get(k, float("-inf")) <= t for t in kill_times)]
        return explained, [k for k in v.duplicate_deliveries if k not in explained]
    assert len(ledger_at_kill) == len(kill_times)
    explained = []
    for k in v.duplicate_deliveries:
        first = first_at.get(k)
        if first is None:
            continue
        i = counting_kill(first, None if second_at is None else second_at.get(k, float("-inf")), kill_times)
        if i is not None and ledger_key(k, sink) not in ledger_at_kill[i]:
            explained.append(k)
    return explained, [k for k in v.duplicate_deliveries if k not in explained]


def wait_settled(bootstrap: str, app_id: str, topics: dict[str, str], delivery: bool, timeout: float = 120.0) -> None:
    """Wait until the worker(s) of ``app_id`` have committed everything now on their topics:
    ingest every input, the clinical stage the whole patient stream, and (with ``delivery``:
    a sink is configured) the outbox every alert version, which it commits past only once
    each sink has delivered it or skipped it as delivered. After that nothing now on the
    topics is processed or delivered again unless a worker dies: a late duplicate
    (observation, alert version, delivery) would already be there."""
    from workers import wait_delivered, wait_processed

    wait_processed(bootstrap, app_id, topics, timeout)
    if delivery:
        wait_delivered(bootstrap, app_id, topics["alerts"], timeout)


def wait_converged(sc: Scenario, reader: TopicReader, hook, topics: dict[str, str], timeout: float,
                   settle: float = 4.0, *, bootstrap: str | None = None, app_id: str | None = None) -> Verdict:
    """Poll until the outputs satisfy every check, then settle to catch late duplicates: with
    ``bootstrap`` and ``app_id`` until the workers have committed everything (``wait_settled``)
    and the outputs are read to their end offsets, else for ``settle`` seconds."""
    deadline = time.monotonic() + timeout
    v = None
    while time.monotonic() < deadline:
        out = reader.poll()
        v = verdict(sc, out, hook.keys() if hook else None, topics)
        if v.lost == 0 and not v.unaccounted_dead_letters:
            if bootstrap and app_id:
                wait_settled(bootstrap, app_id, topics, delivery=hook is not None,
                             timeout=max(30.0, deadline - time.monotonic()))
                out = reader.drain()
            else:
                time.sleep(settle)
                out = reader.poll()
            return verdict(sc, out, hook.keys() if hook else None, topics)
        time.sleep(1.0)
    return v or verdict(sc, reader.poll(), hook.keys() if hook else None, topics)


# ----------------------------------------------------------------------------- PHI

def find_identifiers(text: str, identifiers: Iterable[str]) -> list[tuple[str, str]]:
    hits = []
    ids = [i.lower() for i in identifiers]
    for line in text.splitlines():
        low = line.lower()
        for i in ids:
            if i in low:
                hits.append((i, line[:200]))
    return hits


def info_lines(log_text: str) -> str:
    """Lines of a worker log at INFO or above (faust/std logging formats); continuation
    lines (tracebacks) are kept with their record."""
    keep, cur = [], True
    for line in log_text.splitlines():
        if "[DEBUG]" in line or " DEBUG " in line[:80]:
            cur = False
        elif any(t in line for t in ("[INFO]", "[WARNING]", "[ERROR]", "[CRITICAL]", " INFO ", " WARNING ",
                                       " ERROR ", " CRITICAL ")):
            cur = True
        if cur:
            keep.append(line)
    return "\n".join(keep)


# ----------------------------------------------------------------------------- brokers & workers

class RestartableBroker:
    """Mix-in behaviour for tests.kafka_broker.Broker: stop and start again on the same
    ports and the same data dir (``Broker.stop`` deletes its temporary dir)."""

    @staticmethod
    def bounce(broker, down_seconds: float = 3.0) -> float:
        from kafka_broker import _pid_alive

        t0 = time.monotonic()
        proc = broker._kafka_sh("stop", timeout=90)
        if proc.returncode != 0:
            raise RuntimeError(f"kafka.sh stop failed: {proc.stderr}")
        assert broker.pid is None or not _pid_alive(broker.pid)
        time.sleep(down_seconds)
        proc = broker._kafka_sh("start", timeout=broker.start_timeout + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"kafka.sh restart failed: {proc.stderr}\n{broker.log_tail()}")
        broker.pid = broker._read_pid()
        return time.monotonic() - t0


def start_worker(bootstrap: str, env: dict[str, str], workdir: Path, registry: list, timeout: float = 120.0):
    wp = WorkerProcess(bootstrap, env, workdir)
    registry.append(wp)
    wp.start(timeout)
    return wp


@contextmanager
def worker_group(bootstrap: str, name: str, seed: int, id_prefix: str, hook, **extra: str):
    """What the tests with several workers of one app share: a unique app id (``name`` + a
    random suffix), its topics with 4 partitions, a small scenario
    (``RELIABILITY_PATIENTS_SMALL`` patients, default 20), the workers' environment (clock
    every 2 s, the webhook ``hook``; ``extra`` added) and the list the test's workers are
    started into. Yields (app id, topics, scenario, env, workers); at the end every worker
    is stopped (``stop_all``) and the topics are dropped."""
    import uuid

    from reliability.conftest import drop_topics, make_topics
    from workers import TEST_WEBHOOK_SECRET, service_env

    prefix = f"{name}{uuid.uuid4().hex[:8]}"
    workers: list = []
    topics = make_topics(bootstrap, prefix, partitions=4)
    try:
        sc = build_scenario(int(os.environ.get("RELIABILITY_PATIENTS_SMALL", "20")), seed, id_prefix=id_prefix)
        env = service_env(topics, app_id=prefix, TICK_INTERVAL_SECONDS="2", WEBHOOK_URL=hook.url,
                          WEBHOOK_SECRET=TEST_WEBHOOK_SECRET, TOPIC_PARTITIONS="4", **extra)
        yield prefix, topics, sc, env, workers
    finally:
        stop_all(workers)
        drop_topics(bootstrap, topics)


def start_workers(bootstrap: str, env: dict[str, str], workdirs: list[Path], registry: list,
                  timeout: float = 120.0) -> list:
    """Start several workers with the same environment at once (their start-ups overlap);
    return once every one is ready."""
    started = []
    for workdir in workdirs:
        wp = WorkerProcess(bootstrap, env, workdir)
        registry.append(wp)
        wp.launch()
        started.append(wp)
    for wp in started:
        wp.wait_ready(timeout)
    return started


def stop_all(workers: list) -> None:
    """Stop every worker: SIGTERM to all first (they shut down in parallel), then wait for
    each to exit (SIGKILL after 20 s). Each exit is awaited: the callers read the complete
    logs afterwards."""
    stop_workers(workers, wait_exit=True)


def worker_logs(workers: list) -> str:
    texts = []
    for wp in workers:
        try:
            texts.append(Path(wp.log_path).read_text(errors="replace"))
        except OSError:
            pass
    return "\n".join(texts)


def record_figure(name: str, value) -> None:
    """Append a figure for run_long.py (RELIABILITY_FIGURES names a JSON-lines file)."""
    path = os.environ.get("RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"name": name, "value": value}, default=str) + "\n")
