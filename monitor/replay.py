"""``monitor protocol replay``: read recorded inputs (topics or a JSON-lines export), rebuild each
patient's course, and compare a candidate protocol with the baseline (``alerts.replay``).

Reading is off the service's hot path and read-only: the topic reader is a kafka-python
consumer with no group (``group_id=None``, no offset commits), assigned to the partitions and
seeked to their beginning, reading up to the end offsets it saw when it started; it never
produces. It reads the patient stream ``observations`` only, which is what the clinical
runner evaluates (README, wire contract): canonical observations (corrections and
withdrawals included; their ``received_at`` is the clock ingest received them at), and
records with a ``kind`` header that ingest routed there keyed by patient: ``treatment``
(the original treatment bytes, decoded as the runner decodes them; the record timestamp is
their clock) and ``action`` (a clinician action: skipped, it names alert ids of the deployed
protocol). The ``treatments`` input topic is not read: everything valid on it was routed to
the patient stream, and reading both would count a treatment twice.

From a file (``--from-file``): the format ``monitor publish`` accepts and ``monitor simulate``
writes: one event per line (routed by shape), or ``{"topic", "value"[, "key"][, "received_at"]}``.
Raw lab/vital/liver-panel records (JSON, FHIR or HL7 v2) are decoded by the same
``schemas.ingest.decode`` as ingest; canonical ``observations`` records are read as such. A
record's arrival is its ``received_at`` when given, else the event's own time. A record that
ingest would dead-letter is counted and skipped (the service never evaluated it either).
"""
from __future__ import annotations

import argparse
import html
import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from alerts.replay import CourseEvent, PatientCourse
from schemas.errors import Rejected
from schemas.events import DoseEvent, Observation, SteroidEvent
from schemas.ingest import LAB_RESULTS, LIVER_FUNCTION, TREATMENTS, VITAL_SIGNS, Limits, decode

from .clinical.processor import KIND_HEADER, KIND_TREATMENT
from .settings import Settings

#: the replay decodes recorded events long after they were received: no future-skew check
_REPLAY_LIMITS = Limits(max_future=timedelta(days=36500))


class ReplayError(ValueError):
    """A user mistake (bad time, bad protocol file): one line, exit status 2."""


@dataclass
class Collected:
    courses: dict[str, PatientCourse] = field(default_factory=dict)
    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first: datetime | None = None
    last: datetime | None = None
    order: list[str] = field(default_factory=list)
    #: records of the patient stream no longer on the brokers: below each partition's log start
    #: offset (deleted by the topic's time retention, ``OBSERVATIONS_RETENTION_DAYS``, or by an
    #: operator); a course that began before them is replayed in part
    expired: int = 0

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def add(self, patient_id: str, arrival: datetime, event) -> None:
        pc = self.courses.get(patient_id)
        if pc is None:
            pc = self.courses[patient_id] = PatientCourse(patient_id)
            self.order.append(patient_id)
        pc.events.append(CourseEvent(arrival, self.records, event))
        self.first = arrival if self.first is None or arrival < self.first else self.first
        self.last = arrival if self.last is None or arrival > self.last else self.last


def _aware(d: datetime) -> datetime:
    return d if d.tzinfo is not None else d.replace(tzinfo=timezone.utc)


def parse_time(text: str | None, what: str) -> datetime | None:
    if not text:
        return None
    try:
        return _aware(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        raise ReplayError(f"{what}: {text!r} is not an ISO 8601 time (e.g. 2025-03-01T00:00:00Z)") from None


def _event_time(ev) -> datetime:
    if isinstance(ev, Observation):
        return ev.effective_at
    if isinstance(ev, DoseEvent):
        return ev.administered_at
    return ev.at


class Window:
    """The replay window. Records up to ``until`` are read (a course needs its history: the dose
    names the protocol, earlier results are baselines); ``since`` selects the patients with an
    event arriving in the window and the alert episodes that overlap it (``alerts.replay``)."""

    def __init__(self, since: datetime | None, until: datetime | None) -> None:
        self.since, self.until = since, until

    def __contains__(self, t: datetime) -> bool:
        return self.until is None or t <= self.until


def interpret(out: Collected, s: Settings, topic: str, raw: bytes | None, headers: dict[str, bytes],
              arrival: datetime | None, window: Window) -> None:
    """Add one recorded record to ``out`` (or count why it was skipped)."""
    out.records += 1
    kind = headers.get(KIND_HEADER)
    try:
        if topic == s.topic_observations and kind is None:
            obs = Observation.model_validate_json(raw or b"")
            events = [obs]
            arrival = arrival or obs.received_at
        elif topic == s.topic_observations and kind != KIND_TREATMENT:
            out.skip(f"{topic} kind={kind.decode('utf-8', 'replace')}")
            return
        elif topic in (s.topic_observations, s.topic_treatments):
            ev = decode(TREATMENTS, raw, received_at=arrival or datetime.now(timezone.utc), limits=_REPLAY_LIMITS)
            events = [ev]
        elif topic in (s.topic_lab_results, s.topic_vital_signs, s.topic_liver_function):
            kind_of = {s.topic_lab_results: LAB_RESULTS, s.topic_vital_signs: VITAL_SIGNS,
                       s.topic_liver_function: LIVER_FUNCTION}[topic]
            got = decode(kind_of, raw, received_at=arrival or datetime.now(timezone.utc), limits=_REPLAY_LIMITS)
            events = got if isinstance(got, list) else [got]
        else:
            out.skip(f"topic {topic} (not a clinical input)")
            return
    except Rejected as rej:
        out.skip(f"rejected: {rej.reason.value}")
        return
    except ValueError:
        out.skip("rejected: schema-invalid")
        return
    for ev in events:
        if not isinstance(ev, (Observation, DoseEvent, SteroidEvent)):
            out.skip("not an observation or treatment")
            continue
        when = _aware(arrival) if arrival is not None else _event_time(ev)
        if when not in window:
            out.skip("after --until")
            continue
        out.add(ev.patient_id, when, ev)


# --------------------------------------------------------------------------- file

def read_file(path: str | Path, s: Settings, window: Window) -> Collected:
    from .publish import iter_records

    out = Collected()
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            obj = json.loads(text)
            arrival = None
            if isinstance(obj, dict) and "topic" in obj and "value" in obj and obj.get("received_at"):
                arrival = parse_time(str(obj["received_at"]), f"line {n} received_at")
            headers = {}
            if isinstance(obj, dict) and isinstance(obj.get("headers"), dict):
                headers = {str(k): str(v).encode("utf-8") for k, v in obj["headers"].items()}
            for topic, _key, raw in iter_records([text], s):
                interpret(out, s, topic, raw, headers, arrival, window)
    return out


# --------------------------------------------------------------------------- topics

def replay_topics(s: Settings) -> list[str]:
    """The topics the reader consumes (read-only): the patient stream."""
    return [s.topic_observations]


def read_topics(s: Settings, window: Window, *, progress=None, timeout: float = 10.0) -> Collected:
    """Read the recorded inputs of the window from the topics with an unmanaged consumer
    (assign + seek, no group, no commits); stops at the end offsets taken when it started."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    from .kafka_config import kafka_python_config
    from .topics_admin import KafkaUnreachable, topic_partitions

    try:
        consumer = KafkaConsumer(
            group_id=None, enable_auto_commit=False, allow_auto_create_topics=False,
            request_timeout_ms=max(int(timeout * 1000), 5000) + 1000,
            fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=s.max_message_bytes + 1024,
            client_id=f"{s.app_id}-protocol-replay", **kafka_python_config(s, connect_timeout=timeout),
        )
    except KafkaError as exc:
        raise KafkaUnreachable(f"cannot use Kafka at {s.kafka_bootstrap_servers}: {type(exc).__name__}; "
                               "check KAFKA_BOOTSTRAP_SERVERS and the TLS/SASL settings") from None
    out = Collected()
    try:
        tps = []
        for t in replay_topics(s):
            parts = topic_partitions(consumer, t, wait=timeout)
            if not parts:  # never an empty replay in its place: the records may be there
                raise ReplayError(f"topic {t!r} (the patient stream, TOPIC_OBSERVATIONS) is not on the brokers at "
                                  f"{s.kafka_bootstrap_servers} after {timeout:.0f} s, or this user may not "
                                  "describe it")
            tps.extend(TopicPartition(t, p) for p in sorted(parts))
        consumer.assign(tps)
        end = consumer.end_offsets(tps)
        begin = consumer.beginning_offsets(tps)
        start = dict(begin)  # the whole history: a course before --since is its context
        out.expired = sum(begin.values())  # the stream is never compacted: offsets below the start are gone
        for tp in tps:
            consumer.seek(tp, start[tp])
        todo = {tp for tp in tps if start[tp] < end[tp]}
        total = sum(end[tp] - start[tp] for tp in tps)
        done = 0
        until_ms = int(window.until.timestamp() * 1000) if window.until is not None else None
        while todo:
            batch = consumer.poll(timeout_ms=1000, max_records=5000)
            for tp, recs in batch.items():
                for r in recs:
                    if r.offset >= end[tp]:
                        continue
                    done += 1
                    if until_ms is not None and r.timestamp > until_ms:
                        out.records += 1
                        out.skip("after --until")
                        continue
                    headers = {k: v for k, v in (r.headers or [])}
                    ts = datetime.fromtimestamp(r.timestamp / 1000, tz=timezone.utc)
                    arrival = ts if KIND_HEADER in headers else None  # observations carry received_at
                    interpret(out, s, tp.topic, r.value, headers, arrival, window)
                if consumer.position(tp) >= end[tp]:
                    todo.discard(tp)
            for tp in list(todo):
                if consumer.position(tp) >= end[tp]:
                    todo.discard(tp)
            if progress is not None:
                progress("read", done, total)
    finally:
        consumer.close(autocommit=False)
    return out


# --------------------------------------------------------------------------- command

class Progress:
    """Progress lines on stderr, at most one a second (and the last one)."""

    def __init__(self, stream=None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.last = 0.0
        self.t0 = time.monotonic()

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self.last < 1.0:
            return
        self.last = now
        self.stream.write(f"replay: {label} {done}/{total} ({now - self.t0:.1f} s)\n")
        self.stream.flush()


def _protocols(files: list[str] | None, s: Settings):
    from alerts.protocol import default_protocols, load_protocol

    if files:
        return [load_protocol(f) for f in files]
    if s.protocol_files.strip():
        return [load_protocol(p.strip()) for p in s.protocol_files.split(",") if p.strip()]
    return default_protocols()


def run(args: argparse.Namespace, s: Settings) -> int:
    from alerts.protocol import ProtocolError
    from alerts.replay import replay, with_candidate

    since = parse_time(args.since, "--since")
    until = parse_time(args.until, "--until")
    if since and until and until < since:
        raise ReplayError("--until is before --since")
    try:
        baseline = _protocols(args.baseline, s)
        candidate = with_candidate(baseline, _protocols(args.candidate, s))
    except ProtocolError as exc:
        raise ReplayError(f"protocol: {exc}") from None
    window = Window(since, until)
    prog = Progress(enabled=not args.quiet)
    if args.from_file:
        if not Path(args.from_file).is_file():
            raise FileNotFoundError(2, "no such file", args.from_file)
        got = read_file(args.from_file, s, window)
    else:
        got = read_topics(s, window, progress=prog)
        if got.expired:  # said even with --quiet: the report does not hold the whole history
            print(f"replay: {got.expired} earlier record(s) of the patient stream are no longer on the brokers "
                  "(deleted by its retention, OBSERVATIONS_RETENTION_DAYS, or by an operator); courses that "
                  "began before them are replayed in part", file=sys.stderr)
    ids = got.order
    if since is not None:
        ids = [i for i in ids if any(e.arrival >= since for e in got.courses[i].events)]
    if args.patients is not None:
        ids = ids[: max(0, args.patients)]
    courses = [got.courses[i] for i in ids]
    end = until or got.last or datetime.now(timezone.utc)
    secret = s.pseudonym_secret
    if not args.identify and not secret:
        secret = os.urandom(32)
        print("replay: PSEUDONYM_SECRET is not set: patient references are random for this run "
              "(not the inbox's references)", file=sys.stderr)
    report = replay(courses, baseline, candidate, end, secret=secret, identify=args.identify, progress=prog,
                    since=since)
    report.window = {"since": since.isoformat() if since else (got.first.isoformat() if got.first else None),
                     "until": end.isoformat(), "records": got.records, "skipped": got.skipped,
                     "source": args.from_file or "topics", "expired_records": got.expired}
    data = report.to_json()
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1), encoding="utf-8")
    if args.html:
        Path(args.html).write_text(render_html(data), encoding="utf-8")
    print(summary_text(data))
    return 0


def summary_text(data: dict) -> str:
    lines = [f"{data['patients']} patients, {data['patient_days']:g} patient-days; "
             f"{data['differences']} difference(s) in {len(data['patients_changed'])} patient(s)"]
    for rule, r in data["rules"].items():
        if r["gained"] or r["lost"] or r["changed_severity"] or r["timing_changed"]:
            lines.append(f"  {rule}: pages/100 pd {r['pages_per_100_patient_days']['baseline']:g} -> "
                         f"{r['pages_per_100_patient_days']['candidate']:g}; gained {r['gained']}, lost {r['lost']}, "
                         f"severity changed {r['changed_severity']}, timing changed {r['timing_changed']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;max-width:1100px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.meta{color:#555}.kpis{display:flex;gap:16px;margin:16px 0}
.kpi{border:1px solid #d5d9e0;border-radius:6px;padding:10px 14px;min-width:130px}
.kpi b{display:block;font-size:22px}
table{border-collapse:collapse;width:100%;margin:8px 0}th,td{border-bottom:1px solid #e3e6eb;padding:4px 8px;
text-align:left;vertical-align:top}th{background:#f4f6f9}td.n{text-align:right;font-variant-numeric:tabular-nums}
.gain{color:#a4161a}.lost{color:#0b6e4f}.chg{color:#8a5a00}.legend span{display:inline-block;width:12px;height:12px;
margin:0 4px 0 12px;vertical-align:-1px}
details{margin:4px 0}summary{cursor:pointer}.none{color:#0b6e4f;font-weight:600}
"""

_JS = """
document.querySelectorAll('[data-filter]').forEach(function(inp){
  inp.addEventListener('input',function(){var q=inp.value.toLowerCase();
    document.querySelectorAll('#patients tbody tr').forEach(function(tr){
      tr.style.display=tr.textContent.toLowerCase().indexOf(q)>=0?'':'none';});});});
"""


def _chart(rules: dict) -> str:
    """Horizontal grouped bars: pages per 100 patient-days per rule, baseline vs candidate (inline SVG)."""
    rows = [(r, v["opened_per_100_patient_days"]["baseline"], v["opened_per_100_patient_days"]["candidate"],
             v["pages_per_100_patient_days"]["baseline"], v["pages_per_100_patient_days"]["candidate"])
            for r, v in rules.items()]
    if not rows:
        return "<p>No alerts in either run.</p>"
    top = max(max(b, c) for _, b, c, _, _ in rows) or 1.0
    label_w, bar_w, row_h = 260, 560, 30
    h = row_h * len(rows) + 40
    parts = [f'<svg id="burden-chart" xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 90}" '
             f'height="{h}" role="img" aria-label="Alerts opened per 100 patient-days per rule, baseline vs candidate">']
    for i, (rule, b, c, pb, pc) in enumerate(rows):
        y = 20 + i * row_h
        bw = bar_w * b / top
        cw = bar_w * c / top
        parts.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end" font-size="12">{html.escape(rule)}</text>')
        parts.append(f'<rect class="bar-baseline" x="{label_w}" y="{y + 2}" width="{bw:.1f}" height="11" fill="#5b7fb8">'
                     f'<title>{html.escape(rule)} baseline: {b:g} opened, {pb:g} pages per 100 patient-days</title></rect>')
        parts.append(f'<rect class="bar-candidate" x="{label_w}" y="{y + 14}" width="{cw:.1f}" height="11" '
                     f'fill="#e08a2e"><title>{html.escape(rule)} candidate: {c:g} opened, {pc:g} pages per 100 '
                     f'patient-days</title></rect>')
        parts.append(f'<text x="{label_w + max(bw, cw) + 6}" y="{y + 18}" font-size="11" fill="#444">'
                     f'{b:g} / {c:g}</text>')
    parts.append(f'<line x1="{label_w}" y1="14" x2="{label_w}" y2="{h - 16}" stroke="#999"/>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(data: dict) -> str:
    """A self-contained report (inline CSS, JS and SVG; no external resource)."""
    e = html.escape
    rules = data["rules"]
    rule_rows = []
    for rule, r in rules.items():
        sev = ", ".join(f"{k} {v['baseline']}&rarr;{v['candidate']}" for k, v in r["by_severity"].items())
        d = r["time_to_first_alert_delta_h"]
        dt = f"{d['mean']:+g} h (n={d['matched']})" if d.get("matched") else "&ndash;"
        rule_rows.append(
            f"<tr><td>{e(rule)}</td><td class=n>{r['opened']['baseline']}</td><td class=n>{r['opened']['candidate']}"
            f"</td><td class=n>{r['pages_per_100_patient_days']['baseline']:g}</td>"
            f"<td class=n>{r['pages_per_100_patient_days']['candidate']:g}</td><td class='n gain'>{r['gained']}</td>"
            f"<td class='n lost'>{r['lost']}</td><td class='n chg'>{r['changed_severity']}</td>"
            f"<td class=n>{r['timing_changed']}</td><td>{dt}</td><td>{sev}</td></tr>")
    prow = []
    for p in data["patients_changed"]:
        who = p.get("patient_id") or p.get("patient")
        items = []
        for g in p["gained"]:
            items.append(f"<li class=gain>gained {e(g['rule'])} {e(g['dedupe'])} ({e(g['severity'])}, opened "
                         f"{e(g['opened_at'])})</li>")
        for g in p["lost"]:
            items.append(f"<li class=lost>lost {e(g['rule'])} {e(g['dedupe'])} ({e(g['severity'])}, opened "
                         f"{e(g['opened_at'])})</li>")
        for g in p["changed"]:
            items.append(f"<li class=chg>{e(g['rule'])} {e(g['dedupe'])}: {e(g['baseline'])} &rarr; "
                         f"{e(g['candidate'])} (opened {e(g['opened_at'])})</li>")
        for g in p["timing"]:
            items.append(f"<li>{e(g['rule'])} {e(g['dedupe'])}: first alert {g['time_to_first_alert_delta_h']:+g} h</li>")
        prow.append(f"<tr><td>{e(who)}</td><td class=n>{p['differences']}</td><td><ul>{''.join(items)}</ul></td></tr>")
    verdict = ("<p class=none>No differences: the candidate opens the same alerts at the same times.</p>"
               if data["differences"] == 0 else "")
    w = data.get("window") or {}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Protocol replay report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body>
<h1>Protocol replay: candidate vs baseline</h1>
<p class=meta>Baseline: {e(', '.join(data.get('baseline', [])))}<br>Candidate: {e(', '.join(data.get('candidate', [])))}
<br>Window: {e(str(w.get('since')))} to {e(str(w.get('until')))}; source {e(str(w.get('source')))};
{e(str(w.get('records')))} records read.</p>
<div class=kpis><div class=kpi><b id="n-patients">{data['patients']}</b>patients</div>
<div class=kpi><b>{data['patient_days']:g}</b>patient-days</div>
<div class=kpi><b id="n-differences">{data['differences']}</b>differences</div>
<div class=kpi><b>{len(data['patients_changed'])}</b>patients changed</div></div>
{verdict}
<h2>Alert burden per rule (alerts opened per 100 patient-days)</h2>
<div class=legend><span style="background:#5b7fb8"></span>baseline<span style="background:#e08a2e"></span>candidate</div>
{_chart(rules)}
<h2>Per rule</h2>
<table id="rules"><thead><tr><th>Rule</th><th>Opened (base)</th><th>Opened (cand)</th><th>Pages /100 pd (base)</th>
<th>Pages /100 pd (cand)</th><th>Gained</th><th>Lost</th><th>Severity changed</th><th>Timing changed</th>
<th>&Delta; time to first alert (mean)</th><th>By severity (base&rarr;cand)</th></tr></thead>
<tbody>{''.join(rule_rows)}</tbody></table>
<h2>Patients whose alerts differ</h2>
<p><input data-filter placeholder="filter" aria-label="filter patients"></p>
<table id="patients"><thead><tr><th>Patient</th><th>Differences</th><th>What changes</th></tr></thead>
<tbody>{''.join(prow) or '<tr><td colspan=3>none</td></tr>'}</tbody></table>
<script>{_JS}</script>
</body></html>
"""
