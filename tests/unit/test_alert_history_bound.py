"""Issue #13: the history an alert version carries is bounded, and nothing a person did or a
sink needs is lost; the inbox rebuilds the full timeline from the versions it reads.

Each scenario runs twice: with the bound under test and with a bound too large to drop
anything (the full history, as every version carried before), and compares the two.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from alerts.lifecycle import AlertBook, LifecycleConfig, apply_action, apply_finding, tick
from alerts.routing import RouteSpec, TierSpec
from monitor.inbox.store import InboxStore
from monitor.inbox.views import _history_rows
from monitor.notify.sinks import AlertmanagerSink
from schemas.alert import Alert, AlertAction, HistoryEntry
from schemas.findings import Evidence, Finding, FindingText, ProtocolRef

UTC = timezone.utc
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)
PID = "patient-0042"
ROUTE = RouteSpec(
    id="liver",
    tiers=[
        TierSpec(name="ward-nurse", recipients=["ward-nurse"],
                 escalate_after_minutes={"critical": 5, "high": 10, "warning": 30}),
        TierSpec(name="physician", recipients=["on-call-physician"],
                 escalate_after_minutes={"critical": 5, "high": 10, "warning": 30}),
    ],
    failsafe={"name": "coordinator", "recipients": ["clinical-coordinator"]},
)
N = 10
BOUNDED = LifecycleConfig(routes={"liver": ROUTE}, pseudonym_secret=b"s", history_recent_system_entries=N)
FULL = LifecycleConfig(routes={"liver": ROUTE}, pseudonym_secret=b"s", history_recent_system_entries=10**9)


def _finding(n: int, severity: str, at: datetime) -> Finding:
    return Finding(
        finding_id=f"f{n}", patient_id=PID, rule_id="liver.alt_increased", state="present",
        severity=severity, grade=3,
        evidence=[Evidence(observation_id=f"obs-{n}", analyte="ALT", value=150.0 + n, unit="U/L",
                           effective_at=at, limit=120.0, comparison=">")],
        protocol=ProtocolRef(id="sma-oa", version="1.2.0"), effective_at=at, evaluated_at=at, route="liver",
        text=FindingText(what="ALT above 3x ULN", why="Possible liver injury", action="Repeat LFTs"),
        ward="PICU", care_team="neuro-picu",
    )


def _act(kind: str, alert_id: str, by: str, role: str, at: datetime, **kw) -> AlertAction:
    return AlertAction(action=kind, alert_id=alert_id, by=by, role=role, at=at, **kw)


class Run:
    """One patient's book under one config; ``versions`` collects every alert version emitted."""

    def __init__(self, config: LifecycleConfig):
        self.config = config
        self.book = AlertBook(patient_id=PID)
        self.versions: list[Alert] = []
        self.n = 0

    def find(self, severity: str, at: datetime) -> None:
        self.n += 1
        self.versions += apply_finding(self.book, _finding(self.n, severity, at), at, self.config)

    def act(self, kind: str, by: str, role: str, at: datetime, **kw) -> None:
        self.versions += apply_action(self.book, _act(kind, self.alert_id, by, role, at, **kw), at, self.config)

    def tick(self, at: datetime) -> None:
        self.versions += tick(self.book, at, self.config)

    @property
    def alert_id(self) -> str:
        return self.versions[0].alert_id

    @property
    def last(self) -> Alert:
        return self.versions[-1]


def _alternating(run: Run, changes: int, *, start: datetime, ack_at: int | None = None,
                 note_at: int | None = None) -> None:
    """Open (high), then ``changes`` results alternating warning/high a minute apart (each a
    severity change), with an acknowledgement and a note by people at the given steps."""
    run.find("high", start)
    for i in range(1, changes + 1):
        t = start + timedelta(minutes=i)
        run.find("warning" if i % 2 else "high", t)
        if i == ack_at:
            run.act("acknowledge", "nurse:amy", "nurse", t + timedelta(seconds=5))
        if i == note_at:
            run.act("note", "dr:lee", "physician", t + timedelta(seconds=7), reason="called the parents")


def _key(h: HistoryEntry) -> tuple:
    return (h.at, h.by, h.action, h.from_status, h.to_status, h.severity, h.tier, h.note)


def _is_subsequence(part: list, whole: list) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def _expected_kept(full: list[HistoryEntry], n: int) -> list[HistoryEntry]:
    """The rule, spelt out on the full history: people, first, first of each (severity, tier),
    newest n system entries."""
    system = [i for i, h in enumerate(full) if h.by == "system"]
    newest = set(system[-n:]) if n else set()
    first_of: dict[tuple, int] = {}
    for i, h in enumerate(full):
        first_of.setdefault((h.severity, h.tier), i)
    keep = {0} | newest | set(first_of.values()) | {i for i, h in enumerate(full) if h.by != "system"}
    return [full[i] for i in sorted(keep)]


# ------------------------------------------------------------------ the lifecycle


def test_forty_severity_changes_keep_a_bounded_history():
    bounded, full = Run(BOUNDED), Run(FULL)
    for run in (bounded, full):
        _alternating(run, 40, start=T0, ack_at=3, note_at=20)
        run.tick(T0 + timedelta(hours=2))  # the acknowledgement was undone by a rise: escalates
    a, ref = bounded.last, full.last
    assert ref.history_omitted == 0 and len(ref.history) > 40
    # the same alert otherwise
    assert a.model_dump(exclude={"history", "history_omitted"}) == ref.model_dump(exclude={"history", "history_omitted"})
    # chronological: the kept entries are the full history's, in its order
    assert _is_subsequence(a.history, ref.history)
    assert a.history[0] == ref.history[0] and a.history[0].action == "opened"
    people = [h for h in ref.history if h.by != "system"]
    assert [h.action for h in people] == ["acknowledged", "note"]
    assert [h for h in a.history if h.by != "system"] == people
    assert {(h.severity, h.tier) for h in a.history} == {(h.severity, h.tier) for h in ref.history}
    assert [h for h in a.history if h.by == "system"][-N:] == [h for h in ref.history if h.by == "system"][-N:]
    # nothing else is kept, and what is dropped is counted
    assert a.history == _expected_kept(ref.history, N)
    assert a.history_omitted == len(ref.history) - len(a.history) > 20
    assert len(a.history) <= 1 + N + len(people) + len({(h.severity, h.tier) for h in ref.history})
    assert len(json.dumps(a.model_dump(mode="json"))) < len(json.dumps(ref.model_dump(mode="json"))) / 2


def test_every_version_is_bounded_and_lists_its_own_entries():
    run = Run(BOUNDED)
    _alternating(run, 40, start=T0, ack_at=3)
    sizes = [len(v.history) for v in run.versions]
    assert max(sizes) <= 1 + N + 1 + 4  # first, newest N, the acknowledgement, (severity, tier) pairs
    for prev, v in zip(run.versions, run.versions[1:]):
        assert v.history_omitted >= prev.history_omitted
        assert [h.action for h in v.history[-len(v.changes):]] == v.changes
        assert len(v.history) + v.history_omitted == len(prev.history) + prev.history_omitted + len(v.changes)


def test_an_early_acknowledgement_survives_a_hundred_system_changes():
    run = Run(BOUNDED)
    run.find("warning", T0)
    run.act("acknowledge", "nurse:amy", "nurse", T0 + timedelta(seconds=30), reason="seen, repeating LFTs")
    for i in range(1, 101):
        run.find("warning", T0 + timedelta(minutes=i))  # "updated": same severity, same tier
    a = run.last
    acks = [h for h in a.history if h.action == "acknowledged"]
    assert len(acks) == 1 and acks[0].by == "nurse:amy" and acks[0].note == "seen, repeating LFTs"
    assert [h.action for h in a.history[:2]] == ["opened", "acknowledged"]
    assert len(a.history) == 2 + N and a.history_omitted == 100 - N
    assert a.history[-1].note == "finding f101"


def test_keep_recent_zero_still_lists_each_versions_own_entries():
    cfg = LifecycleConfig(routes={"liver": ROUTE}, pseudonym_secret=b"s", history_recent_system_entries=0)
    run = Run(cfg)
    _alternating(run, 12, start=T0)
    for v in run.versions:
        assert [h.action for h in v.history[-len(v.changes):]] == v.changes
    # opened + first of (high, 0) is the same entry; first (warning, 0); this version's own
    assert [h.action for h in run.last.history] == ["opened", "severity_lowered", "severity_raised"]
    with pytest.raises(ValueError):
        LifecycleConfig(history_recent_system_entries=-1)


def test_trimming_is_the_same_across_a_changelog_restore():
    straight, restored = Run(BOUNDED), Run(BOUNDED)
    _alternating(straight, 30, start=T0, ack_at=5)
    restored.find("high", T0)
    for i in range(1, 31):
        restored.book = AlertBook.from_dict(json.loads(json.dumps(restored.book.to_dict())))
        t = T0 + timedelta(minutes=i)
        restored.find("warning" if i % 2 else "high", t)
        if i == 5:
            restored.act("acknowledge", "nurse:amy", "nurse", t + timedelta(seconds=5))
    assert restored.last == straight.last


def test_alerts_without_the_field_still_load():
    run = Run(BOUNDED)
    _alternating(run, 3, start=T0)
    data = run.last.model_dump(mode="json")
    del data["history_omitted"]
    assert Alert.model_validate(data).history_omitted == 0
    book = run.book.to_dict()
    for a in book["alerts"].values():
        a.pop("history_omitted")
    assert AlertBook.from_dict(book).alerts[run.alert_id].history_omitted == 0


# ------------------------------------------------------------------ the Alertmanager sink


def _label_sets(payload: list[dict]) -> list[tuple]:
    return sorted(tuple(sorted(item["labels"].items())) + (item["annotations"].get("status"), item["endsAt"])
                  for item in payload)


def test_alertmanager_still_ends_every_earlier_label_set_after_many_changes():
    bounded, full = Run(BOUNDED), Run(FULL)
    for run in (bounded, full):
        run.find("warning", T0)
        run.find("critical", T0 + timedelta(minutes=1))  # (critical, 0)
        run.tick(T0 + timedelta(minutes=7))  # (critical, 1)
        run.find("high", T0 + timedelta(minutes=8))  # (high, 1)
        run.tick(T0 + timedelta(minutes=20))  # (high, failsafe)
        for i in range(60):  # then only high/warning at the failsafe
            t = T0 + timedelta(minutes=30 + i)
            run.find("warning" if i % 2 == 0 else "high", t)
    a, ref = bounded.last, full.last
    assert a.history_omitted > 40 and ref.history_omitted == 0
    # the newest entries alone would not name tier 1 or critical any more
    assert {(h.severity.value, h.tier) for h in a.history[-N:]} <= {("warning", 2), ("high", 2)}
    now = T0 + timedelta(hours=3)
    sink = AlertmanagerSink("http://127.0.0.1:9", clock=lambda: now)
    got, want = sink.payload(a), sink.payload(ref)
    assert _label_sets(got) == _label_sets(want)
    ended = {(i["labels"]["severity"], i["labels"]["escalation_tier"]) for i in got
             if i["annotations"].get("status") == "superseded"}
    assert {("critical", "0"), ("critical", "1"), ("high", "1"), ("warning", "0"), ("warning", "failsafe"),
            ("critical", "failsafe")} <= ended
    assert ("high", "failsafe") not in ended  # the current one stays active


# ------------------------------------------------------------------ the inbox


def _store() -> InboxStore:
    return InboxStore(b"inbox-secret")


def test_inbox_rebuilds_the_full_history_from_every_version():
    bounded, full = Run(BOUNDED), Run(FULL)
    for run in (bounded, full):
        _alternating(run, 40, start=T0, ack_at=3, note_at=20)
    assert bounded.last.history_omitted > 0
    store = _store()
    for v in bounded.versions:  # as read from the topic: JSON
        store.apply_alert_bytes(v.model_dump_json().encode())
    held = store.alerts[bounded.alert_id]
    assert held.version == full.last.version
    assert held.history == full.last.history and held.history_omitted == 0
    d = store.detail(held)
    assert d["history_omitted"] == 0 and len(d["history"]) == len(full.last.history)
    assert "not shown" not in _history_rows(d)
    acts = store.handover(now=T0 + timedelta(hours=1), hours=2)["actions"]
    assert [(x["action"], x["by"]) for x in acts] == [("acknowledged", "nurse:amy"), ("note", "dr:lee")]


def test_inbox_that_missed_early_versions_says_how_many_entries_it_cannot_show():
    bounded, full = Run(BOUNDED), Run(FULL)
    for run in (bounded, full):
        _alternating(run, 40, start=T0, ack_at=3, note_at=20)
    store = _store()
    skipped = 25  # versions that left the topic before this inbox read it
    for v in bounded.versions[skipped:]:
        store.apply_alert(v)
    held = store.alerts[bounded.alert_id]
    assert _is_subsequence(held.history, full.last.history)
    assert len(held.history) > len(bounded.last.history)  # what later versions listed was merged in
    assert held.history_omitted == len(full.last.history) - len(held.history) > 0
    assert [h for h in held.history if h.by != "system"] == [h for h in full.last.history if h.by != "system"]
    rows = _history_rows(store.detail(held))
    assert f"{held.history_omitted} earlier automatic entries are not shown" in rows
    assert rows.count("<tr") == len(held.history) + 1


def test_inbox_ignores_an_older_version_after_a_merge():
    run = Run(BOUNDED)
    _alternating(run, 30, start=T0)
    store = _store()
    for v in run.versions:
        store.apply_alert(v)
    merged = store.alerts[run.alert_id]
    assert store.apply_alert(run.versions[-2]) is None
    assert store.alerts[run.alert_id] is merged and len(merged.history) == 31


def test_inbox_that_missed_versions_in_the_middle_keeps_what_it_read():
    bounded, full = Run(BOUNDED), Run(FULL)
    for run in (bounded, full):
        _alternating(run, 40, start=T0, ack_at=3, note_at=20)
    store = _store()
    for i, v in enumerate(bounded.versions):
        if not 10 <= i < 30:  # twenty versions never read
            store.apply_alert(v)
    held = store.alerts[bounded.alert_id]
    assert _is_subsequence(held.history, full.last.history)
    assert held.history_omitted == len(full.last.history) - len(held.history) > 0
    assert [h for h in held.history if h.by != "system"] == [h for h in full.last.history if h.by != "system"]
    seen = {_key(h) for v in bounded.versions if not 10 <= bounded.versions.index(v) < 30 for h in v.history}
    assert {_key(h) for h in held.history} == seen  # every entry of every version read, nothing else
