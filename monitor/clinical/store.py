"""Per-patient state of the clinical stage: the :class:`PatientStore` interface and its
in-memory implementation, rebuilt from a compacted changelog topic.

A patient's durable form is one changelog record: key = patient id, value =
``{"v": 1, "state": PatientState.to_dict(), "alerts": AlertBook.to_dict()}`` (JSON), on
the changelog partition equal to the patient's partition of the clinical input stream.
Restoring a partition is "read the changelog partition from the start to its end and keep
the last value per key" (compaction keeps that last value).

Decoding is lazy: a restored patient stays raw bytes until the first record or clock tick
touches it, so restoring 10,000 patients costs a read of the topic, not 10,000 decodes.
The store keeps, per patient, the last bytes written (or restored): the durable version
an internal error rolls back to.

Pure: no Kafka import. The runner (``monitor/clinical/runner.py``) feeds it changelog
records and writes what ``take_changed`` returns.
"""
from __future__ import annotations

import json
from typing import Iterable, Protocol

from pydantic_core import from_json, to_json

from alerts.lifecycle import AlertBook
from alerts.state import PatientState
from schemas.alert import Alert

FORMAT_VERSION = 1


_BOOK_JSON = AlertBook.__pydantic_serializer__.to_json


def encode_book(book: AlertBook) -> bytes:
    """The alert book's JSON (pydantic-core's serializer straight from the model: the same
    JSON as ``to_json(book.to_dict())`` without building the dict)."""
    return _BOOK_JSON(book)


def encode(state: PatientState, book: AlertBook, book_json: bytes | None = None) -> bytes:
    """``{"v": 1, "state": ..., "alerts": ...}``; ``book_json``: the book's JSON, if known."""
    # pydantic-core's JSON writer: the same JSON as json.dumps, several times faster
    return b"".join((b'{"v":%d,"state":' % FORMAT_VERSION, to_json(state.to_dict()), b',"alerts":',
                     encode_book(book) if book_json is None else book_json, b"}"))


def decode(raw: bytes) -> tuple[PatientState, AlertBook]:
    d = from_json(raw)
    return PatientState.from_dict(d["state"]), AlertBook.from_dict(d["alerts"])


class PatientStore(Protocol):
    """What the clinical processor and the runner need from per-patient state."""

    def load(self, patient_id: str, partition: int) -> tuple[PatientState, AlertBook]:
        """The patient's state and alert book (new and empty for an unknown patient)."""

    def mark_changed(self, patient_id: str, book: bool = True) -> None:
        """The patient must be written to the changelog at the end of the batch.
        ``book=False``: only the state changed, the alert book is as last written."""

    def is_changed(self, patient_id: str) -> bool: ...

    def discard(self, patient_id: str) -> None:
        """Roll a patient with no change waiting for the changelog back to its last durable
        version (a patient still marked changed keeps its state)."""

    def take_changed(self) -> list[tuple[str, int, bytes]]:
        """(patient id, partition, encoded value) of every changed patient; clears the marks."""

    def changed_partitions(self) -> set[int]:
        """Partitions of the patients marked changed (waiting for ``take_changed``)."""

    def patient_ids(self, partitions: Iterable[int]) -> list[str]: ...

    def partition_of(self, patient_id: str) -> int | None: ...

    def partitions(self) -> set[int]:
        """Partitions with at least one patient held."""

    def restore_record(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        """Apply one changelog record (a ``None`` value is a deletion)."""

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget every patient of these partitions (given away, or to be restored again)."""

    def find_alert(self, alert_id: str) -> Alert | None: ...

    def __len__(self) -> int: ...


class _Entry:
    __slots__ = ("partition", "raw", "state", "book", "book_json")

    def __init__(self, partition: int, raw: bytes | None) -> None:
        self.partition = partition
        self.raw = raw          # last durable bytes (None: never written)
        self.state: PatientState | None = None
        self.book: AlertBook | None = None
        #: the JSON of ``book`` as last written (None: not known, encode it)
        self.book_json: bytes | None = None


class InMemoryPatientStore:
    """``PatientStore`` in a dict; lost on exit and rebuilt from the changelog."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._by_partition: dict[int, set[str]] = {}
        #: changed patients -> whether their alert book changed too
        self._changed: dict[str, bool] = {}

    # -- processing ---------------------------------------------------------------------
    def load(self, patient_id: str, partition: int) -> tuple[PatientState, AlertBook]:
        e = self._entries.get(patient_id)
        if e is None:
            e = self._entries[patient_id] = _Entry(partition, None)
            self._by_partition.setdefault(partition, set()).add(patient_id)
        if e.state is None or e.book is None:
            e.book_json = None
            if e.raw is not None:
                e.state, e.book = decode(e.raw)
            else:
                e.state, e.book = PatientState(patient_id), AlertBook(patient_id=patient_id)
        return e.state, e.book

    def mark_changed(self, patient_id: str, book: bool = True) -> None:
        self._changed[patient_id] = book or self._changed.get(patient_id, False)

    def is_changed(self, patient_id: str) -> bool:
        return patient_id in self._changed

    def discard(self, patient_id: str) -> None:
        e = self._entries.get(patient_id)
        if e is None or patient_id in self._changed:
            return
        if e.raw is None:
            self._remove(patient_id)
        else:
            e.state = e.book = e.book_json = None

    def take_changed(self) -> list[tuple[str, int, bytes]]:
        out = []
        for pid, book_changed in self._changed.items():
            e = self._entries[pid]
            assert e.state is not None and e.book is not None
            if book_changed or e.book_json is None:
                e.book_json = encode_book(e.book)
            e.raw = encode(e.state, e.book, e.book_json)
            out.append((pid, e.partition, e.raw))
        self._changed.clear()
        return out

    def changed_partitions(self) -> set[int]:
        entries = self._entries
        return {entries[pid].partition for pid in self._changed}

    def patient_ids(self, partitions: Iterable[int]) -> list[str]:
        return sorted(pid for p in partitions for pid in self._by_partition.get(p, ()))

    def partition_of(self, patient_id: str) -> int | None:
        e = self._entries.get(patient_id)
        return None if e is None else e.partition

    def partitions(self) -> set[int]:
        return {p for p, pids in self._by_partition.items() if pids}

    def peek(self, patient_id: str) -> tuple[PatientState, AlertBook] | None:
        e = self._entries.get(patient_id)
        return None if e is None else self.load(patient_id, e.partition)

    # -- restore and ownership ---------------------------------------------------------
    def restore_record(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        if not key:
            return
        # a changelog written by the faust Table before (same topic name) has JSON keys
        pid = json.loads(key) if key[:1] == b'"' else key.decode()
        if value is None:
            self._remove(pid)
            return
        e = self._entries.get(pid)
        if e is None or e.partition != partition:
            if e is not None:
                self._remove(pid)
            e = self._entries[pid] = _Entry(partition, value)
            self._by_partition.setdefault(partition, set()).add(pid)
        else:
            e.raw, e.state, e.book, e.book_json = value, None, None, None

    def drop(self, partitions: Iterable[int]) -> None:
        for p in list(partitions):
            for pid in self._by_partition.pop(p, set()):
                self._entries.pop(pid, None)
                self._changed.pop(pid, None)

    def _remove(self, pid: str) -> None:
        e = self._entries.pop(pid, None)
        if e is not None:
            self._by_partition.get(e.partition, set()).discard(pid)
        self._changed.pop(pid, None)

    # -- reads for the API ---------------------------------------------------------------
    def find_alert(self, alert_id: str) -> Alert | None:
        """The alert, if a patient held here has it (a copy; decoded books first, raw bytes
        searched for the id before decoding)."""
        needle = alert_id.encode()
        for e in list(self._entries.values()):
            if e.book is not None:
                hit = e.book.alerts.get(alert_id)
                if hit is not None:
                    return hit.model_copy(deep=True)
            elif e.raw is not None and needle in e.raw:
                raw = (json.loads(e.raw).get("alerts") or {}).get("alerts", {}).get(alert_id)
                if raw is not None:
                    return Alert.model_validate(raw)
        return None

    def __len__(self) -> int:
        return len(self._entries)
