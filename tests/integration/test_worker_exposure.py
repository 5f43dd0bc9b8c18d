"""Security review M7: a worker whose web port is not on loopback serves metrics and
health (Prometheus, probes) but its actions API refuses HTTP Basic in cleartext: a real
worker process, a real broker."""
from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid

import pytest

from monitor.inbox.auth import hash_password
from workers import SERVICE_TOPICS, service_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_actions_api_is_off_on_a_non_loopback_bind(topic_factory, worker_factory, tmp_path):
    prefix = f"exp{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*SERVICE_TOPICS.values(), prefix=prefix)
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"users": [{"username": "nurse1", "role": "nurse",
                                            "password_hash": hash_password("nurse-pass-1", n=2**14)}]}))
    w = worker_factory(service_env(topics, app_id=prefix, INBOX_USERS_FILE=str(users), WEB_HOST="0.0.0.0",
                                   TICK_INTERVAL_SECONDS="600"))
    token = base64.b64encode(b"nurse1:nurse-pass-1").decode()
    req = urllib.request.Request(w.url + "/api/alerts/" + "a" * 32 + "/actions", method="POST",
                                 data=b'{"action": "acknowledge"}',
                                 headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=10)
    assert ei.value.code == 503 and "not bound to loopback" in json.loads(ei.value.read())["error"]
    assert w.get("/metrics")[0] == 200 and w.get("/healthz")[0] == 200
