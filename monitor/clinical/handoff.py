"""Observations this worker's ingest decoded, handed to its own clinical stage.

Ingest validates every input into an :class:`~schemas.events.Observation`, writes its JSON
to the patient stream and, once the broker acknowledged it, knows its partition and
offset. When the same worker's clinical runner owns that partition it reads those very
bytes back a moment later, and decoding them again (pydantic validation of ~20 fields,
two timestamps) was about a tenth of the worker's CPU per observation.

So ingest puts ``(partition, offset) -> (bytes, observation)`` here for the partitions the
runner owns, and the processor takes the entry of the record it reads **only if the bytes
it read are equal to the bytes ingest wrote**; otherwise (another worker wrote it, a
replay after a restart, a rollback, an evicted entry) it decodes the bytes as before. The
observation is immutable (``frozen``) and ``Observation`` JSON round-trips to an equal
model (tests/unit/test_handoff.py), so the result is the same either way; only the cost differs.

Bounded: at most ``capacity`` entries (~3 KB each); while full, nothing more is put (the
clinical stage is behind and decodes those itself). An entry the runner skips past is
dropped when it reads a later offset of that partition; a rebalance keeps only the
partitions still owned.
Pure: no Kafka import.
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
        #: per partition, entries ``(offset, bytes, observation)`` in increasing offset order
        self._entries: dict[int, deque] = {}
        self._n = 0
        self.taken = 0
        self.decoded = 0

    def put(self, partition: int, offset: int, value: bytes, observation: Observation) -> None:
        if self._n >= self.capacity or not self.owned(partition):
            return  # full (the clinical stage is behind): it decodes these itself
        q = self._entries.get(partition)
        if q is None:
            q = self._entries[partition] = deque()
        elif q and q[-1][0] >= offset:  # written again from an earlier offset: start over
            self._n -= len(q)
            q.clear()
        q.append((offset, value, observation))
        self._n += 1

    def take(self, partition: int, offset: int, value: bytes | None) -> Observation | None:
        """The observation ingest wrote at ``partition``/``offset`` if ``value`` is its bytes.
        Entries of earlier offsets are dropped: the runner reads a partition in order."""
        q = self._entries.get(partition)
        e = None
        while q and q[0][0] <= offset:
            e = q.popleft()
            self._n -= 1
        if e is None or e[0] != offset or e[1] != value:
            self.decoded += 1
            return None
        self.taken += 1
        return e[2]

    def decode(self, partition: int, offset: int, value: bytes) -> Observation:
        """The observation of a record of the patient stream: handed over, or decoded."""
        obs = self.take(partition, offset, value)
        return obs if obs is not None else Observation.model_validate_json(value)

    def retain(self, partitions: Iterable[int]) -> None:
        """Forget the entries of every other partition (after a rebalance)."""
        keep = set(partitions)
        for p in [p for p in self._entries if p not in keep]:
            self._n -= len(self._entries.pop(p))

    def __len__(self) -> int:
        return self._n
