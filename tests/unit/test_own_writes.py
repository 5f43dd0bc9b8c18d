"""This worker's ingest's acknowledged writes, taken by its clinical stage in offset order
(``monitor.clinical.own_writes``): only records that continue the position without a hole
are taken, each once, in order; a hole (someone else's record in between) is reported."""
from __future__ import annotations

from monitor.clinical.own_writes import OwnWrites


def recs(n: int, tag: str = "r") -> list:
    return [(f"p{i}".encode(), f"{tag}{i}".encode(), [("k", b"v")] if i == 0 else None) for i in range(n)]


def offsets(taken) -> list[int]:
    return [r.offset for r in taken]


def test_offers_that_continue_the_position_are_taken_in_offset_order_each_once():
    w = OwnWrites("observations")
    w.offer(0, 10, recs(3))
    w.offer(0, 13, recs(2, "s"))
    taken = w.take(0, 10, 100)
    assert offsets(taken) == [10, 11, 12, 13, 14]
    assert [r.value for r in taken] == [b"r0", b"r1", b"r2", b"s0", b"s1"]
    assert taken[0].headers == (("k", b"v"),) and taken[1].headers == ()
    assert {r.topic for r in taken} == {"observations"} and {r.partition for r in taken} == {0}
    assert w.take(0, 15, 100) == [] and len(w) == 0
    assert w.taken == 5 and w.offered == 5


def test_offers_acknowledged_out_of_order_are_still_taken_in_offset_order():
    w = OwnWrites("s")
    w.offer(1, 5, recs(2, "b"))
    w.offer(1, 3, recs(2, "a"))
    assert w.covered(1, 3) == 7
    assert [r.value for r in w.take(1, 3, 10)] == [b"a0", b"a1", b"b0", b"b1"]


def test_a_limit_takes_part_of_an_offer_and_the_rest_stays_from_the_new_position():
    w = OwnWrites("s")
    w.offer(0, 0, recs(5))
    assert offsets(w.take(0, 0, 2)) == [0, 1]
    assert len(w) == 3 and w.covered(0, 2) == 5
    assert offsets(w.take(0, 2, 10)) == [2, 3, 4]


def test_a_position_inside_an_offer_starts_there_and_what_is_before_it_is_dropped():
    w = OwnWrites("s")
    w.offer(0, 100, recs(4))
    w.offer(0, 90, recs(5))  # wholly before the position: never taken
    assert offsets(w.take(0, 102, 10)) == [102, 103]
    assert len(w) == 0


def test_a_record_nobody_offered_is_a_hole_and_nothing_after_it_is_taken():
    w = OwnWrites("s")
    w.offer(0, 10, recs(2))
    w.offer(0, 13, recs(2))  # offset 12 was written by someone else
    assert offsets(w.take(0, 10, 100)) == [10, 11]
    assert w.take(0, 12, 100) == []
    assert w.hole(0, 12) and w.pending(0, 12)
    assert not w.continues(0, 12) and w.covered(0, 12) == 12
    # fetched from the broker up to 13: the offer continues the position again
    assert w.continues(0, 13) and offsets(w.take(0, 13, 100)) == [13, 14]


def test_no_offer_past_the_position_is_no_hole():
    w = OwnWrites("s")
    assert not w.hole(0, 5) and not w.pending(0, 5)
    w.offer(0, 0, recs(5))
    assert w.pending(0, 3) and not w.hole(0, 3)
    assert not w.hole(0, 5) and not w.pending(0, 5)  # everything offered is before the position: dropped
    assert len(w) == 0


def test_partitions_are_independent_and_only_owned_ones_are_held():
    w = OwnWrites("s", owned=lambda p: p != 2)
    w.offer(0, 0, recs(2))
    w.offer(1, 7, recs(1))
    w.offer(2, 0, recs(3))  # another worker's clinical stage owns it
    assert len(w) == 3
    assert offsets(w.take(1, 7, 10)) == [7]
    assert offsets(w.take(0, 0, 10)) == [0, 1]
    assert w.take(2, 0, 10) == []


def test_the_capacity_drops_the_oldest_offers_of_the_fullest_partition():
    w = OwnWrites("s", capacity=10)
    w.offer(0, 0, recs(4))
    w.offer(0, 4, recs(4))
    w.offer(1, 0, recs(2))
    w.offer(0, 8, recs(3))  # 13 held: the oldest of partition 0 goes
    assert len(w) == 9 and w.dropped == 4
    assert w.take(0, 0, 100) == []  # its first records are fetched instead
    assert w.hole(0, 0)
    assert offsets(w.take(0, 4, 100)) == list(range(4, 11))
    assert offsets(w.take(1, 0, 100)) == [0, 1]


def test_retain_forgets_the_partitions_no_longer_owned():
    w = OwnWrites("s")
    w.offer(0, 0, recs(2))
    w.offer(1, 0, recs(3))
    w.retain([1])
    assert len(w) == 3 and w.take(0, 0, 10) == []
    assert offsets(w.take(1, 0, 10)) == [0, 1, 2]


def test_an_offer_wakes_the_runner_and_a_repeated_offer_is_held_once():
    woken = []
    w = OwnWrites("s", notify=lambda: woken.append(1))
    w.offer(0, 0, recs(2))
    w.offer(0, 0, recs(2))
    w.offer(0, 2, [])
    assert len(w) == 2 and len(woken) == 1


def test_reached_is_the_end_of_the_newest_offer_even_once_taken():
    w = OwnWrites("s")
    assert not w.reached(0, 0)
    w.offer(0, 10, recs(3))
    w.offer(0, 5, recs(2))  # an older offer acknowledged later
    assert w.reached(0, 13) and not w.reached(0, 12) and not w.reached(0, 7)
    w.take(0, 10, 10)
    assert w.reached(0, 13)
    w.retain([])
    assert not w.reached(0, 13)
