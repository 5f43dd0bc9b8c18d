"""Readers that ask kafka-python for a topic's partitions: an empty answer is asked again.

kafka-python's ``partitions_for_topic`` gives the same empty set for a topic that does not
exist and for one the metadata left out for a moment (just created, a leader being elected).
A protocol replay used to take that at its word and report "0 patients" (exit status 0), for
a patient stream the brokers did not have as for one they had not yet listed. These tests
drive the retry with a stand-in for the consumer's one call; the real broker's side is in
``tests/integration/test_replay_broker.py``.
"""
from __future__ import annotations

import time

import pytest

import monitor.dlq_tool as dlq_tool
from monitor.topics_admin import topic_partitions


class Metadata:
    """``partitions_for_topic`` answering empty ``misses`` times, then ``parts``."""

    def __init__(self, misses: int, parts: set[int]) -> None:
        self.misses, self.parts, self.asked = misses, parts, 0

    def partitions_for_topic(self, topic: str) -> set[int]:
        self.asked += 1
        return set() if self.asked <= self.misses else set(self.parts)


def test_a_topic_missing_from_the_first_answers_is_asked_for_again():
    meta = Metadata(misses=3, parts={0, 1, 2})
    assert topic_partitions(meta, "p.observations", wait=10.0) == {0, 1, 2}
    assert meta.asked == 4


def test_a_topic_that_never_shows_gives_an_empty_set_once_the_wait_is_over():
    meta = Metadata(misses=10**6, parts={0})
    t0 = time.monotonic()
    assert topic_partitions(meta, "absent", wait=0.5) == set()
    assert time.monotonic() - t0 >= 0.5
    assert meta.asked >= 2  # asked again, not only once


def test_no_wait_asks_once():
    meta = Metadata(misses=1, parts={0})
    assert topic_partitions(meta, "maybe", wait=0.0) == set()
    assert meta.asked == 1


def test_the_dead_letter_reader_waits_for_a_topic_that_must_exist_and_then_fails_loudly(monkeypatch):
    monkeypatch.setattr(dlq_tool, "TOPIC_METADATA_WAIT_SECONDS", 0.3)

    class Consumer(Metadata):
        def assign(self, tps):
            self.assigned = tps

        def end_offsets(self, tps):
            return {tp: 0 for tp in tps}

        def beginning_offsets(self, tps):
            return {tp: 0 for tp in tps}

        def seek(self, tp, offset):
            pass

    late = Consumer(misses=2, parts={0})
    assert list(dlq_tool.read_topic(late, "dead-letter")) == []  # empty, but read: it is there
    assert [tp.partition for tp in late.assigned] == [0]
    with pytest.raises(dlq_tool.DlqError, match="does not exist"):
        list(dlq_tool.read_topic(Consumer(misses=10**6, parts={0}), "dead-letter"))
    # a ledger that may not exist yet (nothing replayed so far) is asked for once
    absent = Consumer(misses=10**6, parts={0})
    assert dlq_tool.read_ledger(absent, "dead-letter-replays") == {}
    assert absent.asked == 1
    # after a replay made sure of it, a ledger the metadata leaves out is not "nothing replayed"
    with pytest.raises(dlq_tool.DlqError):
        dlq_tool.read_ledger(Consumer(misses=10**6, parts={0}), "dead-letter-replays", must_exist=True)
