"""Per-component Kafka identities, enforced by a real broker (security review H4).

A dedicated broker with SASL/SCRAM users and the StandardAuthorizer (no ACL: no access)
gets exactly the ACLs of ``deploy/k8s/base/kafka-user.yaml`` (each Strimzi KafkaUser
translated into Kafka ACL bindings). Then, over the SASL listener: the inbox's identity
writes ``alert-actions`` and reads ``alerts`` but cannot write ``alerts`` or the delivery
ledger; MLLP's cannot write ``alerts`` or ``alert-actions``; the worker's writes ``alerts``,
the ledger and findings but not ``alert-actions``.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
import yaml

from kafka_broker import add_scram_users, admin_client, create_topics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOPICS = ["lab-results", "vital-signs", "liver-function", "treatments", "observations", "dead-letter", "findings",
          "alerts", "alert-actions", "alert-deliveries", "open-alerts", "patient-ticks", "patients"]


def manifest_users() -> dict[str, list[dict]]:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/base/kafka-user.yaml").read_text()) if d]
    return {d["metadata"]["name"]: d["spec"]["authorization"]["acls"] for d in docs if d["kind"] == "KafkaUser"}


def acl_bindings(user: str, acls: list[dict]):
    """Strimzi ``simple`` ACLs -> kafka-python ACL objects (allow, any host)."""
    from kafka.admin import ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ResourcePattern, ResourceType

    out = []
    for acl in acls:
        res = acl["resource"]
        rtype = {"topic": ResourceType.TOPIC, "group": ResourceType.GROUP, "cluster": ResourceType.CLUSTER}[res["type"]]
        name = res.get("name", "kafka-cluster")
        ptype = ACLResourcePatternType.PREFIXED if res.get("patternType") == "prefix" else ACLResourcePatternType.LITERAL
        for op in acl["operations"]:
            operation = ACLOperation[{"DescribeConfigs": "DESCRIBE_CONFIGS"}.get(op, op.upper())]
            out.append(ACL(principal=f"User:{user}", host="*", operation=operation,
                           permission_type=ACLPermissionType.ALLOW,
                           resource_pattern=ResourcePattern(rtype, name, ptype)))
    return out


@pytest.fixture(scope="module")
def acl_broker(secured_broker):
    """The secured broker (reliability/conftest.py, shared with test_security) with the
    manifest's users, their ACLs and the service topics (a probe record in each)."""
    broker = secured_broker["broker"]
    users = manifest_users()
    passwords = {u: f"{u}-{uuid.uuid4().hex}" for u in users}
    add_scram_users(broker.bootstrap, passwords)
    create_topics(broker.bootstrap, TOPICS, partitions=1)
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=broker.bootstrap)  # the super user (PLAINTEXT listener)
    for t in TOPICS:
        p.send(t, b'{"seed": true}')
    p.flush()
    p.close()
    admin = admin_client(broker.bootstrap)
    try:
        bindings = [b for u, acls in users.items() for b in acl_bindings(u, acls)]
        res = admin.create_acls(bindings)
        assert not res["failed"], res["failed"]
    finally:
        admin.close()
    time.sleep(1)  # credentials and ACLs reach the SASL listener
    return broker, passwords


def _producer(broker, passwords, user):
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=broker.sasl_bootstrap, security_protocol="SASL_PLAINTEXT",
                         sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=user,
                         sasl_plain_password=passwords[user], acks="all", max_block_ms=10_000,
                         retries=0, request_timeout_ms=10_000)


def can_write(broker, passwords, user: str, topic: str) -> bool:
    import kafka.errors as Errors

    p = _producer(broker, passwords, user)
    try:
        p.send(topic, key=b"p1", value=b'{"probe": true}').get(timeout=15)
        return True
    except (Errors.TopicAuthorizationFailedError, Errors.KafkaTimeoutError) as exc:
        # kafka-python reports a topic it may not describe/write as an authorisation error
        # (or, for metadata it may not see, a metadata timeout); anything else is a failure
        assert not isinstance(exc, Errors.KafkaTimeoutError) or "metadata" in str(exc).lower(), exc
        return False
    finally:
        p.close(timeout=5)


def describe_refused(broker, passwords, user: str, topic: str) -> bool:
    """The broker refuses ``user`` Describe on ``topic`` (metadata answers
    TOPIC_AUTHORIZATION_FAILED). Kafka's authorizer allows Describe to every principal allowed
    Read (or Write), so a refused Describe is a refused Read, answered at once."""
    from kafka import KafkaAdminClient
    import kafka.errors as Errors

    admin = KafkaAdminClient(bootstrap_servers=broker.sasl_bootstrap, security_protocol="SASL_PLAINTEXT",
                             sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=user,
                             sasl_plain_password=passwords[user], request_timeout_ms=10_000)
    try:
        (described,) = admin.describe_topics([topic])
        return described["error_code"] == Errors.TopicAuthorizationFailedError.errno
    finally:
        admin.close()


def can_read(broker, passwords, user: str, topic: str) -> bool:
    from kafka import KafkaConsumer, TopicPartition
    import kafka.errors as Errors

    if describe_refused(broker, passwords, user, topic):
        return False  # (a consumer fetches nothing then: kafka-python only logs the refusal)
    c = KafkaConsumer(bootstrap_servers=broker.sasl_bootstrap, security_protocol="SASL_PLAINTEXT",
                      sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=user, sasl_plain_password=passwords[user],
                      group_id=None, enable_auto_commit=False, consumer_timeout_ms=3000, auto_offset_reset="earliest")
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        c.seek(tp, 0)  # a probe record is at offset 0 of every topic the test reads
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if c.poll(timeout_ms=500).get(tp):
                return True
        return False  # nothing fetched: the broker refused (kafka-python only logs it)
    except Errors.TopicAuthorizationFailedError:
        return False
    finally:
        c.close()


def test_each_component_writes_only_its_own_topics(acl_broker):
    broker, passwords = acl_broker
    assert set(passwords) == {"sma-monitor", "sma-monitor-inbox", "sma-monitor-mllp"}
    # the inbox: actions only; it cannot forge alerts or pre-write the delivery ledger
    assert can_write(broker, passwords, "sma-monitor-inbox", "alert-actions")
    assert not can_write(broker, passwords, "sma-monitor-inbox", "alerts")
    assert not can_write(broker, passwords, "sma-monitor-inbox", "alert-deliveries")
    assert not can_write(broker, passwords, "sma-monitor-inbox", "open-alerts")  # what Alertmanager is re-sent
    assert not can_write(broker, passwords, "sma-monitor-inbox", "observations")
    assert can_read(broker, passwords, "sma-monitor-inbox", "alerts")
    assert not can_read(broker, passwords, "sma-monitor-inbox", "alert-deliveries")
    # MLLP: its inputs only
    assert can_write(broker, passwords, "sma-monitor-mllp", "observations")
    assert not can_write(broker, passwords, "sma-monitor-mllp", "alerts")
    assert not can_write(broker, passwords, "sma-monitor-mllp", "alert-actions")
    assert not can_read(broker, passwords, "sma-monitor-mllp", "observations")
    # the worker writes what only it writes, and no actions
    for topic in ("alerts", "alert-deliveries", "open-alerts", "findings", "observations"):
        assert can_write(broker, passwords, "sma-monitor", topic), topic
    assert can_read(broker, passwords, "sma-monitor", "open-alerts")
    assert not can_write(broker, passwords, "sma-monitor", "alert-actions")
    assert can_read(broker, passwords, "sma-monitor", "alert-actions")
