"""LOG_FORMAT=json: a real worker writes its log as JSON lines (for log shippers)."""
from __future__ import annotations

import json
import uuid

import pytest

from workers import service_env

pytestmark = pytest.mark.integration


def test_worker_logs_json_lines(topic_factory, worker_factory):
    prefix = f"jl{uuid.uuid4().hex[:8]}"
    topics = topic_factory("lab-results", "vital-signs", "liver-function", "treatments", "observations",
                           "dead-letter", "findings", "alerts", "alert-actions", "patient-ticks", prefix=prefix)
    w = worker_factory(service_env(topics, app_id=prefix, LOG_FORMAT="json", LOG_LEVEL="INFO"))
    w.stop()
    lines = [line for line in w.log_path.read_text(errors="replace").splitlines() if line.strip()]
    assert len(lines) >= 5, lines
    not_json = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            not_json.append(line)
            continue
        assert {"ts", "level", "logger", "message"} <= rec.keys()
    assert not_json == []
