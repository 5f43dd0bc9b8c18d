"""Clinical scenarios through the real broker and a real worker (issue 3, "for a subset").

(a) Hy's law, TMA screen, platelets grade 3 and fever: dose + results published on the
    raw topics -> findings on ``findings`` and alerts on ``alerts`` with the right rule
    ids, severities, grades and evidence; a normal post-dose trajectory raises nothing above
    info.
(b) Overdue driven by the clock: a patient whose weekly liver tests stop; the liver
    deadline + grace passes a few seconds after the last publish, and ``schedule.overdue``
    appears with no further event (ticks every second). The missing sample resolves it.
(c) Replay: a second worker with a NEW app id (fresh state, fresh output topics) over the
    same input topics produces the same findings.
"""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kafka import KafkaConsumer, KafkaProducer
from kafka_broker import JsonTopicReader

from monitor.settings import INPUT_TOPICS, SERVICE_TOPICS
from schemas.findings import Severity
from workers import service_env, wait_for, wait_processed

pytestmark = pytest.mark.integration

INPUTS = tuple(INPUT_TOPICS)
OUTPUTS = tuple(t for t in SERVICE_TOPICS if t not in INPUT_TOPICS)
CLOCK_RULES = {"schedule.overdue", "monitoring.complete"}
SEV = {s.value: s.rank for s in Severity}

LOINC = {  # analyte: (LOINC, unit)
    "alt": ("1742-6", "U/L"), "ast": ("1920-8", "U/L"), "bilirubin_total": ("1975-2", "mg/dL"),
    "alp": ("6768-6", "U/L"), "platelets": ("777-3", "10*3/uL"), "ldh": ("2532-0", "U/L"),
    "hemoglobin": ("718-7", "g/dL"), "creatinine": ("2160-0", "mg/dL"), "troponin_i": ("10839-9", "ng/mL"),
    "temperature": ("8310-5", "Cel"), "heart_rate": ("8867-4", "/min"),
}


class Reader(JsonTopicReader):
    """Every JSON record of one topic, from the beginning."""

    def wait_for(self, pred, timeout: float = 90.0, describe=None) -> list[dict]:
        return super().wait_for(pred, timeout, describe)

    def sync(self, bootstrap: str, topic: str) -> list[dict]:
        """Every record of the topic, read to its end offsets (complete after ``wait_processed``)."""
        from kafka_broker import read_topic

        self.items = [json.loads(m.value) for m in read_topic(bootstrap, topic)]
        return self.items

    def close(self) -> None:
        self.c.close()


def send(bootstrap: str, records) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for topic, key, value in records:
        p.send(topic, key=key.encode(), value=json.dumps(value).encode())
    p.flush()
    p.close()


def dose(pid: str, at: datetime) -> dict:
    return {"type": "dose", "event_id": f"dose-{pid}", "patient_id": pid, "product": "onasemnogene-abeparvovec-iv",
            "administered_at": at.isoformat(), "birth_date": (at - timedelta(days=200)).date().isoformat(),
            "weight_kg": 7.5, "ward": "ward-a", "care_team": "team-a"}


def result(pid: str, eid: str, analyte: str, value: float, at: datetime, low=None, high=None) -> dict:
    loinc, unit = LOINC[analyte]
    d = {"event_id": eid, "patient_id": pid, "loinc": loinc, "value": value, "unit": unit,
         "effective_at": at.isoformat(), "source": "lab-x", "status": "final"}
    if low is not None or high is not None:
        d["reference_range"] = {"low": low, "high": high}
    return d


def scenario_records(topics: dict[str, str], now: datetime) -> tuple[list, dict]:
    """(records, expected) where expected maps patient -> (rule, severity, grade, evidence event ids)."""
    lab, vit, trt = topics["lab-results"], topics["vital-signs"], topics["treatments"]
    recs: list = []

    def R(pid, eid, analyte, value, at, low=None, high=None, topic=None):
        recs.append((topic or lab, pid, result(pid, eid, analyte, value, at, low, high)))

    # Hy's law: ALT >= 3x ULN and bilirubin > 2x ULN within 14 days, ALP < 2x ULN
    d = now - timedelta(days=6)
    recs.append((trt, "cb-hys", dose("cb-hys", d)))
    R("cb-hys", "hys-alt0", "alt", 30, d - timedelta(days=1), 0, 40)
    R("cb-hys", "hys-alt", "alt", 200, now - timedelta(days=3), 0, 40)
    R("cb-hys", "hys-bil", "bilirubin_total", 3.0, now - timedelta(days=2), 0, 1.2)
    R("cb-hys", "hys-alp", "alp", 300, now - timedelta(days=2), 0, 500)
    # TMA screen: platelets < 150 with LDH above ULN within 14 days
    d = now - timedelta(days=6)
    recs.append((trt, "cb-tma", dose("cb-tma", d)))
    R("cb-tma", "tma-plt0", "platelets", 320, d - timedelta(days=1), 150, 450)
    R("cb-tma", "tma-plt", "platelets", 120, now - timedelta(days=1), 150, 450)
    R("cb-tma", "tma-ldh", "ldh", 900, now - timedelta(days=1), 0, 600)
    # platelets CTCAE grade 3 (< 50 x10^9/L)
    d = now - timedelta(days=5)
    recs.append((trt, "cb-plt", dose("cb-plt", d)))
    R("cb-plt", "plt-3", "platelets", 40, now - timedelta(days=1), 150, 450)
    # fever grade 2 (> 39.0 C), a vital sign
    d = now - timedelta(days=2)
    recs.append((trt, "cb-fev", dose("cb-fev", d)))
    R("cb-fev", "fev-1", "temperature", 39.5, now - timedelta(days=1), topic=vit)
    # a normal post-dose trajectory (dosed 3 days ago: nothing is due yet)
    d = now - timedelta(days=3)
    recs.append((trt, "cb-norm", dose("cb-norm", d)))
    for i, (a, v, lo, hi) in enumerate([("alt", 30, 0, 40), ("ast", 40, 0, 60), ("platelets", 300, 150, 450),
                                        ("troponin_i", 0.01, 0, 0.04), ("creatinine", 0.25, 0.1, 0.4)]):
        R("cb-norm", f"norm-b{i}", a, v, d - timedelta(days=1), lo, hi)
        R("cb-norm", f"norm-p{i}", a, v * 1.1, now - timedelta(days=1), lo, hi)
    R("cb-norm", "norm-t", "temperature", 37.6, now - timedelta(days=2), topic=vit)
    R("cb-norm", "norm-hr", "heart_rate", 130, now - timedelta(days=2), topic=vit)
    expected = {
        "cb-hys": ("liver.hys_law", "critical", None, {"hys-alt", "hys-bil"}),
        "cb-tma": ("heme.tma_screen", "critical", None, {"tma-plt", "tma-ldh"}),
        "cb-plt": ("heme.platelets_decreased", "high", 3, {"plt-3"}),
        "cb-fev": ("vitals.fever", "warning", 2, {"fev-1"}),
    }
    return recs, expected


def _final(findings: list[dict], patients) -> dict:
    """(patient, rule, dedupe) -> the last finding, for observation-driven rules."""
    out = {}
    for f in findings:
        if f["patient_id"] in patients and f["rule_id"] not in CLOCK_RULES:
            out[(f["patient_id"], f["rule_id"], f.get("dedupe_key", ""))] = f
    return out


def test_clinical_scenarios_and_replay_through_the_broker(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"cln{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    worker_factory(service_env(topics, app_id=prefix), name="w1")
    now = datetime.now(timezone.utc)
    recs, expected = scenario_records(topics, now)
    patients = set(expected) | {"cb-norm"}
    send(kafka_bootstrap, recs)
    findings = Reader(kafka_bootstrap, topics["findings"])
    alerts = Reader(kafka_bootstrap, topics["alerts"])
    try:
        # (a) the expected finding and alert, per scenario
        for pid, (rule, sev, grade, ids) in expected.items():
            (f,) = findings.wait_for(lambda x: x["patient_id"] == pid and x["rule_id"] == rule
                                     and x["state"] == "present" and x["severity"] == sev)[:1]
            assert f["grade"] == grade
            got_ids = {e["observation_id"] for e in f["evidence"]}
            assert ids <= got_ids, (pid, got_ids)
            assert all(e["value"] is not None and e["unit"] for e in f["evidence"])
            assert f["protocol"]["id"] == "onasemnogene-abeparvovec-iv" and f["days_since_dose"] is not None
            assert f["text"]["action"]
            (a,) = alerts.wait_for(lambda x: x["patient_id"] == pid and x["rule_id"] == rule
                                   and x["status"] == "firing" and x["severity"] == sev)[:1]
            assert a["grade"] == grade and ids <= {e["observation_id"] for e in a["evidence"]}
        # the normal trajectory: every observation was evaluated, nothing above info (the
        # worker committed every input and the whole patient stream: all their outputs are there)
        wait_processed(kafka_bootstrap, prefix, topics)
        findings.sync(kafka_bootstrap, topics["findings"])
        alerts.sync(kafka_bootstrap, topics["alerts"])
        norm = [x for x in findings.items if x["patient_id"] == "cb-norm"]
        assert all(SEV[x["severity"]] == 0 for x in norm if x["state"] == "present"), norm
        assert not [x for x in alerts.items if x["patient_id"] == "cb-norm" and SEV[x["severity"]] > 0]
        # every pre-dose (baseline) result stayed silent: no evidence older than the dose
        for x in findings.items:
            if x["patient_id"] in patients and x["state"] == "present":
                assert x["days_since_dose"] >= 0
        first = _final(findings.items, patients)
        assert {(p, r) for p, (r, *_) in expected.items()} <= {(k[0], k[1]) for k in first}
        first_ids = {f["finding_id"] for f in findings.items
                     if f["patient_id"] in patients and f["rule_id"] not in CLOCK_RULES}
    finally:
        findings.close()
        alerts.close()

    # (c) replay: a second worker, NEW app id (fresh tables), same input topics, its own outputs
    prefix2 = f"rpl{uuid.uuid4().hex[:8]}"
    topics2 = {**topic_factory(*OUTPUTS, prefix=prefix2), **{k: topics[k] for k in INPUTS}}
    worker_factory(service_env(topics2, app_id=prefix2), name="w2")
    findings2 = Reader(kafka_bootstrap, topics2["findings"])
    try:
        deadline = time.monotonic() + 90
        second: dict = {}
        while time.monotonic() < deadline:
            second = _final(findings2.poll(), patients)
            if {k: v["finding_id"] for k, v in second.items()} == {k: v["finding_id"] for k, v in first.items()}:
                break
            time.sleep(0.5)
        wait_processed(kafka_bootstrap, prefix2, topics2)  # nothing more arrives afterwards
        second = _final(findings2.sync(kafka_bootstrap, topics2["findings"]), patients)
        # the final outcome per patient and rule is identical, ids included
        assert {k: v["finding_id"] for k, v in second.items()} == {k: v["finding_id"] for k, v in first.items()}
        assert {k: (v["state"], v["severity"], v["grade"]) for k, v in second.items()} == {
            k: (v["state"], v["severity"], v["grade"]) for k, v in first.items()}
        # and every finding id it produced was produced by the first worker. (Intermediate
        # findings can only differ when treatments and observations interleave differently
        # across the two topics; the final ones never do: arrival-order invariance.)
        second_ids = {f["finding_id"] for f in findings2.items
                      if f["patient_id"] in patients and f["rule_id"] not in CLOCK_RULES}
        assert second_ids <= first_ids | {v["finding_id"] for v in second.values()}
    finally:
        findings2.close()


def test_overdue_is_driven_by_the_clock_and_resolves_on_the_sample(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"ovd{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    w = worker_factory(service_env(topics, app_id=prefix, TICK_INTERVAL_SECONDS="1"))
    now = datetime.now(timezone.utc)
    pid = "cb-overdue"
    d0 = now - timedelta(days=20)
    # weekly liver tests on days 0.5, 6 and ~12, then nothing: the next is due 7 days + 24 h
    # grace after the last one. The last is placed so that deadline = publish time + 10 s (the
    # worker, already running, takes well under a second for these 13 records).
    lag = 10
    last = now - timedelta(days=8) + timedelta(seconds=lag)
    recs = [(topics["treatments"], pid, dose(pid, d0))]
    for i, at in enumerate([d0 - timedelta(days=1), d0 + timedelta(days=0.5), d0 + timedelta(days=6), last]):
        for a, v, hi in (("alt", 30, 40), ("ast", 40, 60), ("bilirubin_total", 0.4, 1.2)):
            recs.append((topics["lab-results"], pid,
                         result(pid, f"lft{i}-{a}", a, v, at, 0, hi)))
    send(kafka_bootstrap, recs)
    published = time.monotonic()
    deadline_wall = now + timedelta(seconds=lag)
    alerts = Reader(kafka_bootstrap, topics["alerts"])
    findings = Reader(kafka_bootstrap, topics["findings"])
    try:
        # the worker has seen the results well before the deadline: no liver overdue yet
        findings.wait_for(lambda x: x["patient_id"] == pid and x["rule_id"] == "schedule.overdue", timeout=60)
        assert not [x for x in findings.poll() if x["patient_id"] == pid and x.get("dedupe_key") == "liver"
                    and datetime.fromisoformat(x["evaluated_at"]) < deadline_wall]
        # ... then the clock alone raises it, with no further event published
        (a,) = alerts.wait_for(lambda x: x["patient_id"] == pid and x["rule_id"] == "schedule.overdue"
                               and x["dedupe_key"] == "liver" and x["status"] == "firing", timeout=lag + 60)[:1]
        assert time.monotonic() - published >= lag - 5
        assert a["severity"] == "warning"
        assert {e["analyte"] for e in a["evidence"]} == {"alt", "ast", "bilirubin_total"}
        (f,) = [x for x in findings.wait_for(lambda x: x["patient_id"] == pid and x.get("dedupe_key") == "liver"
                                             and x["state"] == "present")][:1]
        # driven by the clock: not before the deadline (the engine keeps times to the second)
        assert datetime.fromisoformat(f["evaluated_at"]) > deadline_wall - timedelta(seconds=1)
        # the missing sample arrives: the overdue liver alert resolves
        at = datetime.now(timezone.utc) - timedelta(minutes=5)
        send(kafka_bootstrap, [(topics["lab-results"], pid, result(pid, f"lft-late-{a_}", a_, v, at, 0, hi))
                               for a_, v, hi in (("alt", 30, 40), ("ast", 40, 60), ("bilirubin_total", 0.4, 1.2))])
        alerts.wait_for(lambda x: x["alert_id"] == a["alert_id"] and x["status"] == "resolved", timeout=60)
        findings.wait_for(lambda x: x["patient_id"] == pid and x.get("dedupe_key") == "liver" and x["state"] == "cleared")
    finally:
        alerts.close()
        findings.close()
    # operations see the clock at work (MonitorClinicalClockStalled): its interval, and passes
    # completed within the last few seconds, with none failed
    assert w.metric("monitor_clinical_clock_interval_seconds") == 1
    assert time.time() - w.metric("monitor_clinical_clock_last_run_timestamp_seconds") < 5
    first = w.metric("monitor_clinical_clock_last_run_timestamp_seconds")
    wait_for(lambda: w.metric("monitor_clinical_clock_last_run_timestamp_seconds") > first, 10, "the next pass")
    assert w.metric("monitor_clinical_clock_failures_total") == 0


# --------------------------------------------------------------------------------------
# The coalesced changelog checkpoint (monitor/clinical/runner.py): the changelog of all the
# batches acknowledged within CLINICAL_CHECKPOINT_INTERVAL_SECONDS is written once, then
# their offsets committed; idle input checkpoints at once; a crash between checkpoints
# replays those batches and no alert version reaches a sink twice.

class Durable:
    """What the clinical stage made durable: the group's committed offsets on the patient
    stream, then (read after them) the patients on the changelog, per partition."""

    def __init__(self, bootstrap: str, topics: dict[str, str], prefix: str) -> None:
        from kafka import TopicPartition

        self.group = KafkaConsumer(bootstrap_servers=bootstrap, group_id=f"{prefix}-clinical",
                                   enable_auto_commit=False)
        self.obs_tps = [TopicPartition(topics["observations"], p) for p in range(3)]
        self.cl_tps = [TopicPartition(f"{prefix}-patients-changelog", p) for p in range(3)]
        self.cl = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        self.cl.assign(self.cl_tps)
        self.cl.seek_to_beginning()
        self.obs = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
        self.obs.assign(self.obs_tps)
        self.obs.seek_to_beginning()
        self.on_changelog: dict[int, set[str]] = {p: set() for p in range(3)}
        self.writes: dict[str, int] = {}  # patient -> changelog records
        self.keys_at: dict[int, list[str]] = {p: [] for p in range(3)}  # stream partition -> key per offset

    def committed(self) -> dict[int, int]:
        return {tp.partition: self.group.committed(tp) or 0 for tp in self.obs_tps}

    def stream_ends(self) -> dict[int, int]:
        return {tp.partition: off for tp, off in self.obs.end_offsets(self.obs_tps).items()}

    def _read(self, consumer, upto: dict, on_record) -> None:
        deadline = time.monotonic() + 30
        while any(consumer.position(tp) < upto[tp] for tp in upto):
            assert time.monotonic() < deadline, "could not read up to the end"
            for tp, recs in consumer.poll(timeout_ms=200).items():
                for r in recs:
                    on_record(tp.partition, r)

    def read_changelog(self) -> None:
        def on(p, r):
            pid = r.key.decode()
            self.on_changelog[p].add(pid)
            self.writes[pid] = self.writes.get(pid, 0) + 1
        self._read(self.cl, self.cl.end_offsets(self.cl_tps), on)

    def check(self) -> dict[int, int]:
        """Committed offsets, after checking that every record below them has its patient on
        the changelog (the commit never runs ahead of the changelog)."""
        committed = self.committed()
        self.read_changelog()
        self._read(self.obs, {tp: committed[tp.partition] for tp in self.obs_tps},
                   lambda p, r: self.keys_at[p].append(r.key.decode()))
        for p, off in committed.items():
            missing = set(self.keys_at[p][:off]) - self.on_changelog[p]
            assert not missing, f"partition {p} committed to {off} without the changelog of {sorted(missing)[:5]}"
        return committed

    def close(self) -> None:
        for c in (self.group, self.cl, self.obs):
            c.close()


def _send_steadily(bootstrap: str, make, stop, every: float) -> int:
    """Send ``make(i)`` -> [(topic, key, value)] every ``every`` seconds until ``stop(i)``."""
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    i = 0
    try:
        while not stop(i):
            for topic, key, value in make(i):
                p.send(topic, key=key.encode(), value=json.dumps(value).encode())
            p.flush()
            i += 1
            time.sleep(every)
    finally:
        p.close()
    return i


def test_the_changelog_is_written_per_checkpoint_and_idle_input_checkpoints_at_once(kafka_bootstrap, topic_factory,
                                                                                    worker_factory):
    import threading

    prefix = f"ckp{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    w = worker_factory(service_env(topics, app_id=prefix, CLINICAL_CHECKPOINT_INTERVAL_SECONDS="1.5",
                                   TICK_INTERVAL_SECONDS="3600"))
    now = datetime.now(timezone.utc)
    lab, trt = topics["lab-results"], topics["treatments"]
    hot, n = "ck-hot", 100
    send(kafka_bootstrap, [(trt, hot, dose(hot, now - timedelta(days=5)))])
    durable = Durable(kafka_bootstrap, topics, prefix)
    try:
        # (1) input flowing for ~4 s: a result of one patient and a dose of a new one every 40 ms
        def make(i):
            at_ = now - timedelta(hours=n - i)
            return [(lab, hot, result(hot, f"hot-{i}", "platelets", 300 + i % 7, at_, 150, 450)),
                    (trt, f"ck-{i}", dose(f"ck-{i}", now - timedelta(days=1)))]

        sender = threading.Thread(target=_send_steadily, args=(kafka_bootstrap, make, lambda i: i >= n, 0.04))
        sender.start()
        seen = []
        while sender.is_alive():
            seen.append(sum(durable.check().values()))  # asserts the commit never runs ahead
            time.sleep(0.2)
        sender.join()
        # committed while the input was still flowing (the interval), not only at the end
        assert len({c for c in seen if c > 0}) >= 2, seen
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and durable.check() != durable.stream_ends():
            time.sleep(0.2)
        assert durable.check() == durable.stream_ends()
        batches = w.metric("monitor_processing_seconds_count", stage="clinical_batch")
        hot_writes = durable.writes.get(hot, 0)
        print(f"\n{batches:.0f} clinical batches, {n} results of one patient, its changelog written {hot_writes} times")
        assert all(f"ck-{i}" in durable.on_changelog[p] or f"ck-{i}" not in durable.keys_at[p]
                   for i in range(n) for p in range(3))
        assert batches >= n / 2 and 1 <= hot_writes < batches / 4, (batches, hot_writes)

        # (2) one more record after the input went quiet: checkpointed at once, not after the
        # interval (the next batch that would find it due never comes; the clock is off)
        send(kafka_bootstrap, [(trt, "ck-idle", dose("ck-idle", now - timedelta(days=1)))])
        sent = time.monotonic()
        deadline = sent + 30
        while time.monotonic() < deadline:
            durable.read_changelog()
            if any("ck-idle" in v for v in durable.on_changelog.values()) and \
                    durable.committed() == durable.stream_ends():
                break
            time.sleep(0.05)
        took = time.monotonic() - sent
        print(f"idle input: group lag 0 and the changelog written {took:.2f} s after the last record was sent")
        assert durable.check() == durable.stream_ends()
        assert any("ck-idle" in v for v in durable.on_changelog.values())
        assert took < 5.0, took  # the interval alone would never have written it
    finally:
        durable.close()


def test_a_worker_killed_between_checkpoints_replays_without_a_repeat_reaching_a_sink(kafka_bootstrap, topic_factory,
                                                                                       worker_factory):
    import threading

    from receivers import WebhookReceiver
    from schemas.alert import Alert
    from workers import TEST_WEBHOOK_SECRET, wait_delivered

    prefix = f"ckk{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    now = datetime.now(timezone.utc)
    lab, trt = topics["lab-results"], topics["treatments"]
    with WebhookReceiver(secret=TEST_WEBHOOK_SECRET) as hook:
        # session timeout 6 s (the broker's group.min.session.timeout.ms, not the 10 s default):
        # the restarted worker gets the SIGKILLed one's partitions 4 s sooner
        env = service_env(topics, app_id=prefix, CLINICAL_CHECKPOINT_INTERVAL_SECONDS="3600",
                          TICK_INTERVAL_SECONDS="3600", WEBHOOK_URL=hook.url, WEBHOOK_SECRET=TEST_WEBHOOK_SECRET,
                          KAFKA_SESSION_TIMEOUT_SECONDS="6")
        w = worker_factory(env, name="w0")
        send(kafka_bootstrap, [(trt, "ck-fill", dose("ck-fill", now - timedelta(days=5)))])
        durable = Durable(kafka_bootstrap, topics, prefix)
        alerts = Reader(kafka_bootstrap, topics["alerts"])
        try:
            # The premise: the worker is killed while the test's patients are processed but not
            # checkpointed. The interval is an hour and the input never goes quiet (one result
            # every 20 ms), but the clinical stage also checkpoints after any 100 ms without
            # input, which a stall of the filler or the broker can cause. An attempt whose
            # patients reached the changelog before the SIGKILL cannot test the replay: it is
            # repeated with new patients (at most 3 attempts; the no-repeat checks below cover
            # every attempt's pages).
            replayed: list = []
            checkpointed: set = set()
            for attempt in range(3):
                patients = [f"ck{attempt}-a{i}" for i in range(3)]
                stop_filler = threading.Event()
                filler = threading.Thread(target=_send_steadily, args=(
                    kafka_bootstrap,
                    lambda i, b=attempt * 100_000: [(lab, "ck-fill", result(
                        "ck-fill", f"fill-{b + i}", "platelets", 300, now - timedelta(minutes=(b + i) % 5000), 150, 450))],
                    lambda i, stop=stop_filler: stop.is_set(), 0.02), daemon=True)
                filler.start()
                try:
                    time.sleep(3)
                    recs = []
                    for pid in patients:
                        d = now - timedelta(days=5)
                        recs += [(trt, pid, dose(pid, d)),
                                 (lab, pid, result(pid, f"{pid}-0", "platelets", 320, d - timedelta(days=1), 150, 450)),
                                 (lab, pid, result(pid, f"{pid}-1", "platelets", 40, now - timedelta(days=1), 150, 450))]
                    send(kafka_bootstrap, recs)
                    first = [a for a in alerts.wait_for(lambda x: x["patient_id"] in patients
                                                        and x["rule_id"] == "heme.platelets_decreased", timeout=60)]
                    shown = [Alert.model_validate(a) for a in alerts.poll() if a["patient_id"] in patients]
                    pages = {a.idempotency_key for a in shown if a.notify or a.status_changed}
                    assert len({a["patient_id"] for a in first}) == 3 and pages
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline and not pages <= set(hook.keys()):
                        time.sleep(0.2)
                    assert pages <= set(hook.keys()), (pages, hook.keys())
                    time.sleep(2)  # the delivery ledger records them
                    committed = durable.check()
                    w.kill()
                finally:
                    stop_filler.set()
                    filler.join(10)
                # between checkpoints (checked after the SIGKILL: nothing is written now): the
                # outputs are on the broker, the state is not
                durable.read_changelog()
                checkpointed = set(patients) & {pid for v in durable.on_changelog.values() for pid in v}
                w = worker_factory(env, name=f"w{attempt + 1}")
                if checkpointed:
                    print(f"\nattempt {attempt}: a checkpoint was taken before the SIGKILL; again with new patients")
                    continue
                # the replay re-emits the same versions (same alert_id:version) on the alerts topic
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline:
                    keys = [Alert.model_validate(a).idempotency_key for a in alerts.poll()
                            if a["patient_id"] in patients]
                    replayed = [k for k in set(keys) if keys.count(k) > 1]
                    if replayed and durable.check() == durable.stream_ends():
                        break
                    time.sleep(0.5)
                break
            assert not checkpointed, "every attempt's patients were checkpointed before the SIGKILL"
            assert replayed, "the uncheckpointed batches were not processed again"
            # the replay rebuilt the state: the next result updates the same alerts
            send(kafka_bootstrap, [(lab, pid, result(pid, f"{pid}-2", "platelets", 30, now, 150, 450))
                                   for pid in patients])
            opened = {a["patient_id"]: a["alert_id"] for a in first}
            for pid in patients:
                (later,) = alerts.wait_for(lambda x: x["patient_id"] == pid and f"{pid}-2" in {
                    e["observation_id"] for e in x["evidence"]}, timeout=60)[:1]
                # the same alert, a later version: not a second alert opened on a lost state
                assert later["alert_id"] == opened[pid] and later["version"] > 1, later
            # late repeats, if any, arrive: the outbox has handled (delivered, or skipped as
            # delivered) every version on the alerts topic, the replayed ones included
            wait_delivered(kafka_bootstrap, prefix, topics["alerts"])
            all_alerts = [Alert.model_validate(a) for a in alerts.poll() if a["patient_id"].startswith("ck")
                          and a["patient_id"] != "ck-fill"]
            pages = {a.idempotency_key for a in all_alerts if a.notify or a.status_changed}
            keys = hook.keys()
            print(f"\nkilled with committed {committed}; {len(replayed)} versions re-emitted by the replay; "
                  f"{len(keys)} webhook deliveries, {len(set(keys))} distinct")
            assert pages <= set(keys), pages - set(keys)
            assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
            assert w.proc.poll() is None
        finally:
            durable.close()
            alerts.close()
