"""HL7 v2.x ORU^R01 -> canonical observations, and ACK building for the MLLP listener.

Parsed with the ``hl7`` package after normalising the text: MLLP framing bytes are
stripped and ``\\r\\n`` / ``\\n`` segment separators become ``\\r`` (``hl7`` silently
reads a ``\\n``-separated message as ONE segment). Every observation is built with
:func:`schemas.canonical.build_observation`.

Decisions:

* **Processing id**: MSH-11 component 1 must equal the configured processing id
  (``HL7_PROCESSING_ID``, default ``P``); a test (``T``) or debugging (``D``) message
  on a production link is ``hl7_processing_id`` and stores nothing (MLLP: AR, ERR 202).
* **Message**: MSH-9 must be ``ORU^R01`` (else ``hl7_unsupported_message``); one
  message per call (a second MSH, or FHS/BHS batch envelopes: ``hl7_invalid``).
  Several PID and OBR groups are fine: each OBX belongs to the PID and OBR above it.
* **Patient**: PID-3, first repetition, component 1 (``hl7_no_patient`` if empty).
* **Code**: OBX-3 with coding system ``LN`` in component 3, else the alternate code in
  components 4-6. Without LN, the local code (component 1, else 4) is looked up in the
  sending facility's code map (``schemas.codemaps``, selected by MSH-4); a numeric OBX
  (NM/SN) whose local code is in no map is rejected (``unknown_local_code`` naming the
  code), one with no code at all ``hl7_not_loinc``: it might be an analyte we monitor. A
  *non-numeric* OBX (TX, FT, ST, CWE, CE...) without LN is skipped (comments,
  morphology text). An LN code in no value set is skipped (an identified analyte
  this service has no value set for, e.g. the erythrocyte count of a CBC) -- but a
  message that yields no observation at all is rejected with the first skip reason
  (``unknown_loinc`` / ``hl7_not_loinc``), as a single JSON result would be. A code in
  the value sets sent with a value type other than NM/SN is ``hl7_bad_value``.
* **Value**: NM -> the number; SN -> ``^182`` or ``=^182`` is 182. A comparator
  (``<^5``, ``>^100``, ``<=``, ``>=``) or an NM value like ``<5`` / ``>3000`` is a
  detection or reporting limit: the bound becomes ``value`` and the comparator the
  observation's ``comparator`` (the rule engine grades it conservatively, or raises
  ``data_quality.censored_value`` when it cannot). SN ranges/ratios
  (``1^-^5``, ``1^:^128``) and non-numbers are ``hl7_bad_value``. An empty value is
  allowed only for a withdrawal (X/D/W).
* **Units**: OBX-6 component 1, converted through the analyte tables (aliases such as
  ``mg/dl`` are listed there).
* **Reference range** (OBX-7): ``10-40``, ``3.5 - 5.0``, ``4.3 to 6.2``, ``<5`` (high 5),
  ``>10`` (low 10), also ``<=``/``>=`` and negative numbers. Anything else (free text
  such as ``Recommended: <200; ...``) is dropped, not rejected: the range is context,
  the protocol's thresholds drive the rules.
* **Abnormal flag**: OBX-8, first repetition, kept as sent (H, L, HH, LL, N, A...).
* **Status** (OBX-11): F->final, C->corrected, P->preliminary, R (entered, not
  verified)->preliminary, S (partial)->preliminary, A (amended)->amended, U (status
  changed to final without retransmission)->final, X (result cannot be
  obtained)->cancelled, D (delete)->entered-in-error, W (wrong, e.g. wrong
  patient)->entered-in-error. I (pending), N (not asked), O (order detail only) carry
  no result: the OBX is skipped. Empty or anything else: ``hl7_bad_value``.
* **Ids**: ``observation_id`` = ``event_id`` = ``<OBR-3 filler order number>:<LOINC>``
  (else OBR-2 placer order number; else ``<MSH-10>:<OBX-1>``, which is NOT stable
  across corrections). A C/D/W result for the same order and code therefore names the
  same observation id as the original, which the canonical model treats as replaced
  or withdrawn (``corrects`` stays ``None``). The same code twice in one order is
  ``hl7_invalid``.
* **Time**: OBX-14, else OBR-7. ``YYYYMMDDHH[MM[SS[.S...]]][+/-ZZZZ]``. Without an
  offset the time is naive: ``naive_timestamp`` unless ``default_tz`` is given, in
  which case the local time is read in that zone. A date without time of day is
  ``naive_timestamp`` too. A malformed timestamp or no time at all is ``hl7_bad_value``.
* **Source**: MSH-4 (sending facility) component 1, else MSH-3, else ``hl7``.
"""
from __future__ import annotations

import logging
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo

from .analytes import catalogue
from .canonical import DEFAULT_HL7_LIMITS, DEFAULT_LIMITS, Hl7Limits, build_observation
from .errors import Reason, Rejected
from .events import Observation, ReferenceRange, ResultStatus

log = logging.getLogger(__name__)

START_BLOCK = "\x0b"
END_BLOCK = "\x1c"

#: OBX-11 -> canonical status; ``None`` = the OBX carries no result and is skipped.
STATUS_MAP: dict[str, ResultStatus | None] = {
    "F": ResultStatus.FINAL,
    "C": ResultStatus.CORRECTED,
    "P": ResultStatus.PRELIMINARY,
    "R": ResultStatus.PRELIMINARY,
    "S": ResultStatus.PRELIMINARY,
    "A": ResultStatus.AMENDED,
    "U": ResultStatus.FINAL,
    "X": ResultStatus.CANCELLED,
    "D": ResultStatus.ENTERED_IN_ERROR,
    "W": ResultStatus.ENTERED_IN_ERROR,
    "I": None,
    "N": None,
    "O": None,
}

NUMERIC_TYPES = frozenset({"NM", "SN"})

_TS = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})(?P<d>\d{2})"
    r"(?:(?P<h>\d{2})(?:(?P<mi>\d{2})(?:(?P<s>\d{2})(?:\.(?P<f>\d{1,4}))?)?)?)?"
    r"(?P<tz>[+-]\d{4})?$"
)
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_NUMBER = re.compile(rf"^{_NUM}$")
_RANGE = re.compile(rf"^\s*({_NUM})\s*(?:-|to|TO|\u2013)\s*({_NUM})\s*$")
_BOUND = re.compile(rf"^\s*(<=|>=|<|>)\s*({_NUM})\s*$")
_CENSORED = re.compile(rf"^\s*(<=|>=|<|>)\s*{_NUM}\s*$")


@dataclass(frozen=True)
class Skipped:
    ref: str
    reason: Reason
    message: str


@dataclass
class Hl7Result:
    observations: list[Observation] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    control_id: str = ""


# ---------------------------------------------------------------- text handling


def normalise(text: str) -> str:
    """Strip MLLP framing and make ``\\r`` the only segment separator."""
    t = text
    start = t.find(START_BLOCK)
    if start != -1 and not t[:start].strip():
        t = t[start + 1 :]
    end = t.rfind(END_BLOCK)
    if end != -1 and not t[end + 1 :].strip():
        t = t[:end]
    t = t.replace("\r\n", "\r").replace("\n", "\r")
    segments = [s for s in t.split("\r") if s.strip()]
    return "\r".join(segments) + "\r" if segments else ""


# ---------------------------------------------------------------- bounded structural parsing
#
# A hostile message must cost little (security review H1: the ``hl7`` package splits
# every field into repetitions, components and sub-components up front; a 1 MiB
# ``NTE|1|^&~^&~...`` took ~5 s and ~450 MiB). Here the structure is checked with
# ``str.count`` (C speed, no allocation) BEFORE anything is split: the character cap,
# the number of segments, and per segment the number of fields, repetitions,
# components and sub-components (``Hl7Limits``). A message over any of them is
# rejected with ``payload_too_large`` or ``too_complex`` and a reason naming the
# limit. Segments are then split into fields only; a field is split into its
# repetitions / components / sub-components only when it is read (``_part``), with a
# bounded ``maxsplit``. Unread segments (NTE, Z-segments...) are never split.


_DEFAULT_SEPS = ("|", "^", "~", "&")


class Segment:
    """One segment split into fields; ``fields[0]`` is the segment name.

    For MSH, ``fields[1]`` is the field separator and ``fields[2]`` the encoding
    characters, so ``fields[n]`` is MSH-n as in the standard (and the ``hl7`` package).
    """

    __slots__ = ("fields", "seps")

    def __init__(self, fields: list[str], seps: tuple[str, str, str, str]) -> None:
        self.fields = fields
        self.seps = seps  # field, component, repetition, sub-component

    @property
    def name(self) -> str:
        return self.fields[0].strip()


def _separators(t: str) -> tuple[str, str, str, str]:
    fs = t[3]
    enc = t[4:].split(fs, 1)[0]
    comp = enc[0] if len(enc) > 0 else "^"
    rep = enc[1] if len(enc) > 1 else "~"
    sub = enc[3] if len(enc) > 3 else "&"
    seps = (fs, comp, rep, sub)
    if len(set(seps)) != 4 or any(c in "\r\n" or c.isalnum() or c.isspace() for c in seps):
        raise Rejected(Reason.HL7_INVALID, "MSH-1/MSH-2 do not define four distinct delimiter characters")
    return seps


def split_message(text: str, limits: Hl7Limits = DEFAULT_HL7_LIMITS) -> list[Segment]:
    """Normalise, check the structural limits, and split into segments and fields.

    Raises ``Rejected`` (``payload_too_large`` / ``too_complex`` / ``hl7_invalid``)
    before splitting anything when a limit is exceeded.
    """
    if len(text) > limits.max_chars:
        raise Rejected(
            Reason.PAYLOAD_TOO_LARGE,
            f"HL7 v2 message of {len(text)} characters exceeds the HL7 cap of {limits.max_chars}",
        )
    t = normalise(text)
    if not t.startswith("MSH"):
        raise Rejected(Reason.HL7_INVALID, "message does not start with an MSH segment")
    if len(t) < 8:
        raise Rejected(Reason.HL7_INVALID, "MSH segment too short")
    n_segments = t.count("\r")
    if n_segments > limits.max_segments:
        raise Rejected(Reason.TOO_COMPLEX, f"{n_segments} segments exceed the limit of {limits.max_segments}")
    seps = _separators(t)
    fs, comp, rep, sub = seps
    raw_segments = t.split("\r")[:-1]
    for i, raw in enumerate(raw_segments, 1):
        for sep, cap, what in (
            (fs, limits.max_fields, "fields"),
            (rep, limits.max_repetitions, "repetitions"),
            (comp, limits.max_components, "components"),
            (sub, limits.max_subcomponents, "sub-components"),
        ):
            n = raw.count(sep)
            if n > cap:
                name = raw[:3].encode("ascii", "replace").decode()
                raise Rejected(
                    Reason.TOO_COMPLEX, f"segment {i} ({name}) has {n} {what}, more than the limit of {cap}"
                )
    out: list[Segment] = []
    for i, raw in enumerate(raw_segments):
        fields = raw.split(fs)
        if i == 0:  # MSH: MSH-1 is the field separator itself
            fields = [fields[0], fs] + fields[1:]
        out.append(Segment(fields, seps))
    return out


def _part(seg: Segment, f: int, r: int = 1, c: int = 1, s: int = 1) -> str:
    """Field ``f``, repetition ``r``, component ``c``, sub-component ``s`` as text ('' if absent)."""
    try:
        x = seg.fields[f]
    except IndexError:
        return ""
    _, comp, rep, sub = seg.seps
    if f == 2 and seg.name == "MSH":  # the encoding characters are not split
        return x.strip() if (r, c, s) == (1, 1, 1) else ""
    for idx, sep in ((r, rep), (c, comp), (s, sub)):
        parts = x.split(sep, idx)  # bounded: never more than idx + 1 pieces
        if len(parts) < idx:
            return ""
        x = parts[idx - 1]
    return x.strip()


def _field(seg: Segment, f: int) -> str:
    try:
        return seg.fields[f].strip()
    except IndexError:
        return ""


def _repetitions(seg: Segment, f: int) -> int:
    try:
        x = seg.fields[f]
    except IndexError:
        return 0
    return x.count(seg.seps[2]) + 1 if x else 0


def parse_message(text: str, limits: Hl7Limits = DEFAULT_HL7_LIMITS) -> list[Segment]:
    """Normalise and split within ``limits``. Raises ``Rejected``."""
    return split_message(text, limits)


def parse_ts(raw: str, default_tz: tzinfo | None, what: str) -> datetime:
    m = _TS.match(raw.strip())
    if not m:
        raise Rejected(Reason.HL7_BAD_VALUE, f"{what} {raw[:30]!r} is not an HL7 timestamp YYYYMMDDHHMM[SS][+/-ZZZZ]")
    g = m.groupdict()
    if g["h"] is None:
        raise Rejected(Reason.NAIVE_TIMESTAMP, f"{what} {raw[:30]!r} is a date without time of day")
    try:
        frac = g["f"] or ""
        dt = datetime(
            int(g["y"]), int(g["mo"]), int(g["d"]), int(g["h"]), int(g["mi"] or 0), int(g["s"] or 0),
            int((frac + "000000")[:6]) if frac else 0,
        )
        if g["tz"]:
            sign = 1 if g["tz"][0] == "+" else -1
            hh, mm = int(g["tz"][1:3]), int(g["tz"][3:5])
            if hh > 23 or mm > 59:
                raise ValueError("offset")
            return dt.replace(tzinfo=timezone(sign * timedelta(hours=hh, minutes=mm)))
    except ValueError:
        raise Rejected(Reason.HL7_BAD_VALUE, f"{what} {raw[:30]!r} is not a valid date/time") from None
    if default_tz is None:
        raise Rejected(
            Reason.NAIVE_TIMESTAMP,
            f"{what} {raw[:30]!r} has no UTC offset (send +/-ZZZZ or configure a default time zone)",
        )
    return dt.replace(tzinfo=default_tz)


def _number(raw: str, where: str) -> float:
    if not _NUMBER.match(raw.strip()):
        raise Rejected(Reason.HL7_BAD_VALUE, f"{where}: value {raw[:20]!r} is not a number")
    v = float(raw)
    if not math.isfinite(v):
        raise Rejected(Reason.NON_FINITE_VALUE, f"{where}: value is not finite")
    return v


def _value(obx, vtype: str, where: str) -> tuple[float | None, str | None]:
    """(value, comparator): a censored result (``>^3000``, NM ``<5``) gives its bound and comparator."""
    if _repetitions(obx, 5) > 1:
        raise Rejected(Reason.HL7_BAD_VALUE, f"{where}: OBX-5 repeats; one numeric value expected")
    if vtype == "NM":
        raw = _field(obx, 5)
        if raw == "":
            return None, None
        m = _CENSORED.match(raw)
        if m:
            comparator = m.group(1)
            return _number(raw.strip()[len(comparator):], where), comparator
        return _number(raw, where), None
    # SN: <comparator>^<num1>^<separator/suffix>^<num2>
    comparator = _part(obx, 5, 1, 1)
    num1 = _part(obx, 5, 1, 2)
    sep = _part(obx, 5, 1, 3)
    num2 = _part(obx, 5, 1, 4)
    if not (comparator or num1 or sep or num2):
        return None, None
    if sep or num2:
        raise Rejected(Reason.HL7_BAD_VALUE, f"{where}: SN range or ratio is not a single value")
    if comparator not in ("", "=", "<", ">", "<=", ">="):
        raise Rejected(Reason.HL7_BAD_VALUE, f"{where}: SN comparator {comparator[:4]!r} is not supported")
    if num1 == "":
        raise Rejected(Reason.HL7_BAD_VALUE, f"{where}: SN without a number")
    return _number(num1, where), (comparator if comparator in ("<", ">", "<=", ">=") else None)


def parse_range(raw: str) -> ReferenceRange | None:
    """OBX-7 -> reference range; ``None`` when absent or not a plain range."""
    raw = (raw or "").strip()
    if not raw:
        return None
    m = _RANGE.match(raw)
    if m:
        low, high = float(m.group(1)), float(m.group(2))
        if math.isfinite(low) and math.isfinite(high) and low <= high:
            return ReferenceRange(low=low, high=high)
        return None
    m = _BOUND.match(raw)
    if m:
        v = float(m.group(2))
        if not math.isfinite(v):
            return None
        return ReferenceRange(high=v) if m.group(1).startswith("<") else ReferenceRange(low=v)
    return None


def _loinc(obx) -> str | None:
    if _part(obx, 3, 1, 3).upper() == "LN" and _part(obx, 3, 1, 1):
        return _part(obx, 3, 1, 1)
    if _part(obx, 3, 1, 6).upper() == "LN" and _part(obx, 3, 1, 4):
        return _part(obx, 3, 1, 4)
    return None


# ---------------------------------------------------------------- MSH screening and dispatch

#: ADT trigger events of the patients feed (handled outside this module)
ADT_TRIGGERS = frozenset({"A01", "A04", "A08", "A31"})


def message_kind(msh: Segment) -> str:
    """``'oru'`` (ORU^R01), ``'adt'`` (ADT^A01/A04/A08/A31) or ``'unsupported'``: the ONE
    place that decides which handler a message goes to (MLLP and Kafka input alike)."""
    mtype, trigger = _part(msh, 9, 1, 1).upper(), _part(msh, 9, 1, 2).upper()
    if (mtype, trigger) == ("ORU", "R01"):
        return "oru"
    if mtype == "ADT" and trigger in ADT_TRIGGERS:
        return "adt"
    return "unsupported"


def check_processing_id(msh: Segment, expected: str = "P") -> None:
    """Raise ``hl7_processing_id`` unless MSH-11 component 1 is ``expected``."""
    got = _part(msh, 11, 1, 1).upper()
    if got != (expected or "P").upper():
        raise Rejected(
            Reason.HL7_PROCESSING_ID,
            f"processing id MSH-11 {escape(got[:3])!r} is not this link's {expected[:3]!r}: not processed",
            location="MSH^1^11",
        )


def unsupported(msh: Segment, handled: str = "ORU^R01") -> Rejected:
    mtype, trigger = _part(msh, 9, 1, 1).upper(), _part(msh, 9, 1, 2).upper()
    return Rejected(
        Reason.HL7_UNSUPPORTED_MESSAGE,
        f"message type {escape(mtype[:8])}^{escape(trigger[:8])} is not supported ({handled} only)",
        location="MSH^1^9",
    )


def read_msh(message_text: str | bytes) -> Segment | None:
    """The MSH segment alone, read from the first segment ONLY (the rest of the
    message, however large or hostile, is never looked at); ``None`` if there is none."""
    if isinstance(message_text, (bytes, bytearray)):
        head = bytes(message_text[:_ACK_HEAD])
        for term in (b"\r", b"\n"):  # the first segment only (never split a character)
            i = head.find(term, 1)
            if i != -1:
                head = head[:i]
        try:
            message_text = head.decode("utf-8")
        except UnicodeDecodeError:
            message_text = head.decode("latin-1")
    t = message_text[:_ACK_HEAD].lstrip()
    if t.startswith(START_BLOCK):
        t = t[1:].lstrip()
    end = len(t)
    for term in ("\r", "\n", END_BLOCK):
        i = t.find(term, 0, end)
        if i != -1:
            end = i
    first = t[:end]
    if not first.startswith("MSH") or len(first) < 8:
        return None
    try:
        (msh,) = split_message(first + "\r", Hl7Limits(max_chars=len(first) + 1, max_segments=1))
    except Rejected:
        return None
    return msh


# ---------------------------------------------------------------- ORU^R01


def observations_from_hl7(
    text: str,
    *,
    received_at: datetime,
    limits=None,
    default_tz: tzinfo | None = None,
    source: str | None = None,
) -> list[Observation]:
    """An ORU^R01 message -> canonical observations. Raises ``Rejected``."""
    return parse_oru(text, received_at=received_at, limits=limits, default_tz=default_tz, source=source).observations


def parse_oru(
    text: str,
    *,
    received_at: datetime,
    limits=None,
    default_tz: tzinfo | None = None,
    source: str | None = None,
) -> Hl7Result:
    """Like :func:`observations_from_hl7` but also reports skipped OBX segments."""
    limits = limits or DEFAULT_LIMITS
    try:
        return _oru(text, received_at, limits, default_tz, source)
    except Rejected:
        raise
    except Exception as exc:  # never let anything but Rejected escape
        raise Rejected(Reason.HL7_INVALID, f"unexpected {type(exc).__name__} while reading HL7 v2") from None


def _oru(text: str, received_at: datetime, limits, default_tz: tzinfo | None, source: str | None) -> Hl7Result:
    if not isinstance(text, str):
        raise Rejected(Reason.HL7_INVALID, "HL7 v2 message must be text")
    msg = parse_message(text, getattr(limits, "hl7", DEFAULT_HL7_LIMITS))
    msh = msg[0]
    check_processing_id(msh, getattr(limits, "hl7_processing_id", "P"))
    if message_kind(msh) != "oru":
        raise unsupported(msh)
    control_id = _part(msh, 10)
    src = source or _part(msh, 4) or _part(msh, 3) or "hl7"
    code_map = None
    maps = getattr(limits, "code_maps", None)
    if maps is not None:
        code_map = maps.for_source(_part(msh, 4) or _part(msh, 3))
    out = Hl7Result(control_id=control_id)
    cat = catalogue()

    patient_id: str | None = None
    order_id: str | None = None
    obr_time: str = ""
    seen_pid = False
    n_obx = 0
    ids: set[str] = set()

    for index, seg in enumerate(msg):
        name = seg.name
        if name == "MSH" and index > 0:
            raise Rejected(Reason.HL7_INVALID, "more than one MSH segment: send one message per frame")
        if name in ("FHS", "BHS", "BTS", "FTS"):
            raise Rejected(Reason.HL7_INVALID, f"{name}: batch envelopes are not supported")
        if name == "PID":
            seen_pid = True
            patient_id = _part(seg, 3, 1, 1) or None
            order_id, obr_time = None, ""
            if patient_id is None:
                raise Rejected(Reason.HL7_NO_PATIENT, "PID-3 (patient identifier list) is empty", location="PID^1^3")
        elif name == "OBR":
            order_id = _part(seg, 3, 1, 1) or _part(seg, 2, 1, 1) or None
            obr_time = _part(seg, 7, 1, 1)
            if not order_id:
                order_id = None
            obr_set = _part(seg, 1) or str(index)
            if order_id is None:
                order_id = f"{control_id or 'msg'}:{obr_set}"
                log.debug("hl7: OBR without filler/placer order number; ids fall back to MSH-10")
        elif name == "OBX":
            n_obx += 1
            if not seen_pid or patient_id is None:
                raise Rejected(Reason.HL7_NO_PATIENT, "OBX before any PID segment")
            if order_id is None:
                raise Rejected(Reason.HL7_INVALID, "OBX before any OBR segment")
            set_id = _part(seg, 1) or str(n_obx)
            where = f"OBX-{set_id}"
            try:
                _obx(seg, n_obx, where, set_id, patient_id, order_id, obr_time, src, code_map, cat, ids, out,
                     received_at, limits, default_tz)
            except Rejected as rej:
                if rej.location is None:
                    rej.location = f"OBX^{n_obx}"
                raise
    if not seen_pid:
        raise Rejected(Reason.HL7_NO_PATIENT, "no PID segment")
    if n_obx == 0:
        raise Rejected(Reason.HL7_INVALID, "no OBX segment")
    if not out.observations:
        first = out.skipped[0]
        more = f" (and {len(out.skipped) - 1} more skipped)" if len(out.skipped) > 1 else ""
        raise Rejected(first.reason, first.message + more)
    return out


def _local_code(obx: Segment) -> tuple[str, str]:
    """(code, coding system) of a non-LOINC OBX-3: components 1/3, else 4/6."""
    if _part(obx, 3, 1, 1):
        return _part(obx, 3, 1, 1), _part(obx, 3, 1, 3)
    return _part(obx, 3, 1, 4), _part(obx, 3, 1, 6)


def _obx(seg: Segment, n_obx: int, where: str, set_id: str, patient_id: str, order_id: str, obr_time: str,
         src: str, code_map, cat, ids: set[str], out: Hl7Result, received_at: datetime, limits,
         default_tz: tzinfo | None) -> None:
    """One OBX -> an observation appended to ``out`` (or a skip). Raises ``Rejected``
    with ``location`` = ``OBX^<n>^<field>`` of the failing field."""
    fno = 3
    try:
        vtype = _part(seg, 2).upper()
        loinc = _loinc(seg)
        local = None
        if loinc is None:
            local, local_system = _local_code(seg)
            if local and code_map is not None:
                loinc = code_map.loinc_for(local)
        ref = f"{order_id}:{loinc or set_id}"

        def skip(reason: Reason, message: str) -> None:
            log.debug("hl7: skipped an OBX (%s)", reason.value)
            out.skipped.append(Skipped(ref, reason, message))

        fno = 11
        status_code = _part(seg, 11).upper()
        if status_code not in STATUS_MAP:
            raise Rejected(
                Reason.HL7_BAD_VALUE, f"{where}: result status OBX-11 {status_code[:4]!r} is not supported"
            )
        status = STATUS_MAP[status_code]
        fno = 3
        if loinc is None:
            if vtype in NUMERIC_TYPES:
                if local:
                    facility = code_map.source if code_map is not None else src
                    raise Rejected(
                        Reason.UNKNOWN_LOCAL_CODE,
                        f"{where}: local code {escape(local[:40])!r} (system {escape(local_system[:20])!r}) "
                        f"from {escape(str(facility)[:60])!r} has no LOINC in "
                        + ("its code map" if code_map is not None else "any code map (none for this source)"),
                    )
                raise Rejected(
                    Reason.HL7_NOT_LOINC,
                    f"{where}: numeric result without a LOINC (LN) code in OBX-3 components 1-3 or 4-6",
                )
            skip(Reason.HL7_NOT_LOINC, f"{where}: non-numeric result without a LOINC code")
            return
        analyte = cat.by_loinc.get(loinc)
        if analyte is None:
            skip(Reason.UNKNOWN_LOINC, f"LOINC code {loinc!r} is not in any value set")
            return
        if status is None:
            skip(Reason.HL7_BAD_VALUE, f"{where}: status {status_code!r} carries no result")
            return
        fno = 2
        if vtype not in NUMERIC_TYPES:
            raise Rejected(
                Reason.HL7_BAD_VALUE, f"{where}: value type {vtype[:4]!r} for {analyte.key}; NM or SN expected"
            )
        fno = 5
        value, comparator = _value(seg, vtype, where)
        fno = 6
        unit = _part(seg, 6, 1, 1) or None
        if code_map is not None:
            unit = code_map.ucum_for(unit) if unit is not None else (code_map.default_unit(local) if local else None)
        fno = 14
        ts_raw = _part(seg, 14, 1, 1) or obr_time
        if not ts_raw:
            raise Rejected(Reason.HL7_BAD_VALUE, f"{where}: no observation time in OBX-14 or OBR-7")
        effective_at = parse_ts(ts_raw, default_tz, f"{where} time")
        flag = _part(seg, 8, 1, 1) or None
        if flag is not None and len(flag) > 8:
            flag = None
        fno = 3
        oid = f"{order_id}:{loinc}"
        if oid in ids:
            raise Rejected(Reason.HL7_INVALID, f"{where}: LOINC {loinc} reported twice for the same order")
        ids.add(oid)
        # a unit that cannot be converted is the unit's fault (OBX-6), anything else the value's
        fno = 6
        obs = build_observation(
            observation_id=oid, event_id=oid, patient_id=patient_id, loinc=loinc, value=value,
            unit=unit, reference_range=parse_range(_field(seg, 7)), effective_at=effective_at,
            status=status, corrects=None, source=src[:128], fmt="hl7", received_at=received_at,
            limits=limits, abnormal_flag=flag, comparator=comparator,
        )
        out.observations.append(obs)
    except Rejected as rej:
        if rej.location is None:
            if fno == 6 and rej.reason in (Reason.FUTURE_TIMESTAMP, Reason.NAIVE_TIMESTAMP):
                fno = 14
            elif fno == 6 and rej.reason is not Reason.UNIT_NOT_CONVERTIBLE:
                fno = 5 if rej.reason is not Reason.UNKNOWN_LOINC else 3
            rej.location = f"OBX^{n_obx}^{fno}"
        raise


# ---------------------------------------------------------------- ACKs

#: Rejection reason -> HL7 table 0357 message error condition code (documented for
#: integrators in docs/integration.md, "Acknowledgements").
ERR_CODES: dict[Reason, tuple[str, str]] = {
    Reason.HL7_UNSUPPORTED_MESSAGE: ("200", "Unsupported message type"),
    Reason.HL7_PROCESSING_ID: ("202", "Unsupported processing id"),
    Reason.HL7_NO_PATIENT: ("101", "Required field missing"),
    Reason.HL7_INVALID: ("100", "Segment sequence error"),
    Reason.UNKNOWN_LOINC: ("103", "Table value not found"),
    Reason.UNKNOWN_LOCAL_CODE: ("103", "Table value not found"),
    Reason.HL7_NOT_LOINC: ("103", "Table value not found"),
    Reason.UNIT_NOT_CONVERTIBLE: ("103", "Table value not found"),
    Reason.PAYLOAD_TOO_LARGE: ("207", "Application internal error"),
    Reason.INTERNAL_ERROR: ("207", "Application internal error"),
}
_ERR_CODES = ERR_CODES
_DEFAULT_ERR = ("102", "Data type error")
_INTERNAL_ERR = ("207", "Application internal error")


def escape(text: str) -> str:
    """Escape HL7 delimiters (default encoding characters) and flatten line breaks."""
    out = (
        text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
        .replace("&", "\\T\\").replace("~", "\\R\\")
    )
    return " ".join(out.split())


#: longest text copied from the sender's MSH into the ACK's MSH (HD is 227 in v2.5)
_ACK_COPY_MAX = 227
#: the ACK reads the MSH from at most this many leading characters of the message
_ACK_HEAD = 65_536
_LOCATION = re.compile(r"^[A-Z][A-Z0-9]{2}(\^\d{1,4}){0,5}$")


def _version(msh: Segment | None) -> tuple[int, int]:
    """MSH-12 as (major, minor); an absent or unreadable version counts as 2.5."""
    m = re.match(r"^(\d)\.(\d+)", _part(msh, 12, 1, 1)) if msh is not None else None
    return (int(m.group(1)), int(m.group(2))) if m else (2, 5)


def _ack_msh(msh: Segment | None, ts: str) -> tuple[str | None, str]:
    """The ACK's MSH and the control id, from the sender's MSH segment alone."""
    if msh is None:
        return None, ""

    def copy(n: int) -> str:
        raw = _field(msh, n)
        if msh.seps != _DEFAULT_SEPS:  # other delimiters: keep the first component, escaped
            raw = escape(_part(msh, n))
        return raw[:_ACK_COPY_MAX].replace("\r", " ")

    trigger = escape(_part(msh, 9, 1, 2))[:8]
    header = "|".join([
        "MSH", "^~\\&", copy(5), copy(6), copy(3), copy(4), ts, "",
        f"ACK^{trigger}^ACK", uuid.uuid4().hex[:20], copy(11), copy(12),
    ])
    return header, _part(msh, 10)[:_ACK_COPY_MAX]


def err_segment(version: tuple[int, int], code: str, name: str, location: str | None, text: str) -> str:
    """ERR for the sender's HL7 version.

    * before v2.5: ``ERR-1`` (CM/ELD: segment ^ sequence ^ field ^ code&text&HL70357),
      the only ERR field there is (required in v2.3/2.3.1/2.4);
    * v2.5 and later: ``ERR-2`` location (ERL: segment ^ sequence ^ field), ``ERR-3``
      code (CWE, table 0357), ``ERR-4`` severity ``E``, ``ERR-8`` the full text.
    """
    loc = location if location and _LOCATION.match(location) else ""
    if version < (2, 5):
        parts = (loc.split("^") + ["", "", ""])[:3]
        return f"ERR|{parts[0]}^{parts[1]}^{parts[2]}^{code}&{name}&HL70357"
    return f"ERR||{loc}|{code}^{name}^HL70357|E||||{escape(text[:250])}"


def build_ack(
    message_text: str | bytes,
    code: str,
    error_text: str = "",
    *,
    reason: Reason | None = None,
    location: str | None = None,
) -> bytes:
    """An ACK for ``message_text`` (``AA``/``AE``/``AR``), MLLP framing NOT included.

    Built from the sender's MSH segment alone (security review H1). MSH-7 is UTC with
    its offset (``+0000``). MSA-3 carries ``error_text`` (escaped, at most 80
    characters as in v2.x); for AE/AR an ERR segment laid out for the sender's version
    (:func:`err_segment`) carries the HL7 table 0357 code, the location of the failing
    field (``location``, e.g. ``OBX^2^6``) and, from v2.5, the full text in ERR-8.
    When the message cannot be parsed at all a minimal v2.5 ACK with an empty MSA-2 is built.
    """
    if code not in ("AA", "AE", "AR"):
        raise ValueError(f"ack code {code!r}")
    plain = " ".join((error_text or "").split())
    ts = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S+0000")
    try:
        msh = read_msh(message_text)
        header, control_id = _ack_msh(msh, ts)
    except Exception:
        msh, header, control_id = None, None, ""
    if header is None:
        msh = None
        header = f"MSH|^~\\&|||||{ts}||ACK|{uuid.uuid4().hex[:20]}|P|2.5"
    msa = f"MSA|{code}|{escape(control_id)}"
    if plain:
        msa += f"|{escape(plain[:80])}"
    segments = [header, msa]
    if code != "AA":
        err_code, err_name = _ERR_CODES.get(reason, _INTERNAL_ERR if reason is None else _DEFAULT_ERR)
        segments.append(err_segment(_version(msh), err_code, err_name, location, plain))
    return ("\r".join(segments) + "\r").encode("utf-8")
