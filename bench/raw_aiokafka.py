"""(a) of the benchmark: the stack's own limit, a plain aiokafka loop.

consume the input topics in a consumer group -> json decode (and re-encode) -> produce one
output message per input (acks=all, batched with linger) -> await the acks -> commit.
At-least-once like the service: a batch's offsets are committed only after every output
of that batch is acknowledged. Runs until SIGTERM (``run_all.py`` reads its peak memory
before stopping it) or, with ``--exit-after N``, until N inputs are done.

    python bench/raw_aiokafka.py --bootstrap 127.0.0.1:9092 --group g --out out-topic in1 in2 in3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

MAX_BYTES = 16 * 1024 * 1024


async def run(args: argparse.Namespace) -> int:
    consumer = AIOKafkaConsumer(
        *args.topics, bootstrap_servers=args.bootstrap, group_id=args.group, client_id=args.group,
        enable_auto_commit=False, auto_offset_reset="earliest",
        max_partition_fetch_bytes=MAX_BYTES, fetch_max_bytes=4 * MAX_BYTES,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=args.bootstrap, client_id=args.group, acks="all",
        linger_ms=args.linger_ms, max_batch_size=512 * 1024, max_request_size=MAX_BYTES,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await producer.start()
    await consumer.start()
    done = 0
    first = last = None
    try:
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=args.max_records)
            if not batch:
                continue
            acks = []
            for msgs in batch.values():
                for m in msgs:
                    obj = json.loads(m.value)
                    value = json.dumps(obj, separators=(",", ":")).encode()
                    acks.append(await producer.send(args.out, value=value, key=m.key))
            await asyncio.gather(*acks)
            await consumer.commit()
            done += len(acks)
            last = time.time()
            first = first or last
            if args.exit_after and done >= args.exit_after:
                break
    finally:
        await consumer.stop()
        await producer.stop()
    print(json.dumps({"done": done, "first_batch_done": first, "last_batch_done": last}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--group", required=True)
    ap.add_argument("--out", required=True, help="output topic")
    ap.add_argument("--linger-ms", type=int, default=5, help="as monitor/app.py producer_linger (5 ms)")
    ap.add_argument("--max-records", type=int, default=2000, help="records per getmany batch")
    ap.add_argument("--exit-after", type=int, default=0)
    ap.add_argument("topics", nargs="+")
    args = ap.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
