"""The reader the clinical agent uses for records the stream never delivered, against the
real broker: it returns exactly the asked offsets with their bytes, in order, never
commits, and reports log end, log start and the group's committed offset."""
from __future__ import annotations

import asyncio
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from monitor.skipped_records import SkippedRecordReader

pytestmark = pytest.mark.integration


def test_reads_exactly_the_missing_offsets(kafka_bootstrap, topic_factory):
    topic = topic_factory("observations", partitions=2)["observations"]
    group = f"g{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    for i in range(10):
        producer.send(topic, key=f"p{i}".encode(), value=f"record-{i}".encode(), partition=1)
    producer.flush()
    producer.close()
    # the group has committed offset 4 on partition 1 (as faust would have)
    committer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    tp = TopicPartition(topic, 1)
    committer.assign([tp])
    from kafka.structs import OffsetAndMetadata
    committer.commit({tp: OffsetAndMetadata(4, "", -1)})
    committer.close()

    async def scenario():
        reader = SkippedRecordReader({"bootstrap_servers": kafka_bootstrap}, group, 1 << 20)
        try:
            records = await reader.read(topic, 1, range(3, 7))
            positions = await reader.positions([(topic, 0), (topic, 1)], need_committed={(topic, 1)})
            past_end = await reader.read(topic, 1, range(9, 12), timeout=5)
            return records, positions, past_end
        finally:
            await reader.stop()

    records, positions, past_end = asyncio.run(scenario())
    assert [r.offset for r in records] == [3, 4, 5, 6]
    assert [r.value for r in records] == [b"record-3", b"record-4", b"record-5", b"record-6"]
    assert all(r.topic == topic and r.partition == 1 for r in records)
    assert positions[(topic, 1)] == (10, 4, 0)
    assert positions[(topic, 0)] == (0, None, 0)
    assert [r.offset for r in past_end] == [9]  # what the log holds, no more
    # reading never moved the group's committed offset
    check = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    assert check.committed(tp) == 4
    check.close()
