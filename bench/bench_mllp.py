"""Messages/s through the MLLP listener into a real Kafka broker.

    .venv/bin/python bench/bench_mllp.py --bootstrap 127.0.0.1:9092 [--messages 2000] [--connections 4]

Starts the listener in-process on a free port with fresh topics, sends ORU^R01
messages (2 OBX each) from ``--connections`` concurrent MLLP connections (each waits
for its ACK before sending the next, as MLLP senders do), checks every ACK is AA and
prints the rate. Topics are deleted afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor.mllp import serve_mllp  # noqa: E402

ORU = (
    "MSH|^~\\&|LIS|CENTRAL LAB|MONITOR|GTX|20240502091500+0200||ORU^R01^ORU_R01|{ctl}|P|2.5.1\r"
    "PID|1||MRN-{p}^^^CENTRAL^MR\r"
    "OBR|1|PL-{n}|FL-{n}|24325-3^Hepatic function panel^LN|||20240502080000+0200\r"
    "OBX|1|NM|1742-6^ALT^LN||{alt}|U/L|10-40|H|||F|||20240502080000+0200\r"
    "OBX|2|NM|1920-8^AST^LN||{ast}|U/L|10-40|H|||F|||20240502080000+0200\r"
)


async def sender(port: int, messages: list[bytes], latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = 0
    try:
        for m in messages:
            t0 = time.perf_counter()
            writer.write(b"\x0b" + m + b"\x1c\r")
            await writer.drain()
            ack = await reader.readuntil(b"\x1c\r")
            latencies.append(time.perf_counter() - t0)
            if b"MSA|AA|" in ack:
                ok += 1
    finally:
        writer.close()
    return ok


async def run(args) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    obs_t, dlq_t = f"{prefix}.observations", f"{prefix}.dead-letter"
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    admin.create_topics([NewTopic(obs_t, args.partitions, 1), NewTopic(dlq_t, 1, 1)])
    try:
        server = await serve_mllp("127.0.0.1", 0, bootstrap=args.bootstrap,
                                  observations_topic=obs_t, dead_letter_topic=dlq_t)
        try:
            msgs = [ORU.format(ctl=f"C{i}", p=i % 50, n=i, alt=40 + i % 300, ast=30 + i % 200).encode()
                    for i in range(args.messages)]
            # warm-up (producer start, metadata)
            await sender(server.port, msgs[:20], [])
            chunks = [msgs[i :: args.connections] for i in range(args.connections)]
            latencies: list[float] = []
            t0 = time.perf_counter()
            oks = await asyncio.gather(*(sender(server.port, c, latencies) for c in chunks))
            elapsed = time.perf_counter() - t0
        finally:
            await server.stop()
    finally:
        admin.delete_topics([obs_t, dlq_t])
        admin.close()
    ok = sum(oks)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(
        f"{ok}/{args.messages} messages ACKed AA in {elapsed:.2f}s over {args.connections} connections: "
        f"{ok / elapsed:.0f} messages/s ({2 * ok / elapsed:.0f} observations/s); "
        f"ACK latency p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    if ok != args.messages:
        sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--partitions", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
