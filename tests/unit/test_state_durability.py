"""The clinical agent's state-durability rules, without a broker:

- which cached patients survive a rebalance (``monitor.ownership.stale_partitions``);
- ``ConfirmedTable.confirm_changelog`` waits for every changelog write and resends the
  ones the broker refused, so no batch is acknowledged before its state is on the broker.
"""
from __future__ import annotations

import asyncio

import faust
import pytest

from monitor.confirmed_table import ConfirmedTable
from monitor.ownership import kept_partitions


def test_partitions_held_in_consecutive_generations_stay_cached():
    assert kept_partitions(3, frozenset({0, 1}), 4, frozenset({0, 1, 2, 3})) == {0, 1}


def test_partitions_given_away_are_stale():
    assert kept_partitions(3, frozenset({0, 1, 2, 3}), 4, frozenset({0, 1})) == {0, 1}
    assert not {2, 3} & kept_partitions(3, frozenset({0, 1, 2, 3}), 4, frozenset({0, 1}))


def test_a_missed_generation_makes_every_cached_partition_stale():
    # expelled at generation 4, rejoined at 5: partition 1 may have been another worker's
    assert kept_partitions(3, frozenset({0, 1}), 5, frozenset({0, 1})) == frozenset()


def test_first_assignment_keeps_nothing():
    assert kept_partitions(None, frozenset(), 1, frozenset({0})) == frozenset()


@pytest.fixture()
def table():
    app = faust.App("durability-unit", broker="kafka://127.0.0.1:1", store="memory://", autodiscover=False)
    return ConfirmedTable(app, name="patients", beacon=app.tables.beacon, default=None)


def test_confirm_waits_for_writes_and_resends_refused_ones(table, monkeypatch):
    async def scenario():
        loop = asyncio.get_running_loop()
        sent: list[tuple] = []
        futures: list[asyncio.Future] = []

        def fake_send(self, partition, key, value, key_serializer=None, value_serializer=None):
            sent.append((partition, key, value))
            fut = loop.create_future()
            futures.append(fut)
            return fut

        monkeypatch.setattr(faust.Table, "send_changelog", fake_send)
        table.send_changelog(2, "p1", {"v": 1})
        table.send_changelog(3, "p2", {"v": 2})
        assert table.unconfirmed == 2

        confirm = asyncio.ensure_future(table.confirm_changelog(max_delay=0.01))
        await asyncio.sleep(0.05)
        assert not confirm.done(), "confirm returned before the broker answered"
        futures[0].set_result("ok")
        futures[1].set_exception(RuntimeError("NotLeaderForPartition"))
        for _ in range(200):  # the refused write is sent again after the backoff
            if len(sent) == 3:
                break
            await asyncio.sleep(0.01)
        assert sent[2] == (3, "p2", {"v": 2})
        assert not confirm.done()
        futures[2].set_result("ok")
        assert await asyncio.wait_for(confirm, 5) == 2
        assert table.unconfirmed == 0

    asyncio.run(scenario())


def test_offset_continuity_reports_the_missing_offsets():
    from monitor.ownership import OffsetContinuity
    c = OffsetContinuity()
    assert c.observe("t", 0, 40) == ("next", None)   # the first after a seek
    assert c.observe("t", 0, 41) == ("next", None)
    assert c.observe("t", 1, 7) == ("next", None)     # partitions are independent
    assert c.observe("t", 0, 44) == ("gap", range(42, 44))
    assert c.observe("t", 0, 43) == ("repeat", None)
    c.reset()
    assert c.observe("t", 0, 10) == ("next", None)


def test_offset_continuity_keeps_partitions_held_across_a_rebalance():
    from monitor.ownership import OffsetContinuity
    c = OffsetContinuity()
    c.observe("t", 0, 5)
    c.observe("t", 1, 9)
    c.reset(keep_partitions={1})
    assert c.observe("t", 1, 9) == ("repeat", None)  # faust re-delivers from the commit
    assert c.observe("t", 0, 3) == ("next", None)    # partition 0 starts afresh
