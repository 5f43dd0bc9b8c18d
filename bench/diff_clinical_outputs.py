"""Write every output of the clinical processor, byte for byte, to one file (a differential
check: run it with two trees and compare the files; a speed change must not move a byte).

Run (from the root of the tree to check, with any tree's interpreter; the code under test
is imported from the CURRENT DIRECTORY, so one copy of this script can check another tree):
    cd /path/to/tree && /path/to/.venv/bin/python /path/to/bench/diff_clinical_outputs.py --out /tmp/a.bin

Two workloads, both on a fixed clock (no wall time, no hash randomisation: the same tree
writes the same file every time):

(a) a simulated cohort (``monitor.simulate.generate_cohort``, mixed formats) turned into
    the records of the patient stream by the worker's own ingest step
    (``monitor.ingest.Ingest.record``), processed in batches at each batch's arrival time,
    with clock ticks (``ClinicalProcessor.tick``) over every patient after every few
    batches and at several times after the last record (escalations, silence expiry,
    pruning), plus actions sent on some of the alerts (acknowledge, note, escalate,
    silence, resolve; some refused);
(b) the alert-churn workload of ``bench_clinical.churn`` (every result changes an alert),
    with ticks and actions between the rounds.

Written, in order: every output (topic, key, headers, value) of ``process`` and ``tick``
and every changelog value ``store.take_changed`` returns (after every batch and every
tick). Prints the counts and the file's sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zlib
from collections import namedtuple
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the tree under test: the current directory

from alerts.engine import Engine  # noqa: E402
from alerts.protocol import default_protocols  # noqa: E402
from monitor import simulate as sim  # noqa: E402
from monitor.actions_auth import ActionAuthority  # noqa: E402
from monitor.clinical.processor import ClinicalProcessor  # noqa: E402
from monitor.clinical.store import InMemoryPatientStore  # noqa: E402
from monitor.inbox.auth import User, UserDirectory  # noqa: E402
from monitor.ingest import Ingest  # noqa: E402
from monitor.settings import Settings  # noqa: E402
from monitor.worker import lifecycle_config  # noqa: E402
from schemas.alert import Role  # noqa: E402

Rec = namedtuple("Rec", "topic partition offset key value headers")
PARTITIONS = 6
NOW = datetime(2026, 6, 1, 8, 0, tzinfo=timezone.utc)
USERS = UserDirectory([User("nurse1", Role.NURSE, "x"), User("doc1", Role.PHYSICIAN, "x"),
                       User("admin1", Role.ADMIN, "x")])


class Run:
    def __init__(self, out) -> None:
        self.s = Settings()
        self.step = Ingest(self.s)
        protocols = default_protocols()
        self.store = InMemoryPatientStore()
        self.mono = [0.0]
        self.proc = ClinicalProcessor(Engine(protocols, id_key=b"diff-key"), lifecycle_config(protocols, self.s),
                                      self.store, findings_topic="findings", alerts_topic="alerts",
                                      dead_letter_topic="dead-letter", monotonic=lambda: self.mono[0],
                                      authority=ActionAuthority(USERS))
        self.fh = out
        self.offset = 0
        self.n_records = self.n_outputs = self.n_changelog = 0
        self.alerts: dict[str, dict] = {}  # newest version of every alert seen
        self.counts: dict[str, int] = {}

    def recs(self, topic: str, key: str, value, at: datetime) -> list[Rec]:
        raw = value.encode() if isinstance(value, str) else json.dumps(value, separators=(",", ":")).encode()
        out = []
        for t, k, v, headers in self.step.record(topic, 0, self.offset, key.encode(), raw, at):
            if t == self.s.topic_observations:
                out.append(Rec(t, zlib.crc32(k) % PARTITIONS, self.offset, k, v, headers))
            self.offset += 1
        return out

    def _write(self, tag: bytes, *parts: bytes) -> None:
        self.fh.write(tag + b"".join(b"%d:" % len(p) + p for p in parts) + b"\n")

    def outputs(self, out) -> None:
        for o in out:
            self.n_outputs += 1
            self.counts[o.topic] = self.counts.get(o.topic, 0) + 1
            self._write(b"O", o.topic.encode(), o.key or b"", repr(o.headers).encode(), o.value)
            if o.topic == "alerts":
                a = json.loads(o.value)
                self.alerts[a["alert_id"]] = a
        for pid, partition, value in self.store.take_changed():
            self.n_changelog += 1
            self._write(b"C", pid.encode(), b"%d" % partition, value)

    def process(self, recs: list[Rec], now: datetime) -> None:
        self.n_records += len(recs)
        self.outputs(self.proc.process(recs, now))

    def tick(self, now: datetime) -> None:
        self.mono[0] += 3600.0  # every patient settled (the clock skips none by arrival)
        self.outputs(self.proc.tick(self.store.patient_ids(range(PARTITIONS)), now))

    def act(self, now: datetime, salt: int) -> None:
        """Actions on some of the open alerts (chosen by a hash of their id)."""
        recs = []
        for aid, a in sorted(self.alerts.items()):
            if a["status"] not in ("firing", "acknowledged"):
                continue
            h = zlib.crc32(f"{aid}/{salt}".encode()) % 23
            base = {"alert_id": aid, "patient_id": a["patient_id"], "at": now.isoformat(),
                    "action_id": f"act-{aid[:8]}-{salt}"}
            if h == 0:
                act = {"action": "acknowledge", "by": "nurse1", **base}
            elif h == 1:
                act = {"action": "note", "by": "doc1", "reason": "seen on the ward round", **base}
            elif h == 2:
                act = {"action": "escalate", "by": "nurse1", "reason": "worried", **base}
            elif h == 3:
                act = {"action": "silence", "by": "admin1", "reason": "known, being treated",
                       "until": (now + timedelta(hours=20)).isoformat(), **base}
            elif h == 4:
                act = {"action": "resolve", "by": "doc1", "reason": "reviewed", **base}
            elif h == 5:
                act = {"action": "resolve", "by": "nurse1", "reason": "reviewed", **base}  # refused for high+
            elif h == 6:
                act = {"action": "acknowledge", "by": "stranger", **base}  # unknown user: dead letter
            else:
                continue
            recs += self.recs("alert-actions", a["patient_id"], act, now)
        self.process(recs, now)


def cohort(run: Run, n_patients: int, days: int, batch: int) -> None:
    start = NOW - timedelta(days=days)
    c = sim.generate_cohort(n_patients, 7, start=start, days=days, formats=("mixed",))
    stream: list[tuple[datetime, Rec]] = []
    for rec in sim.records(c):
        at = datetime.fromisoformat(rec["received_at"])
        stream += [(at, r) for r in run.recs(rec["topic"], rec["key"], rec["value"], at)]
    for k, i in enumerate(range(0, len(stream), batch)):
        part = stream[i:i + batch]
        now = max(at for at, _ in part)
        run.process([r for _, r in part], now)
        if k % 4 == 3:
            run.tick(now + timedelta(minutes=45))
        if k % 9 == 8:
            run.act(now + timedelta(minutes=50), k)
    end = max(at for at, _ in stream)
    for dt in (timedelta(minutes=20), timedelta(hours=2), timedelta(hours=7)):
        run.tick(end + dt)
    run.act(end + timedelta(hours=8), 10_000)
    for dt in (timedelta(days=1), timedelta(days=3), timedelta(days=8), timedelta(days=20)):
        run.tick(end + dt)


def churn(run: Run, n_patients: int, rounds: int, batch: int) -> None:
    """``bench_clinical.churn``'s workload: one dose, then ALT alternating grade 2 / 3."""
    now = NOW + timedelta(days=40)
    pids = [f"LAT-{i:04d}" for i in range(n_patients)]
    doses = [r for pid in pids for r in run.recs("treatments", pid, {
        "type": "dose", "event_id": f"{pid}-dose", "patient_id": pid, "product": "onasemnogene-abeparvovec-iv",
        "administered_at": (now - timedelta(days=10)).isoformat(),
        "birth_date": (now - timedelta(days=300)).date().isoformat(), "weight_kg": 8.2,
        "ward": "paediatric-neurology", "care_team": "sma-gene-therapy", "source": "bench"}, now)]
    run.process(doses, now)
    grade3 = dict.fromkeys(pids, False)
    n = 0
    for r in range(rounds):
        stream: list[Rec] = []
        for pid in pids:
            grade3[pid] = not grade3[pid]
            t = now - timedelta(days=9) + timedelta(seconds=n)
            n += 1
            stream += run.recs("lab-results", pid, {
                "event_id": f"lat-{n}", "patient_id": pid, "loinc": "1742-6",
                "value": (8 if grade3[pid] else 4) * 40.0, "unit": "U/L", "reference_range": {"low": 0, "high": 40.0},
                "status": "final", "source": "bench", "effective_at": t.isoformat()}, now)
        for i in range(0, len(stream), batch):
            run.process(stream[i:i + batch], now)
        now += timedelta(minutes=7)
        if r % 2 == 1:
            run.tick(now)
        if r % 3 == 2:
            run.act(now + timedelta(minutes=1), 20_000 + r)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--patients", type=int, default=400)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--churn-patients", type=int, default=300)
    ap.add_argument("--churn-rounds", type=int, default=12)
    a = ap.parse_args(argv)
    import alerts
    with open(a.out, "wb") as fh:
        run = Run(fh)
        cohort(run, a.patients, a.days, a.batch)
        churn(run, a.churn_patients, a.churn_rounds, 200)
    digest = hashlib.sha256(Path(a.out).read_bytes()).hexdigest()
    print(f"alerts package: {Path(alerts.__file__).resolve().parent}")
    from alerts import compiled_core
    print(f"clinical core: {compiled_core.summary()} {compiled_core.status()}")
    print(f"{run.n_records:,} records in, {run.n_outputs:,} outputs {dict(sorted(run.counts.items()))}, "
          f"{run.n_changelog:,} changelog values; {Path(a.out).stat().st_size:,} bytes, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
