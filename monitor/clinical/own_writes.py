"""Records this worker's ingest wrote to the patient stream, acknowledged, for its own
clinical stage: taken in offset order instead of read back from the broker.

With ingest in the worker's process, the clinical stage used to fetch from the broker every
record its own ingest had just written and had acknowledged: a fetch request and response
per cycle, its records parsed again, and one more broker round trip between an input and its
alert (docs/measurements.md, eighteenth pass: the consumers' fetchers were 17.5 % of the
worker's CPU at 400 events/s). Once the broker acknowledges a write (``acks=all``), ingest
knows the offsets it got (the base offset of each record batch it sent), so it offers those
records here: ``(partition, base offset, records)``.

The runner takes them **only in offset order from its own position**: a partition is
*direct* (paused in the consumer, its records taken from here) while the offers continue
the position without a hole; a hole means another writer (an MLLP listener, another
worker's ingest, a write this worker's ingest retried) put records in between, and the
partition goes back to fetching from its position until it reaches an offer again. The
broker's end of every direct partition is checked periodically (``ClinicalRunner``), so a
record written by someone else is fetched even when this worker's ingest writes nothing more
to that partition. What is processed is exactly the log, in its order, from the same offsets:
only where the bytes come from differs (the same bytes the broker holds).

Pure: no Kafka import; the runner and ingest own the clients.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple


class StreamRecord(NamedTuple):
    """A record of the patient stream, as the consumer would have returned it (the fields the
    processor reads)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple


class OwnWrites:
    """Acknowledged writes of this worker's ingest to the patient stream, per partition, by
    base offset. Bounded: at most ``capacity`` records held; beyond it the oldest offers are
    dropped (their records are fetched as before)."""

    def __init__(self, topic: str, capacity: int = 20_000,
                 owned: Callable[[int], bool] = lambda _p: True,
                 notify: Callable[[], None] = lambda: None) -> None:
        self.topic = topic
        self.capacity = capacity
        #: whether the clinical stage of this worker owns a partition of the stream
        self.owned = owned
        #: called after an offer (wakes the runner)
        self.notify = notify
        #: partition -> base offset -> records ((key, value, headers) each, in offset order)
        self._offers: dict[int, dict[int, list]] = {}
        #: partition -> records held
        self._count: dict[int, int] = {}
        #: partition -> the end of the newest offer (the offset after its last record)
        self._ends: dict[int, int] = {}
        self._held = 0
        self.offered = 0
        self.taken = 0
        self.dropped = 0

    def offer(self, partition: int, base: int, records: list) -> None:
        """Records ``base``, ``base + 1``, ... of ``partition``, acknowledged by the broker."""
        if not records or not self.owned(partition):
            return
        offers = self._offers.setdefault(partition, {})
        if base in offers:
            return
        end = base + len(records)
        if end > self._ends.get(partition, -1):
            self._ends[partition] = end
        offers[base] = records
        self._add(partition, len(records))
        self.offered += len(records)
        while self._held > self.capacity:
            self._drop_oldest()
        self.notify()

    def _add(self, partition: int, n: int) -> None:
        """``n`` records more (or fewer, negative) held for ``partition``."""
        self._held += n
        left = self._count.get(partition, 0) + n
        if left > 0:
            self._count[partition] = left
        else:
            self._count.pop(partition, None)
            self._offers.pop(partition, None)

    def _drop_oldest(self) -> None:
        """The oldest offer of the partition holding the most records."""
        p = max(self._count, key=self._count.__getitem__)
        offers = self._offers[p]
        n = len(offers.pop(min(offers)))
        self.dropped += n
        self._add(p, -n)

    def _pass(self, partition: int, position: int) -> dict[int, list] | None:
        """Drop the offers wholly before ``position``; the partition's offers left."""
        offers = self._offers.get(partition)
        if not offers:
            return None
        gone = [b for b, rs in offers.items() if b + len(rs) <= position]
        if gone:
            self._add(partition, -sum(len(offers.pop(b)) for b in gone))
        return self._offers.get(partition)

    @staticmethod
    def _holding(offers: dict[int, list], offset: int) -> int | None:
        """The base of the offer that holds the record at ``offset``, if one does. Offers do
        not overlap, so the one that continues another starts exactly at its end: a lookup
        by key, not a walk over every offer held (which made ``covered`` quadratic in the
        offers held while the clinical stage is behind)."""
        if offset in offers:
            return offset
        return next((b for b, rs in offers.items() if b <= offset < b + len(rs)), None)

    def covered(self, partition: int, position: int) -> int:
        """The end of the offers that continue ``position`` without a hole (``position`` if
        none does); the offers before ``position`` are dropped."""
        offers = self._pass(partition, position)
        end = position
        while offers:
            base = self._holding(offers, end)
            if base is None:
                break
            end = base + len(offers[base])
        return end

    def pending(self, partition: int, position: int) -> bool:
        """Offers are held from ``position`` on: the next record is offered (``continues``)
        or there is a hole (``hole``)."""
        return bool(self._pass(partition, position))

    def continues(self, partition: int, position: int) -> bool:
        """An offer holds the record at ``position``."""
        offers = self._pass(partition, position)
        return bool(offers) and self._holding(offers, position) is not None

    def reached(self, partition: int, position: int) -> bool:
        """Every record offered for ``partition`` is before ``position``, and the newest offer
        ends exactly there: the next record this worker's ingest writes to it continues
        ``position`` unless someone else writes first."""
        return self._ends.get(partition) == position

    def held(self, partition: int) -> int:
        """Records held for ``partition`` (from the position of the last call that passed it;
        ``take`` lowers it by what it took)."""
        return self._count.get(partition, 0)

    def hole(self, partition: int, position: int) -> bool:
        """Offers are held past ``position`` but none holds the record at ``position``:
        someone else wrote in between (or this worker's write of it was not offered)."""
        offers = self._pass(partition, position)
        return bool(offers) and self._holding(offers, position) is None

    def take(self, partition: int, position: int, limit: int) -> list[StreamRecord]:
        """Up to ``limit`` records from ``position`` on, in offset order, without a hole;
        the offers taken are dropped."""
        offers = self._pass(partition, position)
        out: list[StreamRecord] = []
        if not offers:
            return out
        topic = self.topic
        while len(out) < limit:
            base = self._holding(offers, position)
            if base is None:
                break
            rs = offers[base]
            start = position - base
            stop = min(len(rs), start + limit - len(out))
            for i in range(start, stop):
                key, value, headers = rs[i]
                out.append(StreamRecord(topic, partition, base + i, key, value, tuple(headers or ())))
            position = base + stop
            del offers[base]
            if stop < len(rs):  # the rest of this offer stays held, from the new position
                offers[position] = rs[stop:]
            self._add(partition, -stop)
            if partition not in self._offers:
                break
        self.taken += len(out)
        return out

    def retain(self, partitions: Iterable[int]) -> None:
        """Forget the offers of every other partition (after a rebalance)."""
        keep = set(partitions)
        for p in [p for p in self._offers if p not in keep]:
            self._add(p, -self._count.get(p, 0))
        for p in [p for p in self._ends if p not in keep]:
            del self._ends[p]

    def __len__(self) -> int:
        return self._held
