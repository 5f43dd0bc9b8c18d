"""Pure parts of ``monitor dlq``: time and id parsing, filters, formatting, replay targets."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from monitor.dlq import dead_letter_headers
from monitor.dlq_tool import (DeadLetter, DlqError, Filter, decode_text, format_detail, format_table, parse_id,
                              parse_time, replay_ledger_topic, replay_target)
from monitor.settings import Settings
from schemas.errors import Reason

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def dl(offset=7, reason=Reason.UNKNOWN_LOINC, source="lab-results", at=NOW, value=b'{"a": 1}', key=b"p-1"):
    headers = dead_letter_headers(reason, "LOINC code '1234-5' is not known", source, 2, 40, at)
    return DeadLetter("dead-letter", 1, offset, int(at.timestamp() * 1000), key, value, headers)


def test_parse_time():
    assert parse_time("24h", NOW) == NOW - timedelta(hours=24)
    assert parse_time("30m", NOW) == NOW - timedelta(minutes=30)
    assert parse_time("7d", NOW) == NOW - timedelta(days=7)
    assert parse_time("2026-11-28T08:00:00+01:00") == datetime(2026, 11, 28, 7, tzinfo=timezone.utc)
    assert parse_time("2026-11-28T08:00:00Z") == datetime(2026, 11, 28, 8, tzinfo=timezone.utc)
    with pytest.raises(DlqError, match="no UTC offset"):
        parse_time("2026-11-28T08:00:00")
    with pytest.raises(DlqError, match="cannot read time"):
        parse_time("yesterday")


def test_parse_id():
    assert parse_id("1:7") == (1, 7)
    assert parse_id("dead-letter/1/7") == (1, 7)
    with pytest.raises(DlqError):
        parse_id("seven")


def test_filter():
    d = dl()
    assert Filter().matches(d) and Filter().empty
    assert Filter(reasons=frozenset({"unknown_loinc"})).matches(d)
    assert not Filter(reasons=frozenset({"not_utf8"})).matches(d)
    assert Filter(source_topics=frozenset({"lab-results"})).matches(d)
    assert not Filter(source_topics=frozenset({"mllp"})).matches(d)
    assert Filter(since=NOW - timedelta(minutes=1), until=NOW + timedelta(minutes=1)).matches(d)
    assert not Filter(since=NOW + timedelta(seconds=1)).matches(d)
    assert not Filter(until=NOW).matches(d)  # until is exclusive
    assert Filter(ids=frozenset({(1, 7)})).matches(d) and not Filter(ids=frozenset({(1, 8)})).matches(d)


def test_headers_and_summary_hide_key_and_payload():
    d = dl()
    assert d.reason == "unknown_loinc" and d.source_topic == "lab-results" and d.source() == "lab-results[2]@40"
    assert d.coordinates == "dead-letter/1/7" and d.id == "1:7"
    s = d.summary()
    assert s["source_partition"] == 2 and s["source_offset"] == 40 and s["size"] == 8
    assert "key" not in s and "value_text" not in s
    detail = d.detail()
    assert detail["key"] == "p-1" and detail["value_text"] == '{"a": 1}' and detail["value_base64"] is None


def test_binary_payload_is_shown_as_hex_and_base64():
    d = dl(value=b"\xff\xfe\x00bin")
    assert decode_text(d.value) is None
    assert d.detail()["value_base64"] == "//4AYmlu"
    assert "ff fe 00 62 69 6e" in format_detail(d)
    assert decode_text("MSH|^~\\&|LAB\rPID|||1".encode()) is not None  # HL7 (CR separators) is text


def test_table():
    text = format_table([dl(1), dl(2, reason=Reason.NOT_UTF8)])
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["ID", "DEAD-LETTERED", "AT"]
    assert "unknown_loinc" in lines[1] and "not_utf8" in lines[2] and lines[-1] == "2 dead letter(s)"


def test_replay_targets_and_ledger_name():
    s = Settings.model_construct()
    assert replay_target(dl(), s) == "lab-results"
    assert replay_target(dl(source="mllp"), s) == s.topic_lab_results
    assert replay_target(dl(source=""), s) is None
    # only inputs: a dead letter's source comes from the record that failed (a header on the
    # patient stream), and a replay must never write the service's outputs
    for src in ("treatments", "alert-actions", "observations", "vital-signs"):
        assert replay_target(dl(source=src), s) == src
    for src in ("alerts", "alert-deliveries", "open-alerts", "findings", "dead-letter", "patients-load", "x"):
        assert replay_target(dl(source=src), s) is None, src
    named = Settings.model_construct(topic_treatments="site-treatments")
    assert replay_target(dl(source="site-treatments"), named) == "site-treatments"
    assert replay_target(dl(source="treatments"), named) is None
    assert replay_ledger_topic(s) == "dead-letter-replays"
    assert replay_ledger_topic(Settings.model_construct(topic_dead_letter_replays="x")) == "x"


def test_ledger_entry_must_match_coordinates_and_time():
    from monitor.dlq_tool import ledger_entry_for
    from schemas.replay import ReplayLedgerEntry

    d = dl()
    entry = json.loads(ReplayLedgerEntry(dead_letter=d.coordinates, dead_lettered_at=d.dead_lettered_at,
                                         reason=d.reason, replayed_to="lab-results", partition=0, offset=3,
                                         replayed_at=NOW).model_dump_json())
    assert ledger_entry_for(d, {d.coordinates: entry}) == entry
    assert ledger_entry_for(dl(offset=8), {d.coordinates: entry}) is None
    # the same coordinates in a re-created dead-letter topic: a different record, not replayed yet
    recreated = dl(at=NOW + timedelta(days=3))
    assert ledger_entry_for(recreated, {d.coordinates: entry}) is None
