"""Per-patient state of the clinical stage: the :class:`PatientStore` interface and its
in-memory implementation, rebuilt from a compacted changelog topic.

A patient's durable form is one changelog record: key = patient id, value =
``{"v": 1, "state": PatientState.to_dict(), "alerts": AlertBook.to_dict(), "offset": N}``
(JSON), on the changelog partition equal to the patient's partition of the clinical input
stream. ``offset`` is the offset of the last record of the stream applied to this state (a
value written before it existed has none): a record at or below it is one the state
already holds, replayed after a crash or a rollback, and the processor skips it.
Restoring a partition is "read the changelog partition from the start to its end and keep
the last value per key" (compaction keeps that last value).

Decoding is lazy: a restored patient stays raw bytes until the first record or clock tick
touches it, so restoring 10,000 patients costs a read of the topic, not 10,000 decodes.
The store keeps, per patient, the last bytes written (or restored) and what was applied
since then (``mark_changed``'s ``replay`` items: the records): after an internal error
part-way through a record, ``discard`` rolls the patient back to those bytes and the
processor applies those records again, so the patient is exactly as before the failing
record.

A value this release cannot read (a format version it does not know, as after a rollback
to an older release; bytes that are not a patient's state) is never guessed at:
``load`` raises :class:`UnreadablePatientState`, the patient stays as its bytes, and the
store counts it (``unreadable_ids``) until a new value replaces it. The processor
dead-letters that patient's records (``patient_state_unreadable``) and its clock skips it.

Pure: no Kafka import. The runner (``monitor/clinical/runner.py``) feeds it changelog
records and writes what ``take_changed`` returns.
"""
from __future__ import annotations

import json
from itertools import islice
from operator import is_, itemgetter
from typing import Any, Iterable, Protocol, get_origin

from pydantic import TypeAdapter
from pydantic_core import from_json, to_json

from alerts.lifecycle import AlertBook, KeyState
from alerts.state import PatientState
from schemas.alert import Alert

FORMAT_VERSION = 1


class UnreadablePatientState(Exception):
    """A patient's changelog value this release cannot read. The text says why in terms of
    the format (never the value's content)."""


_BOOK_JSON = AlertBook.__pydantic_serializer__.to_json
_ALERT_JSON = Alert.__pydantic_serializer__.to_json
_KEYS_JSON = TypeAdapter(dict[str, KeyState]).serializer.to_json


def encode_book(book: AlertBook, alert_json: dict[str, tuple[list, bytes]] | None = None) -> bytes:
    """The alert book's JSON (pydantic-core's serializer straight from the model: the same
    JSON as ``to_json(book.to_dict())`` without building the dict).

    ``alert_json``: the patient's cache of alert JSON (alert id -> (fingerprint, JSON)). An
    alert whose fields are the very objects they were when its JSON was cached is not
    serialized again (see :func:`alert_fingerprint`); the book is then assembled from the
    alerts' JSON, byte for byte what the whole book's serializer writes
    (``tests/unit/test_store_alert_json.py``). A patient's book holds every alert it ever
    had, each a few KB; a record usually changes one of them, or none."""
    if alert_json is None:
        return _BOOK_JSON(book)
    parts = []
    for aid, alert in book.alerts.items():
        fp = alert_fingerprint(alert)
        hit = alert_json.get(aid)
        if hit is not None and len(hit[0]) == len(fp) and all(map(is_, hit[0], fp)):
            value = hit[1]
        else:
            value = _ALERT_JSON(alert)
            alert_json[aid] = (fp, value)
        parts.append(to_json(aid) + b":" + value)
    if len(alert_json) > len(book.alerts):  # alerts no longer in the book
        for aid in [a for a in alert_json if a not in book.alerts]:
            del alert_json[aid]
    return b"".join((b'{"patient_id":', to_json(book.patient_id), b',"alerts":{', b",".join(parts),
                     b'},"keys":', _KEYS_JSON(book.keys), b',"applied_actions":', to_json(book.applied_actions),
                     b"}"))


def _layout() -> tuple:
    lists, scalars = [], []
    for name, f in Alert.model_fields.items():
        origin = get_origin(f.annotation) or f.annotation
        if origin is dict:
            assert name == "route", name
        elif origin is list:
            lists.append(name)
        else:
            scalars.append(name)
    return len(Alert.model_fields), itemgetter(*scalars), itemgetter(*lists)


#: the fingerprint's layout: number of fields, the scalar fields, the list fields
_N_FIELDS, _SCALARS, _LISTS = _layout()


def alert_fingerprint(alert: Alert) -> list:
    """Every field value of ``alert``, lists and dicts flattened to their length and items.

    Two fingerprints whose items are the *same objects* (``is``) describe alerts with the
    same JSON: every value an alert holds is immutable (strings, numbers, datetimes, enums,
    and frozen models: ``HistoryEntry``, ``Evidence``, ``AlertText``, ``ProtocolRef``) or
    a list or dict flattened here, except the route's nested tiers, which nothing changes
    after the alert opened (``alerts.lifecycle._snapshot`` relies on the same). A value
    changed in place on a list (a history entry appended, the history trimmed) or replaced
    changes the fingerprint. Identity is stricter than equality (``1 == 1.0 == True``, two
    equal instants in different offsets): a difference it misses cannot exist, and a
    match it misses only costs a serialization.

    The fields are read in a fixed layout (the scalar fields, then each list and the
    route dict flattened) when the alert holds exactly the model's fields with a list or
    dict where the model declares one; otherwise field by field in ``__dict__`` order."""
    d = alert.__dict__
    if len(d) == _N_FIELDS:
        try:
            fp = list(_SCALARS(d))
            lists = _LISTS(d)
            route = d["route"]
        except KeyError:
            pass
        else:
            if all(type(v) is list for v in lists) and type(route) is dict:
                for v in lists:
                    fp.append(len(v))
                    fp.extend(v)
                fp.append(len(route))
                fp.extend(route)
                fp.extend(route.values())
                return fp
    fp = []
    for v in d.values():
        t = type(v)
        if t is list:
            fp.append(len(v))
            fp.extend(v)
        elif t is dict:
            fp.append(len(v))
            fp.extend(v)
            fp.extend(v.values())
        else:
            fp.append(v)
    return fp


def encode(state: PatientState, book: AlertBook, book_json: bytes | None = None, offset: int | None = None) -> bytes:
    """``{"v": 1, "state": ..., "alerts": ..., "offset": ...}``; ``book_json``: the book's JSON,
    if known; ``offset``: the last stream record applied (None: not known, left out)."""
    # pydantic-core's JSON writer: the same JSON as json.dumps, several times faster
    return b"".join((b'{"v":%d,"state":' % FORMAT_VERSION, to_json(state.to_dict()), b',"alerts":',
                     encode_book(book) if book_json is None else book_json,
                     b"}" if offset is None else b',"offset":%d}' % offset))


def key_patient_id(key: bytes) -> str:
    """The patient id of a changelog key. A changelog written by the faust Table before (same
    topic name) has JSON keys. A key that is neither (not UTF-8, broken JSON) never stops a
    restore: it stands for itself, its bytes escaped, and its value is judged like any other
    when first touched."""
    if key[:1] == b'"':
        try:
            pid = json.loads(key)
            if isinstance(pid, str):
                return pid
        except ValueError:
            pass
    return key.decode("utf-8", "backslashreplace")


def _check_version(d: Any) -> None:
    """``d`` (a parsed changelog value) is of this format version or the faust Table's (no
    version), or :class:`UnreadablePatientState`."""
    if not isinstance(d, dict):
        raise UnreadablePatientState(f"a JSON {type(d).__name__}, not an object")
    version = d.get("v")
    if version is not None and version != FORMAT_VERSION:
        shown = version if isinstance(version, int) else type(version).__name__
        raise UnreadablePatientState(f"changelog format version {shown}; this release reads {FORMAT_VERSION} "
                                     f"(and the faust Table's values)")


def decode(raw: bytes) -> tuple[PatientState, AlertBook]:
    """A changelog value of this format version, or the faust Table's (no version), or
    :class:`UnreadablePatientState`: never a value of another version read as this one."""
    state, book, _offset = decode_with_offset(raw)
    return state, book


def decode_with_offset(raw: bytes) -> tuple[PatientState, AlertBook, int | None]:
    """:func:`decode`, and the offset of the last stream record the state holds (None: the
    value does not say, as one written before it did)."""
    try:
        d = from_json(raw)
    except ValueError:
        raise UnreadablePatientState("not JSON") from None
    _check_version(d)
    try:
        offset = d.get("offset")
        if offset is not None and (type(offset) is not int or offset < 0):
            raise ValueError("offset")
        return PatientState.from_dict(d["state"]), AlertBook.from_dict(d["alerts"]), offset
    except Exception as exc:
        raise UnreadablePatientState(f"{type(exc).__name__} reading the state or the alert book") from None


class PatientStore(Protocol):
    """What the clinical processor and the runner need from per-patient state."""

    def load(self, patient_id: str, partition: int) -> tuple[PatientState, AlertBook]:
        """The patient's state and alert book (new and empty for an unknown patient)."""

    def mark_changed(self, patient_id: str, book: bool = True, replay: Any = None, offset: int | None = None) -> None:
        """The patient must be written to the changelog at the end of the batch.
        ``book=False``: only the state changed, the alert book is as last written.
        ``replay``: what applies this change again on the last written version (a record
        and its processing time, kept until ``take_changed``; see ``discard``); None: a
        change that cannot be applied again (the clock). ``offset``: the stream record
        applied (its offset is kept with the state, see :meth:`offset`)."""

    def offset(self, patient_id: str) -> int | None:
        """The offset of the last stream record applied to the loaded patient's state (None:
        not known). Call after ``load``."""

    def is_changed(self, patient_id: str) -> bool: ...

    def discard(self, patient_id: str) -> list | None:
        """Roll the patient back to its last written version and return the ``replay``
        items of the changes since then, oldest first, for the caller to apply again (the
        patient is no longer marked; an empty list: nothing to apply). None when a change
        since then cannot be applied again: the patient then keeps its state and its mark."""

    def remember_alert_json(self, alert: Alert, value: bytes) -> None:
        """``value`` is the JSON just written for this version of ``alert`` (a hint: the
        changelog may reuse it while the book's alert is unchanged)."""

    def take_changed(self, limit: int | None = None) -> list[tuple[str, int, bytes]]:
        """(patient id, partition, encoded value) of every changed patient; clears the marks.
        ``limit``: only the first ``limit`` patients in the order they were first marked
        (a patient marked again keeps its place)."""

    def changed_count(self) -> int:
        """How many patients are marked changed."""

    def changed_partitions(self) -> set[int]:
        """Partitions of the patients marked changed (waiting for ``take_changed``)."""

    def patient_ids(self, partitions: Iterable[int]) -> list[str]: ...

    def partition_of(self, patient_id: str) -> int | None: ...

    def partitions(self) -> set[int]:
        """Partitions with at least one patient held."""

    def unreadable_ids(self, partitions: Iterable[int]) -> list[str]:
        """Patients of these partitions whose value ``load`` could not read
        (:class:`UnreadablePatientState`), until a new value replaces it."""

    def restore_record(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        """Apply one changelog record (a ``None`` value is a deletion)."""

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget every patient of these partitions (given away, or to be restored again)."""

    def find_alert(self, alert_id: str) -> Alert | None: ...

    def __len__(self) -> int: ...


class _Entry:
    __slots__ = ("partition", "raw", "state", "book", "book_json", "alert_json", "journal", "offset")

    def __init__(self, partition: int, raw: bytes | None) -> None:
        self.partition = partition
        self.raw = raw          # last durable bytes (None: never written)
        self.state: PatientState | None = None
        self.book: AlertBook | None = None
        #: the JSON of ``book`` as last written (None: not known, encode it)
        self.book_json: bytes | None = None
        #: JSON of the book's alerts, by alert id, with their fingerprints (``encode_book``)
        self.alert_json: dict[str, tuple[list, bytes]] = {}
        #: the ``replay`` items of the changes since ``raw`` (None: one cannot be replayed)
        self.journal: list | None = []
        #: the offset of the last stream record applied to ``state`` (None: not known)
        self.offset: int | None = None


class InMemoryPatientStore:
    """``PatientStore`` in a dict; lost on exit and rebuilt from the changelog."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._by_partition: dict[int, set[str]] = {}
        #: changed patients -> whether their alert book changed too
        self._changed: dict[str, bool] = {}
        #: patients whose value ``load`` could not read (until a new value replaces it)
        self._unreadable: set[str] = set()

    # -- processing ---------------------------------------------------------------------
    def load(self, patient_id: str, partition: int) -> tuple[PatientState, AlertBook]:
        e = self._entries.get(patient_id)
        if e is None:
            e = self._entries[patient_id] = _Entry(partition, None)
            self._by_partition.setdefault(partition, set()).add(patient_id)
        if e.state is None or e.book is None:
            e.book_json = None
            e.alert_json = {}
            if e.raw is not None:
                try:
                    e.state, e.book, e.offset = decode_with_offset(e.raw)
                except UnreadablePatientState:
                    self._unreadable.add(patient_id)
                    raise
            else:
                e.state, e.book, e.offset = PatientState(patient_id), AlertBook(patient_id=patient_id), None
        return e.state, e.book

    def mark_changed(self, patient_id: str, book: bool = True, replay: Any = None, offset: int | None = None) -> None:
        self._changed[patient_id] = book or self._changed.get(patient_id, False)
        e = self._entries.get(patient_id)
        if e is not None and offset is not None:
            e.offset = offset
        if e is not None and e.journal is not None:
            if replay is None:
                e.journal = None
            else:
                e.journal.append(replay)

    def offset(self, patient_id: str) -> int | None:
        e = self._entries.get(patient_id)
        return None if e is None else e.offset

    def is_changed(self, patient_id: str) -> bool:
        return patient_id in self._changed

    def discard(self, patient_id: str) -> list | None:
        e = self._entries.get(patient_id)
        if e is None:
            return []
        items: list = []
        if patient_id in self._changed:
            if e.journal is None:
                return None
            items = e.journal
            del self._changed[patient_id]
        if e.raw is None:
            self._remove(patient_id)
        else:
            e.state = e.book = e.book_json = None
            e.alert_json = {}
            e.journal = []
        return items

    def remember_alert_json(self, alert: Alert, value: bytes) -> None:
        """``value`` is ``alert``'s JSON, just written for it (a version the lifecycle
        returned: a copy of the book's alert, its fields the same objects). The changelog's
        book reuses it while the book's alert still has those same fields."""
        e = self._entries.get(alert.patient_id)
        if e is not None and e.book is not None and alert.alert_id in e.book.alerts:
            e.alert_json[alert.alert_id] = (alert_fingerprint(alert), value)

    def take_changed(self, limit: int | None = None) -> list[tuple[str, int, bytes]]:
        changed = self._changed
        every = limit is None or limit >= len(changed)
        out = []
        for pid, book_changed in (changed.items() if every else islice(changed.items(), max(0, limit))):
            e = self._entries[pid]
            assert e.state is not None and e.book is not None
            if book_changed or e.book_json is None:
                e.book_json = encode_book(e.book, e.alert_json)
            e.raw = encode(e.state, e.book, e.book_json, e.offset)
            e.journal = []
            out.append((pid, e.partition, e.raw))
        if every:
            changed.clear()
        else:
            for pid, _partition, _value in out:
                del changed[pid]
        return out

    def changed_count(self) -> int:
        return len(self._changed)

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

    def unreadable_ids(self, partitions: Iterable[int]) -> list[str]:
        """Patients of these partitions whose value ``load`` could not read."""
        parts = set(partitions)
        return sorted(pid for pid in self._unreadable
                      if (e := self._entries.get(pid)) is not None and e.partition in parts)

    def peek(self, patient_id: str) -> tuple[PatientState, AlertBook] | None:
        e = self._entries.get(patient_id)
        return None if e is None else self.load(patient_id, e.partition)

    # -- restore and ownership ---------------------------------------------------------
    def restore_record(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        if not key:
            return
        pid = key_patient_id(key)
        if value is None:
            self._remove(pid)
            return
        self._unreadable.discard(pid)  # a new value: read when first touched
        e = self._entries.get(pid)
        if e is None or e.partition != partition:
            if e is not None:
                self._remove(pid)
            e = self._entries[pid] = _Entry(partition, value)
            self._by_partition.setdefault(partition, set()).add(pid)
        else:
            e.raw, e.state, e.book, e.book_json = value, None, None, None
            e.alert_json = {}
            e.journal = []

    def drop(self, partitions: Iterable[int]) -> None:
        for p in list(partitions):
            for pid in self._by_partition.pop(p, set()):
                self._entries.pop(pid, None)
                self._changed.pop(pid, None)
                self._unreadable.discard(pid)

    def _remove(self, pid: str) -> None:
        e = self._entries.pop(pid, None)
        if e is not None:
            self._by_partition.get(e.partition, set()).discard(pid)
        self._changed.pop(pid, None)
        self._unreadable.discard(pid)

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
                try:
                    d = json.loads(e.raw)
                    _check_version(d)
                    raw = (d.get("alerts") or {}).get("alerts", {}).get(alert_id)
                    if raw is not None:
                        return Alert.model_validate(raw)
                except Exception:  # a value this release cannot read: not an alert held here
                    continue
        return None

    def __len__(self) -> int:
        return len(self._entries)
