"""Ingest's write-order merge across input partitions (monitor.write_order), without a broker."""
from __future__ import annotations

from collections import namedtuple

from monitor.write_order import WriteOrderMerge

R = namedtuple("R", "tp offset timestamp")


def recs(tp, *timestamps):
    return [R(tp, i, t) for i, t in enumerate(timestamps)]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_backlog_handed_out_partition_by_partition_comes_out_in_write_order():
    m = WriteOrderMerge()
    labs, doses = "labs", "doses"
    # aiokafka returns the whole lab backlog first; the dose partition is not caught up yet
    m.add({labs: recs(labs, 10, 20, 30, 40)})
    assert m.take([labs, doses], caught_up={labs}, limit=100) == []  # the dose may be older
    m.add({doses: recs(doses, 15)})
    out = m.take([labs, doses], caught_up={labs, doses}, limit=100)
    assert [(r.tp, r.timestamp) for r in out] == [("labs", 10), ("doses", 15), ("labs", 20), ("labs", 30),
                                                    ("labs", 40)]
    assert len(m) == 0


def test_release_stops_where_a_partition_that_is_not_caught_up_runs_dry():
    m = WriteOrderMerge()
    m.add({"a": recs("a", 1, 5, 9), "b": recs("b", 2)})
    out = m.take(["a", "b"], caught_up={"a"}, limit=100)
    # after b's only record, b's next one may be older than a's 5
    assert [r.timestamp for r in out] == [1, 2]
    assert len(m) == 2


def test_a_silent_partition_holds_the_others_back_only_for_max_hold():
    clock = Clock()
    m = WriteOrderMerge(max_hold=1.0, clock=clock)
    m.add({"a": recs("a", 1, 2)})
    assert m.take(["a", "b"], caught_up=set(), limit=100) == []
    clock.t = 0.8
    m.add({"a": [R("a", 2, 3)]})  # a backlog still arriving: keep waiting for b
    clock.t = 1.5
    assert m.take(["a", "b"], caught_up=set(), limit=100) == []
    clock.t = 1.9
    assert [r.timestamp for r in m.take(["a", "b"], caught_up=set(), limit=100)] == [1, 2, 3]


def test_limit_and_revoked_partitions():
    m = WriteOrderMerge()
    m.add({"a": recs("a", 1, 2, 3), "gone": recs("gone", 0)})
    out = m.take(["a"], caught_up={"a"}, limit=2)
    assert [r.timestamp for r in out] == [1, 2] and "gone" not in m.buffers


def test_within_one_timestamp_the_priority_partition_goes_first():
    m = WriteOrderMerge(priority=lambda tp: 0 if tp == "doses" else 1)
    m.add({"vitals": recs("vitals", 7, 7, 8), "doses": recs("doses", 7)})
    out = m.take(["vitals", "doses"], caught_up={"vitals", "doses"}, limit=10)
    assert [(r.tp, r.timestamp) for r in out] == [("doses", 7), ("vitals", 7), ("vitals", 7), ("vitals", 8)]


def test_ingest_does_not_wait_for_a_fetch_while_the_merge_can_release_a_batch():
    """After a full batch the merge may still hold records it can release at once: the next
    ``getmany`` must not wait for new records (it waited 50 ms, and a backlog ran at half the
    raw loop's rate); a merge waiting for a partition may wait, an empty one longer."""
    from monitor.ingest import IngestService

    wait = IngestService.fetch_wait_ms
    m = WriteOrderMerge()
    labs, vitals = "labs", "vitals"
    m.add({labs: recs(labs, *range(0, 60, 2)), vitals: recs(vitals, *range(1, 61, 2))})
    batch = m.take([labs, vitals], caught_up={labs, vitals}, limit=20)
    assert len(batch) == 20
    assert wait(len(m), last_batch_full=len(batch) >= 20) == 0
    assert len(m.take([labs, vitals], caught_up={labs, vitals}, limit=20)) == 20  # released without a fetch
    # the rest is blocked on a partition not caught up and empty: waiting for its records is right
    m.add({vitals: recs(vitals, 100)})
    rest = m.take([labs, vitals, "doses"], caught_up={labs, vitals}, limit=20)
    assert rest == [] and len(m) > 0
    assert wait(len(m), last_batch_full=False) == 50
    assert wait(0, last_batch_full=False) == 200
