"""The changelog's alert book assembled from cached alert JSON is the book's own JSON, byte
for byte, whatever changed in the alerts since their JSON was cached.

``monitor.clinical.store.encode_book`` reuses an alert's JSON while every field of the
alert is the same object as when it was cached (``alert_fingerprint``); the processor
hands it the JSON of each version it writes. These tests compare every changelog value
with the one the whole-book serializer writes, through a workload in which alerts open,
change severity, are acknowledged, escalate and resolve, and after changes made in place
(a history entry appended, the history trimmed, a field replaced).
"""
from __future__ import annotations

import json
from collections import namedtuple
from datetime import timedelta

import pytest
from pydantic import ValidationError

from alerts.engine import Engine
from alerts.protocol import default_protocols
from alerts.testkit import at, dose, obs
from monitor.actions_auth import ActionAuthority
from monitor.clinical.processor import KIND_ACTION, KIND_TREATMENT, ClinicalProcessor, routed_headers
from monitor.clinical.store import InMemoryPatientStore, alert_fingerprint, encode, encode_book
from monitor.inbox.auth import User, UserDirectory
from monitor.settings import Settings
from monitor.worker import lifecycle_config
from schemas.alert import AlertStatus, HistoryEntry, Role

Rec = namedtuple("Rec", "topic partition offset key value headers")
DIRECTORY = UserDirectory([User("n1", Role.NURSE, "x")])


@pytest.fixture(scope="module")
def parts():
    protocols = default_protocols()
    return Engine(protocols), lifecycle_config(protocols, Settings())


class Spy(InMemoryPatientStore):
    """Checks every changelog value against the whole-book serializer."""

    checked = 0

    def take_changed(self, limit=None):
        out = super().take_changed(limit)
        for pid, _partition, value in out:
            e = self._entries[pid]
            assert value == encode(e.state, e.book, offset=e.offset), \
                f"changelog value of {pid} differs from the book's own JSON"
            assert json.loads(value)["alerts"] == e.book.to_dict()
            self.checked += 1
        return out


def test_changelog_values_equal_the_whole_book_json_through_a_course(parts):
    engine, lifecycle = parts
    store = Spy()
    proc = ClinicalProcessor(engine, lifecycle, store, findings_topic="findings", alerts_topic="alerts",
                             dead_letter_topic="dead-letter", clock_settle_seconds=0.0,
                             authority=ActionAuthority(DIRECTORY))
    offset = [0]

    def rec(pid: str, value: bytes, headers=None) -> Rec:
        offset[0] += 1
        return Rec("observations", 0, offset[0], pid.encode(), value, headers)

    pids = ["JSON-1", "JSON-2"]
    t0 = at(0)
    batch = [rec(p, dose(patient=p).model_dump_json().encode(), routed_headers(KIND_TREATMENT, "treatments", 0, 1))
             for p in pids]
    proc.process(batch)
    store.take_changed()
    alerts_seen: list[dict] = []
    # ALT up and down through the CTCAE grades, platelets falling: alerts open, change and resolve
    alt = [60, 200, 400, 130, 45, 250, 500, 90, 40]
    for i, v in enumerate(alt):
        batch = []
        for p in pids:
            batch.append(rec(p, obs("alt", v, 1 + i, high=40.0, oid=f"{p}-alt-{i}",
                                    patient=p).model_dump_json().encode()))
            batch.append(rec(p, obs("platelets", 300 - 25 * i, 1.04 + i, oid=f"{p}-plt-{i}",
                                    patient=p).model_dump_json().encode()))
        out = proc.process(batch)
        alerts_seen += [json.loads(o.value) for o in out if o.topic == "alerts"]
        if i == 3:  # a nurse acknowledges the first open alert of each patient
            for p in pids:
                _s, book = store.load(p, 0)
                for a in book.open_alerts()[:1]:
                    body = {"action": "acknowledge", "alert_id": a.alert_id, "patient_id": p, "by": "n1",
                            "action_id": f"ack-{a.alert_id}", "at": (t0 + timedelta(days=5)).isoformat()}
                    proc.process([rec(p, json.dumps(body).encode(), routed_headers(KIND_ACTION, "alert-actions", 0, i))])
        if i % 3 == 2:  # the clock: escalation of what is not acknowledged
            proc.tick(pids, t0 + timedelta(days=1 + i, hours=6))
        store.take_changed()
    assert len(alerts_seen) >= 10 and {a["status"] for a in alerts_seen} >= {"firing", "resolved"}
    assert store.checked >= 2 * len(alt)


def _book_with_alert(parts):
    engine, lifecycle = parts
    store = InMemoryPatientStore()
    proc = ClinicalProcessor(engine, lifecycle, store, findings_topic="findings", alerts_topic="alerts",
                             dead_letter_topic="dead-letter", clock_settle_seconds=0.0)
    p = "JSON-3"
    proc.process([Rec("observations", 0, 1, p.encode(), dose(patient=p).model_dump_json().encode(),
                      routed_headers(KIND_TREATMENT, "treatments", 0, 1)),
                  Rec("observations", 0, 2, p.encode(),
                      obs("alt", 400, 1, high=40.0, oid="a1", patient=p).model_dump_json().encode(), None)])
    store.take_changed()
    _state, book = store.load(p, 0)
    assert book.alerts
    return book


def test_a_change_made_in_place_is_never_hidden_by_the_cache(parts):
    book = _book_with_alert(parts)
    cache: dict = {}
    alert = next(iter(book.alerts.values()))
    first = encode_book(book, cache)
    assert first == encode_book(book) and alert.alert_id in cache
    assert encode_book(book, cache) == first  # reused

    entry = HistoryEntry(at=alert.updated_at, by="nurse:n1", action="note", note="called the parents")
    changes = [
        lambda a: a.history.append(entry),                       # a list grown in place
        lambda a: a.history.__setitem__(slice(None), a.history[:1]),  # a list trimmed in place
        lambda a: setattr(a, "status", AlertStatus.ACKNOWLEDGED),  # a field replaced
        lambda a: setattr(a, "updated_at", a.updated_at + timedelta(seconds=1)),
        lambda a: a.finding_ids.append("f-new"),
        lambda a: setattr(a, "escalation_tier", a.escalation_tier + 1),
        lambda a: setattr(a, "route", {**a.route, "id": "other-route"}),
    ]
    for change in changes:
        change(alert)
        assert encode_book(book, cache) == encode_book(book), change
    assert json.loads(encode_book(book, cache))["alerts"][alert.alert_id]["route"]["id"] == "other-route"


def test_equal_but_different_values_are_not_taken_as_the_same(parts):
    """Identity, not equality: an instant written in another offset is equal but not the same JSON."""
    book = _book_with_alert(parts)
    cache: dict = {}
    alert = next(iter(book.alerts.values()))
    encode_book(book, cache)
    from datetime import timezone
    shifted = alert.updated_at.astimezone(timezone(timedelta(hours=2)))
    assert shifted == alert.updated_at
    alert.updated_at = shifted
    assert encode_book(book, cache) == encode_book(book)
    assert alert_fingerprint(alert) != [] and b"+02:00" in encode_book(book, cache)


def test_the_values_an_alert_holds_cannot_be_changed_in_place(parts):
    book = _book_with_alert(parts)
    alert = next(iter(book.alerts.values()))
    with pytest.raises(ValidationError):
        alert.history[0].note = "changed"
    with pytest.raises(ValidationError):
        alert.text.what = "changed"
    with pytest.raises(ValidationError):
        alert.evidence[0].value = 1.0
