"""Observations this worker's ingest decoded, handed to its own clinical stage.

Ingest validates every input into an :class:`~schemas.events.Observation` and writes its
JSON to the patient stream. When the same worker's clinical runner owns the partition it
reads those very bytes back a moment later, and validating them again (pydantic, ~20
fields, two timestamps) was about a tenth of the worker's CPU per observation.

So ingest puts ``bytes -> observation`` here, before it writes them, for the partitions
the runner owns; the processor takes the entry of the **bytes it read** (the key is the
exact value: equal bytes or nothing), or decodes them as before when there is none
(another worker wrote them, a replay after a restart or a rollback, a full hand-off).
The observation is immutable (``frozen``) and ``Observation`` JSON round-trips to an equal
model (tests/unit/test_handoff.py), so the outcome is the same either way; only the cost
differs.

Bounded: at most ``capacity`` entries (~3 KB each). While it is full, ``put`` refuses and
ingest waits a little before its next batch (``full``): on one worker the two stages share
one CPU, so ingest running ahead of the clinical stage only moves work later (and, before
this, made every hand-off miss). Per partition, entries are in write order; taking one
drops the entries written before it (the clinical stage reads a partition in order, so it
is past them: a failed write retried, records of a batch rolled back). A rebalance keeps
only the partitions still owned (``retain``).
Pure: no Kafka import.

Measured (bench/run_all.py --stages c1: 100,000 events already on the input topics, one
worker): 30,230 of 122,240 observations were taken (25 %); 86,117 were refused by ``put``
because the hand-off was full, 5,893 because the runner had no assignment yet. With a
backlog, ingest waits only once ``capacity`` entries are held, then starts a batch (~2,400
observations) with ~4,600 held, so most of each batch is refused, and its lead over the
clinical stage keeps growing (25 % -> 15 % taken during the run). A miss costs one
``Observation.model_validate_json`` (~4.6 us; ~3.4 % of the worker's CPU in that run).
Tried: ingest waiting from half the capacity (woken by ``take``, no polling): 97 % taken, but
the worker's CPU time did not go down over 7 alternated runs (mean 12.5 s against 12.1 s),
and the ingest rate fell to the clinical stage's; not kept. With a live input rate below
the clinical stage's, ingest is never a batch ahead and the entries are taken.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable

from schemas.events import Observation


class DecodedObservations:
    def __init__(self, capacity: int = 5_000, owned: Callable[[int], bool] = lambda _p: True) -> None:
        self.capacity = capacity
        #: whether the clinical runner of this worker owns a partition of the patient stream
        self.owned = owned
        #: per partition: the bytes of the entries, in write order
        self._order: dict[int, deque] = {}
        #: bytes -> (partition, observation)
        self._entries: dict[bytes, tuple[int, Observation]] = {}
        self.taken = 0
        self.decoded = 0

    def full(self) -> bool:
        return len(self._entries) >= self.capacity

    def put(self, partition: int, value: bytes, observation: Observation) -> None:
        if len(self._entries) >= self.capacity or not self.owned(partition) or value in self._entries:
            return
        q = self._order.get(partition)
        if q is None:
            q = self._order[partition] = deque()
        q.append(value)
        self._entries[value] = (partition, observation)

    def take(self, value: bytes | None) -> Observation | None:
        """The observation ingest decoded into exactly these bytes, if it is held."""
        e = self._entries.get(value) if value is not None else None
        if e is None:
            self.decoded += 1
            return None
        q = self._order[e[0]]
        while q:  # the entries written before it are passed
            v = q.popleft()
            del self._entries[v]
            if v == value:
                break
        self.taken += 1
        return e[1]

    def decode(self, value: bytes) -> Observation:
        """The observation of a record of the patient stream: handed over, or decoded."""
        obs = self.take(value)
        return obs if obs is not None else Observation.model_validate_json(value)

    def retain(self, partitions: Iterable[int]) -> None:
        """Forget the entries of every other partition (after a rebalance)."""
        keep = set(partitions)
        for p in [p for p in self._order if p not in keep]:
            for v in self._order.pop(p):
                self._entries.pop(v, None)

    def __len__(self) -> int:
        return len(self._entries)
