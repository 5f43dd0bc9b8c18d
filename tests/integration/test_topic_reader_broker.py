"""The tests' reader of a JSON topic (``kafka_broker.JsonTopicReader``), on a real broker:
it reads every partition of a topic created moments before, from the beginning, and a
``wait_for`` that times out says how many records the broker holds against how many were
read (a failure then tells "nothing was written" from "nothing was read")."""
from __future__ import annotations

import json

import pytest
from kafka import KafkaProducer
from kafka_broker import JsonTopicReader

pytestmark = pytest.mark.integration


def test_reads_every_partition_of_a_new_topic_and_a_timeout_names_what_the_broker_holds(kafka_bootstrap,
                                                                                        topic_factory):
    topic = topic_factory("json", partitions=4)["json"]
    reader = JsonTopicReader(kafka_bootstrap, topic)  # right after creation, before anything is written
    try:
        p = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        for i in range(8):  # two per partition
            p.send(topic, value=json.dumps({"n": i}).encode(), partition=i % 4)
        p.flush()
        p.close()
        reader.wait_for(lambda x: len(reader.items) >= 8, timeout=30)
        assert sorted(x["n"] for x in reader.items) == list(range(8))
        with pytest.raises(AssertionError, match=r"8 records on the broker, 8 read"):
            reader.wait_for(lambda x: x["n"] == 99, timeout=1)
    finally:
        reader.close()
