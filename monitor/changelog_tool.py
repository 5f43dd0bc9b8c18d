"""``monitor changelog check``: which patients' stored state this release cannot read.

``monitor_clinical_patients_unreadable`` (and the rule MonitorPatientStateUnreadable) says
how many patients a worker cannot read, never which: no patient identifier is a metric
label or logged. This operator tool reads the patient store changelog
(``<app id>-patients-changelog``) from its start to its end, as a worker's restore does,
keeps the newest value per patient, decodes each with the worker's own decoder
(``monitor.clinical.store.decode``) and prints the patients whose value it cannot read, with
the partition, the offset, the size and why (format version, not JSON, ...). It prints
patient identifiers to the operator's terminal, as ``monitor dlq show`` prints original
bytes; it writes nothing.

Exit status: 0 when every patient's value is readable, 1 when one is not.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from .settings import Settings
from .topics_admin import changelog_topic


@dataclass
class Unreadable:
    patient_id: str
    partition: int
    offset: int
    bytes: int
    why: str


@dataclass
class Report:
    topic: str
    records: int
    patients: int
    unreadable: list[Unreadable]


def check(s: Settings, timeout: float = 15.0) -> Report:
    """Read the changelog to its end and decode the newest value of every patient."""
    from .clinical.store import UnreadablePatientState, decode, key_patient_id
    from .dlq_tool import read_topic, tool_consumer

    topic = changelog_topic(s)
    newest: dict[bytes, tuple[int, int, bytes]] = {}
    records = 0
    consumer = tool_consumer(s, timeout, client="changelog-tool")
    try:
        for r in read_topic(consumer, topic, stall_timeout=max(timeout, 30.0),
                            named_by="the changelog is named after MONITOR_APP_ID, or TOPIC_PATIENT_CHANGELOG"):
            records += 1
            if r.key is None:
                continue
            if r.value is None:  # a deletion
                newest.pop(r.key, None)
            else:
                newest[r.key] = (r.partition, r.offset, r.value)
    finally:
        consumer.close()
    bad: list[Unreadable] = []
    for key, (partition, offset, value) in newest.items():
        try:
            decode(value)
        except UnreadablePatientState as exc:
            bad.append(Unreadable(key_patient_id(key), partition, offset, len(value), str(exc)))
    bad.sort(key=lambda u: (u.partition, u.offset))
    return Report(topic, records, len(newest), bad)


def format_report(report: Report) -> str:
    lines = [f"changelog {report.topic}: {report.records:,} records read, {report.patients:,} patients, "
             f"{len(report.unreadable):,} whose stored state this release cannot read"]
    if report.unreadable:
        lines.append(f"{'patient':<24} {'partition':>9} {'offset':>10} {'bytes':>9}  why")
        for u in report.unreadable:
            lines.append(f"{u.patient_id:<24} {u.partition:>9} {u.offset:>10} {u.bytes:>9}  {u.why}")
        lines.append("Their records are dead-lettered (monitor dlq list --reason patient_state_unreadable); "
                     "README, 'A patient whose stored state cannot be read'.")
    return "\n".join(lines)


def cmd_check(args) -> int:
    from .settings import get_settings

    report = check(get_settings(), timeout=args.timeout)
    if args.json:
        print(json.dumps({"topic": report.topic, "records": report.records, "patients": report.patients,
                          "unreadable": [asdict(u) for u in report.unreadable]}))
    else:
        print(format_report(report))
    return 1 if report.unreadable else 0


def add_parser(sub) -> None:
    """Add ``monitor changelog check`` to the top-level sub-parsers."""
    cl = sub.add_parser("changelog", help="the patient store changelog: which patients' stored state cannot be read")
    cls = cl.add_subparsers(dest="changelog_command", required=True)
    chk = cls.add_parser("check", help="read the changelog to its end and list the patients whose newest value this "
                                       "release cannot read (prints patient ids; exit 1 when there is one)")
    chk.add_argument("--json", action="store_true", help="one JSON object instead of the table (default: a table)")
    chk.add_argument("--timeout", type=float, default=15.0, metavar="SECONDS",
                     help="seconds to wait for the broker before giving up (default: 15)")
    chk.set_defaults(func=cmd_check)
