"""One severity ranking (architecture review, semantic duplicate 4): every module that
orders severities takes the order from ``schemas.findings.SEVERITY_ORDER``."""
from __future__ import annotations

import alerts.replay as replay
import alerts.routing as routing
import alerts.rules as rules
import alerts.scenarios as scenarios
import monitor.inbox.metrics as inbox_metrics
import monitor.simulate as simulate
from schemas.findings import SEVERITY_ORDER, SEVERITY_RANK, Severity


def test_the_order_is_least_to_most_urgent_and_rank_is_its_index():
    assert [s.value for s in SEVERITY_ORDER] == ["info", "warning", "high", "critical"]
    assert set(SEVERITY_ORDER) == set(Severity)
    for i, s in enumerate(SEVERITY_ORDER):
        assert s.rank == i
        assert SEVERITY_RANK[s] == SEVERITY_RANK[s.value] == i  # by member and by JSON value


def test_every_module_orders_severities_alike():
    names = tuple(s.value for s in SEVERITY_ORDER)
    assert tuple(rules.SEV_BY_RANK) == SEVERITY_ORDER
    assert tuple(routing._URGENCY_ORDER) == SEVERITY_ORDER
    assert replay.SEVERITIES == scenarios.SEVERITIES == simulate.SEVERITIES == names
    assert replay.SEV_RANK == simulate.SEV_RANK == SEVERITY_RANK
    assert inbox_metrics._SEVERITIES == names[::-1]
    # pages: warning and above (the replay's count of paging episodes)
    assert replay.PAGE_SEVERITIES == {"warning", "high", "critical"}
