"""(a) of the benchmark: the stack's own limit, a plain aiokafka loop.

consume the input topics in a consumer group -> json decode (and re-encode) -> produce one
output message per input (acks=all, batched with linger) -> await the acks -> commit.
At-least-once like the service: a batch's offsets are committed only after every output
of that batch is acknowledged. Runs until SIGTERM (``run_all.py`` reads its peak memory
before stopping it) or, with ``--exit-after N``, until N inputs are done.

    python bench/raw_aiokafka.py --bootstrap 127.0.0.1:9092 --group g --out out-topic in1 in2 in3

``--via TOPIC`` (stage (a2)): the same loop twice in one process, as the service's two
stages: the first loop writes to ``TOPIC`` (keyed as read), a second loop with its own
consumer group and producer reads ``TOPIC`` and writes to ``--out``. This is the ceiling
of any design that, like the service, writes a keyed intermediate stream and reads it
back in the same worker, with no validation, state or rules at all.
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


class Hop:
    """consume ``topics`` -> decode/encode -> produce to ``out`` -> acks -> commit."""

    def __init__(self, args: argparse.Namespace, group: str, topics: list[str], out: str) -> None:
        self.args, self.group, self.topics, self.out = args, group, topics, out
        self.done = 0
        self.first = self.last = None
        self.consumer = AIOKafkaConsumer(
            *topics, bootstrap_servers=args.bootstrap, group_id=group, client_id=group,
            enable_auto_commit=False, auto_offset_reset="earliest",
            max_partition_fetch_bytes=MAX_BYTES, fetch_max_bytes=4 * MAX_BYTES,
        )
        self.producer = AIOKafkaProducer(
            bootstrap_servers=args.bootstrap, client_id=group, acks="all",
            linger_ms=args.linger_ms, max_batch_size=512 * 1024, max_request_size=MAX_BYTES,
        )

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        consumer, producer, args = self.consumer, self.producer, self.args
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=100, max_records=args.max_records)
            if not batch:
                continue
            acks = []
            for msgs in batch.values():
                for m in msgs:
                    obj = json.loads(m.value)
                    value = json.dumps(obj, separators=(",", ":")).encode()
                    acks.append(await producer.send(self.out, value=value, key=m.key))
            await asyncio.gather(*acks)
            await consumer.commit()
            self.done += len(acks)
            self.last = time.time()
            self.first = self.first or self.last
            if args.exit_after and self.done >= args.exit_after:
                stop.set()


async def run(args: argparse.Namespace) -> int:
    if args.via:
        hops = [Hop(args, args.group, args.topics, args.via), Hop(args, f"{args.group}-2", [args.via], args.out)]
    else:
        hops = [Hop(args, args.group, args.topics, args.out)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for h in hops:
        await h.start()
    tasks = [asyncio.ensure_future(h.run(stop)) for h in hops]
    try:
        await stop.wait()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for h in hops:
            await h.stop()
    last = hops[-1]
    print(json.dumps({"done": last.done, "first_batch_done": last.first, "last_batch_done": last.last}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--group", required=True)
    ap.add_argument("--out", required=True, help="output topic")
    ap.add_argument("--via", default="", help="intermediate topic: two loops in one process (stage a2)")
    ap.add_argument("--linger-ms", type=int, default=5, help="as monitor/app.py producer_linger (5 ms)")
    ap.add_argument("--max-records", type=int, default=2000, help="records per getmany batch")
    ap.add_argument("--exit-after", type=int, default=0, help="stop once the (last) loop has done N inputs")
    ap.add_argument("topics", nargs="+")
    args = ap.parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
