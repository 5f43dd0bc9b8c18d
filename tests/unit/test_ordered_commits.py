"""``OrderedCommits`` (monitor/kafka_batch.py): commits in the order submitted, and with a
``min_interval`` the offsets submitted within it joined into one commit of the newest offset
per partition, sent by a timer when the interval is over or at ``drain``. The consumer here
only records the commits it is asked for (the real-broker behaviour of a commit is the
integration tests'); what is tested is which commits are sent, when and in what order."""
from __future__ import annotations

import asyncio

import pytest
from aiokafka.structs import TopicPartition

from monitor.kafka_batch import OrderedCommits, Positions

A, B = TopicPartition("lab-results", 0), TopicPartition("lab-results", 1)


class RecordingConsumer:
    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.commits: list[tuple[float, dict]] = []
        self.delay = delay
        self.fail = fail

    async def commit(self, offsets: dict) -> None:
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("commit refused")
        self.commits.append((asyncio.get_running_loop().time(), dict(offsets)))


def run(coro):
    return asyncio.run(coro)


def test_without_an_interval_every_submission_is_a_commit_in_order():
    async def go():
        c = RecordingConsumer(delay=0.01)
        commits = OrderedCommits(Positions(), "ingest", on_failure=lambda: failed.append(1))
        for off in (5, 9, 12):
            commits.submit(c, {A: off})
        await commits.drain()
        return c.commits

    failed: list[int] = []
    assert [o for _t, o in run(go())] == [{A: 5}, {A: 9}, {A: 12}]
    assert failed == []  # commits that succeed are not failures


def test_submissions_within_the_interval_join_one_commit_of_the_newest_offsets():
    async def go():
        c = RecordingConsumer()
        positions = Positions()
        commits = OrderedCommits(positions, "ingest", min_interval=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        commits.submit(c, {A: 5})  # the first goes at once (nothing sent for an interval)
        await asyncio.sleep(0.02)
        commits.submit(c, {A: 9, B: 3})
        commits.submit(c, {A: 12})
        await asyncio.sleep(0.05)
        assert len(c.commits) == 1  # the later two wait for the interval
        await asyncio.sleep(0.25)  # no more submissions: the timer sends them
        return t0, c.commits, positions.committed

    t0, sent, committed = run(go())
    assert [o for _t, o in sent] == [{A: 5}, {A: 12, B: 3}]
    assert sent[1][0] - t0 == pytest.approx(0.2, abs=0.05)
    assert committed == {A: 12, B: 3}


def test_drain_sends_what_waits_for_the_interval_and_reports_to_every_submitter():
    async def go():
        c = RecordingConsumer()
        commits = OrderedCommits(Positions(), "ingest", min_interval=60.0)
        results: list[tuple[str, bool]] = []
        commits.submit(c, {A: 1}, done=lambda ok: results.append(("first", ok)))
        commits.submit(c, {A: 2}, done=lambda ok: results.append(("second", ok)))
        commits.submit(c, {A: 3}, done=lambda ok: results.append(("third", ok)))
        await asyncio.sleep(0.01)
        assert [o for _t, o in c.commits] == [{A: 1}]
        await commits.drain()  # a revocation, a stop or a failed write: nothing waits 60 s
        return c.commits, results

    sent, results = run(go())
    assert [o for _t, o in sent] == [{A: 1}, {A: 3}]
    assert results == [("first", True), ("second", True), ("third", True)]


def test_a_refused_joined_commit_is_reported_to_each_of_its_submitters():
    async def go():
        c = RecordingConsumer(fail=True)
        positions = Positions()
        failures: list[int] = []
        commits = OrderedCommits(positions, "ingest", min_interval=60.0, on_failure=lambda: failures.append(1))
        results: list[bool] = []
        commits.submit(c, {A: 1}, done=results.append)
        commits.submit(c, {A: 2}, done=results.append)
        await commits.drain()
        return results, positions.committed, failures

    results, committed, failures = run(go())
    assert results == [False, False] and committed == {}
    # two commits were sent (the first at once, the second at drain), and each failure is
    # counted once (monitor_commit_failures_total)
    assert failures == [1, 1]
