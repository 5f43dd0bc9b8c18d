"""The local Apache Kafka broker (deploy/local/kafka.sh) really works:
create a topic, produce 100 records with acks=all, read exactly those back
through a consumer group, delete the topic, stop the broker."""

from __future__ import annotations

import time
import uuid

import pytest

try:  # tests/conftest.py puts tests/ on sys.path
    from kafka_broker import _pid_alive, _port_open, create_topics, delete_topics, ensure_broker
except ImportError:
    from tests.kafka_broker import _pid_alive, _port_open, create_topics, delete_topics, ensure_broker

pytestmark = pytest.mark.integration

N_MESSAGES = 100


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> set[int]:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             client_id="test-kafka-broker-producer")
    try:
        futures = [producer.send(topic, key=str(i % 7).encode(), value=v) for i, v in enumerate(values)]
        producer.flush(timeout=30)
        metadata = [f.get(timeout=30) for f in futures]
    finally:
        producer.close(timeout=10)
    assert all(m.topic == topic and m.offset >= 0 for m in metadata)
    return {m.partition for m in metadata}


def _consume(bootstrap: str, topic: str, expected: int, timeout: float = 60.0) -> list[bytes]:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"test-kafka-broker-{uuid.uuid4().hex[:8]}",
        client_id="test-kafka-broker-consumer",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received: list[bytes] = []
    try:
        deadline = time.monotonic() + timeout
        while len(received) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(r.value for r in records)
        # Anything beyond `expected` would be a duplicate: give it a moment to show up.
        for records in consumer.poll(timeout_ms=500).values():
            received.extend(r.value for r in records)
        consumer.commit()
    finally:
        consumer.close()
    return received


def test_produce_100_consume_all_back():
    broker = ensure_broker()
    try:
        topic = f"test-broker-{uuid.uuid4().hex[:10]}"
        create_topics(broker.bootstrap, [topic], partitions=3)
        try:
            values = [f"message-{i:03d}".encode() for i in range(N_MESSAGES)]
            partitions_used = _produce(broker.bootstrap, topic, values)
            assert len(partitions_used) > 1, "keys should spread records over the 3 partitions"

            received = _consume(broker.bootstrap, topic, N_MESSAGES)

            assert len(received) == N_MESSAGES, f"got {len(received)} records, want {N_MESSAGES}"
            assert set(received) == set(values)
        finally:
            delete_topics(broker.bootstrap, [topic])
    finally:
        pid, port, owned = broker.pid, broker.port, broker.owned
        broker.stop()

    if owned:  # the dedicated broker is really gone, and so is its temp dir
        assert pid is not None and not _pid_alive(pid)
        assert not _port_open(port)
        assert broker.tmp_dir is None
