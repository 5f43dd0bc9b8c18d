"""Observations this worker's ingest decoded, handed to its own clinical stage.

Ingest validates every input into an :class:`~schemas.events.Observation` and writes its
JSON to the patient stream. When the same worker's clinical runner owns the partition it
reads those very bytes back a moment later, and validating them again (pydantic, ~20
fields, two timestamps) was about a tenth of the worker's CPU per observation.

So ingest puts ``bytes -> observation`` here, before it writes them, for the partitions
the runner owns; the processor takes the entry of the **bytes it read** (the key is the
exact value: equal bytes or nothing), or decodes them as before when there is none
(another worker wrote them, a replay after a restart or a rollback, an evicted entry).
The observation is immutable (``frozen``) and ``Observation`` JSON round-trips to an equal
model (tests/unit/test_handoff.py), so the outcome is the same either way; only the cost
differs.

Bounded: at most ``capacity`` entries (~3 KB each), the oldest evicted first (entries
whose write failed, or whose partition moved to another worker, leave that way).
Pure: no Kafka import.
"""
from __future__ import annotations

from typing import Callable, Iterable

from schemas.events import Observation


class DecodedObservations:
    def __init__(self, capacity: int = 5_000, owned: Callable[[int], bool] = lambda _p: True) -> None:
        self.capacity = capacity
        #: whether the clinical runner of this worker owns a partition of the patient stream
        self.owned = owned
        self._entries: dict[bytes, Observation] = {}
        self.taken = 0
        self.decoded = 0

    def put(self, partition: int, value: bytes, observation: Observation) -> None:
        if not self.owned(partition):
            return
        entries = self._entries
        if len(entries) >= self.capacity:
            del entries[next(iter(entries))]
        entries[value] = observation

    def take(self, value: bytes | None) -> Observation | None:
        """The observation ingest decoded into exactly these bytes, if it is held."""
        obs = self._entries.pop(value, None) if value is not None else None
        if obs is None:
            self.decoded += 1
        else:
            self.taken += 1
        return obs

    def decode(self, value: bytes) -> Observation:
        """The observation of a record of the patient stream: handed over, or decoded."""
        obs = self.take(value)
        return obs if obs is not None else Observation.model_validate_json(value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
