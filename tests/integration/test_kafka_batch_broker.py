"""``monitor.kafka_batch.produce_all`` writes one record batch per partition
(``create_batch``/``send_batch``) instead of one ``send()`` per record. On a real broker:
every keyed record lands on the partition ``send()`` (aiokafka's default murmur2
partitioner) gives the same key, records keep their order per partition, headers and
explicit partitions are kept, unkeyed and large records still go out, and the returned
metadata names each batch's last offset."""
from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from monitor.kafka_batch import produce_all

pytestmark = pytest.mark.integration


async def _read_all(bootstrap: str, topic: str, n: int) -> list:
    c = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                         enable_auto_commit=False)
    await c.start()
    out: list = []
    try:
        for _ in range(100):
            batch = await c.getmany(timeout_ms=200)
            for rs in batch.values():
                out.extend(rs)
            if len(out) >= n:
                break
    finally:
        await c.stop()
    return out


def test_batches_land_where_send_puts_them_in_order(kafka_bootstrap, topic_factory):
    topics = topic_factory("batched", "sent", partitions=5)

    async def go():
        p = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True,
                             max_batch_size=16 * 1024)  # small batches: several per partition
        await p.start()
        try:
            keys = [f"patient-{i % 37}".encode() for i in range(600)]
            recs = [(topics["batched"], k, f"{k.decode()}#{i}".encode() + b"x" * 100, [("n", str(i).encode())], None)
                    for i, k in enumerate(keys)]
            recs.append((topics["batched"], None, b"no key", None, None))
            recs.append((topics["batched"], b"patient-3", b"L" * 300_000, None, None))  # large: send()
            recs.append((topics["batched"], b"patient-3", b"after the large one", None, None))
            recs.append((topics["batched"], b"patient-5", b"explicit", None, 4))
            metas = await produce_all(p, recs)
            futs = [await p.send(topics["sent"], key=k, value=b"") for k in keys]
            sent = [f.partition for f in await asyncio.gather(*futs)]
        finally:
            await p.stop()
        return recs, metas, sent

    recs, metas, sent = asyncio.run(go())
    got = asyncio.run(_read_all(kafka_bootstrap, topics["batched"], len(recs)))
    assert len(got) == len(recs)
    where = {r.value: r for r in got}
    # keyed records: the partition send() chose for the same key
    for (_t, k, v, h, _p), part in zip(recs, sent):
        r = where[v]
        assert r.partition == part, (k, r.partition, part)
        assert list(r.headers) == h
    # order per partition is the order given
    for part in {r.partition for r in got}:
        mine = [r.value for r in sorted((r for r in got if r.partition == part), key=lambda r: r.offset)]
        given = [v for _t, _k, v, _h, _p in recs if where[v].partition == part]
        assert mine == given
    assert where[b"explicit"].partition == 4
    large, after = where[b"L" * 300_000], where[b"after the large one"]
    assert large.partition == after.partition and large.offset < after.offset
    # metadata: the last offset of each batch; the highest per partition is the partition's last record
    ends = {}
    for md in metas:
        ends[md.partition] = max(ends.get(md.partition, -1), md.offset)
    assert ends == {part: max(r.offset for r in got if r.partition == part) for part in {r.partition for r in got}}
