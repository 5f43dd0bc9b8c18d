"""Release records fetched from several partitions (of several topics) in write order.

Kafka orders records within a partition only. Ingest reads five input topics and writes
one patient stream, in which a patient's dose must stand before the results taken after
it (the engine judges episodes by the dose: a dose processed after a fever's readings
loses that episode). aiokafka hands out fetched records partition by partition, so a
batch can hold a whole backlog of lab results before the dose written ahead of them.

``WriteOrderMerge`` buffers fetched records per partition and releases them in record
timestamp order across partitions, but only while every assigned partition either has a
buffered record (its next record is known) or is caught up with its log end (nothing
earlier can still arrive from it). A partition that neither delivers nor catches up
holds the others back while records keep arriving (a backlog handed out partition by
partition), but once nothing has arrived or been released for ``max_hold`` seconds the
buffered records go out anyway: order is best effort, progress is not.

Timestamps have millisecond resolution and a producer writes dozens of records per
millisecond, so ties are common: within one timestamp the partitions with a lower
``priority`` go first (ingest puts treatments first: a dose must precede the results of
the same instant, whose order among themselves a dose-less engine could not repair),
then the order of first arrival.

Pure: no Kafka import; the caller passes the assigned partitions and which are caught up.
"""
from __future__ import annotations

import heapq
import time
from collections import deque
from typing import Any, Callable, Hashable, Iterable, Mapping


class WriteOrderMerge:
    def __init__(self, max_hold: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 priority: Callable[[Hashable], int] = lambda tp: 0) -> None:
        self.max_hold = max_hold
        self.priority = priority
        self.clock = clock
        self.buffers: dict[Hashable, deque] = {}
        #: since when nothing arrived and nothing was released (None: nothing waits)
        self._waiting_since: float | None = None

    def add(self, batch: Mapping[Hashable, list]) -> None:
        added = False
        for tp, records in batch.items():
            if records:
                self.buffers.setdefault(tp, deque()).extend(records)
                added = True
        if added:
            self._waiting_since = self.clock()

    def __len__(self) -> int:
        return sum(len(b) for b in self.buffers.values())

    def sizes(self) -> dict[Hashable, int]:
        return {tp: len(b) for tp, b in self.buffers.items()}

    def clear(self) -> None:
        self.buffers.clear()
        self._waiting_since = None

    def take(self, assigned: Iterable[Hashable], caught_up: set, limit: int) -> list[Any]:
        """Up to ``limit`` records in timestamp order that are safe to release now."""
        assigned = list(assigned)
        for tp in [tp for tp in self.buffers if tp not in assigned]:
            del self.buffers[tp]  # revoked: the new owner reads them from the commit
        overdue = self._waiting_since is not None and self.clock() - self._waiting_since >= self.max_hold
        blocking = {tp for tp in assigned if not self.buffers.get(tp) and tp not in caught_up}
        if blocking and not overdue:
            return []
        rank = {tp: (self.priority(tp), i) for i, tp in enumerate(self.buffers)}
        heap = [(b[0].timestamp, *rank[tp], tp) for tp, b in self.buffers.items() if b]
        heapq.heapify(heap)
        out: list[Any] = []
        while heap and len(out) < limit:
            tp = heapq.heappop(heap)[-1]
            buf = self.buffers[tp]
            out.append(buf.popleft())
            if buf:
                heapq.heappush(heap, (buf[0].timestamp, *rank[tp], tp))
            elif tp not in caught_up and not overdue:
                break  # its next record may be older than the other heads
        self._waiting_since = self.clock() if any(self.buffers.values()) else None
        return out
