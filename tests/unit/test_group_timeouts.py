"""The group consumers' timeouts (``monitor.kafka_batch.group_timeouts``): a heartbeat every
second, or a third of the session when that is shorter, so a joining worker's rebalance
starts within a second instead of up to a third of the session."""
from __future__ import annotations

import pytest

from monitor.kafka_batch import group_timeouts
from monitor.settings import Settings


@pytest.mark.parametrize("session, heartbeat_ms", [(10.0, 1000), (6.0, 1000), (45.0, 1000), (3.0, 1000),
                                                   (1.5, 500), (0.9, 300)])
def test_heartbeat_every_second_or_a_third_of_a_shorter_session(session, heartbeat_ms):
    t = group_timeouts(Settings(kafka_session_timeout_seconds=session))
    assert t["session_timeout_ms"] == int(session * 1000)
    assert t["heartbeat_interval_ms"] == heartbeat_ms
    # the broker refuses a heartbeat interval that is not below the session timeout
    assert t["heartbeat_interval_ms"] * 3 <= t["session_timeout_ms"]


def test_the_default_session_is_ten_seconds_with_a_heartbeat_each_second():
    t = group_timeouts(Settings(_env_file=None))
    assert (t["session_timeout_ms"], t["heartbeat_interval_ms"]) == (10_000, 1000)
    assert t["max_poll_interval_ms"] == 300_000
