"""Per-source code and unit maps: a lab's local observation codes -> LOINC, local units -> UCUM.

Most laboratory systems send their own codes (``ALT^ALT (GPT)^L``) and unit spellings
(``U/l``); only some add the LOINC as an alternate code. One YAML file per sending
facility, all in the directory named by ``CODE_MAPS_DIR``::

    # maps/central-lab.yaml
    source: CENTRAL LAB            # HL7: MSH-4 component 1 (else MSH-3); FHIR: Observation.meta.source
    also: [CENTRAL LAB BACKUP]     # optional further names of the same source
    codes:                         # local observation code -> LOINC
      ALT: 1742-6
      BILI: {loinc: 1975-2, unit: umol/L}   # optional default unit when the result has none
    units:                         # local unit spelling -> UCUM (applied to this source only)
      U/l: U/L
      umol/l: umol/L

Selection: HL7 v2 by the sending facility (MSH-4, component 1; MSH-3 when MSH-4 is
empty); FHIR by ``Observation.meta.source`` (the R4 element naming the source system),
else by the Bundle's ``meta.source``. A LOINC coding sent with the result always wins
over the map. A numeric result with only a local code not in its source's map is
dead-lettered ``unknown_local_code`` naming the code.

``monitor maps check FILE`` validates a map against the analyte catalogue: every LOINC
must be known and every unit convertible to the mapped analyte's canonical unit.
Pure: no Kafka here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from .analytes import AnalyteCatalogue, catalogue
from .errors import Rejected
from .yaml_text import safe_load as load_yaml

_LOINC = re.compile(r"^\d{1,7}-\d$")
#: bounds for a map file (it is configuration, but still read defensively)
MAX_ENTRIES = 5_000
MAX_TEXT = 64


@dataclass(frozen=True)
class CodeMap:
    source: str
    names: tuple[str, ...]
    codes: dict[str, str] = field(default_factory=dict)
    code_units: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    path: str = ""

    def loinc_for(self, local_code: str) -> str | None:
        return self.codes.get(local_code.strip())

    def ucum_for(self, unit: str) -> str:
        return self.units.get(unit.strip(), unit)

    def default_unit(self, local_code: str) -> str | None:
        return self.code_units.get(local_code.strip())


class CodeMapError(ValueError):
    """A map file that cannot be used (names the file and the entry)."""


def _text(value: object, what: str, path: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise CodeMapError(f"{path}: {what} must be text")
    t = str(value).strip()
    if not t or len(t) > MAX_TEXT:
        raise CodeMapError(f"{path}: {what} must be 1-{MAX_TEXT} characters")
    return t


def parse_code_map(data: object, path: str = "<map>") -> CodeMap:
    """A parsed YAML document -> :class:`CodeMap`; raises :class:`CodeMapError`."""
    if not isinstance(data, dict):
        raise CodeMapError(f"{path}: a code map is a YAML mapping with source, codes and units")
    unknown = sorted(set(map(str, data)) - {"source", "also", "codes", "units", "note"})
    if unknown:
        raise CodeMapError(f"{path}: unknown key(s) {', '.join(unknown)[:120]}")
    source = _text(data.get("source"), "source", path)
    also = data.get("also") or []
    if not isinstance(also, list):
        raise CodeMapError(f"{path}: also must be a list of names")
    names = (source, *(_text(a, "also", path) for a in also))
    codes: dict[str, str] = {}
    code_units: dict[str, str] = {}
    raw_codes = data.get("codes") or {}
    raw_units = data.get("units") or {}
    if not isinstance(raw_codes, dict) or not isinstance(raw_units, dict):
        raise CodeMapError(f"{path}: codes and units must be mappings")
    if len(raw_codes) + len(raw_units) > MAX_ENTRIES:
        raise CodeMapError(f"{path}: more than {MAX_ENTRIES} entries")
    for local, target in raw_codes.items():
        local = _text(local, "local code", path)
        if isinstance(target, dict):
            extra = sorted(set(map(str, target)) - {"loinc", "unit"})
            if extra:
                raise CodeMapError(f"{path}: code {local!r}: unknown key(s) {', '.join(extra)[:80]}")
            loinc = _text(target.get("loinc"), f"code {local!r} loinc", path)
            if target.get("unit") is not None:
                code_units[local] = _text(target["unit"], f"code {local!r} unit", path)
        else:
            loinc = _text(target, f"code {local!r} loinc", path)
        if not _LOINC.match(loinc):
            raise CodeMapError(f"{path}: code {local!r}: {loinc!r} is not a LOINC code (nnnnn-n)")
        codes[local] = loinc
    units = {_text(k, "local unit", path): _text(v, "UCUM unit", path) for k, v in raw_units.items()}
    return CodeMap(source=source, names=names, codes=codes, code_units=code_units, units=units, path=path)


def load_code_map(path: str | Path) -> CodeMap:
    p = Path(path)
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CodeMapError(f"{p}: not valid YAML ({str(exc).splitlines()[0][:120]})") from None
    return parse_code_map(data, str(p))


class CodeMaps:
    """Every map of a directory, by source name (exact, surrounding blanks ignored)."""

    def __init__(self, maps: list[CodeMap]) -> None:
        self.maps = maps
        self._by_name: dict[str, CodeMap] = {}
        for m in maps:
            for name in m.names:
                if name in self._by_name:
                    raise CodeMapError(f"{m.path}: source {name!r} already mapped by {self._by_name[name].path}")
                self._by_name[name] = m

    def for_source(self, name: str | None) -> CodeMap | None:
        return self._by_name.get((name or "").strip()) if name else None

    def __len__(self) -> int:
        return len(self.maps)


@lru_cache(maxsize=8)
def load_code_maps(directory: str) -> CodeMaps | None:
    """Every ``*.yaml``/``*.yml`` file of ``directory`` (empty = no maps). Raises
    :class:`CodeMapError` for a bad file: a service must not start with a broken map."""
    if not directory:
        return None
    d = Path(directory)
    if not d.is_dir():
        raise CodeMapError(f"CODE_MAPS_DIR {directory!r} is not a directory")
    files = sorted([*d.glob("*.yaml"), *d.glob("*.yml")])
    return CodeMaps([load_code_map(f) for f in files])


def check_code_map(cmap: CodeMap, cat: AnalyteCatalogue | None = None) -> list[str]:
    """Problems of ``cmap`` against the analyte catalogue (empty = fine): every LOINC
    known, every per-code unit and every mapped unit convertible to the canonical unit
    of the analyte(s) the map's codes point at."""
    cat = cat or catalogue()
    problems: list[str] = []
    analytes = []
    for local, loinc in cmap.codes.items():
        analyte = cat.by_loinc.get(loinc)
        if analyte is None:
            problems.append(f"code {local!r}: LOINC {loinc} is not in the analyte catalogue")
            continue
        analytes.append(analyte)
        unit = cmap.code_units.get(local)
        if unit is not None:
            try:
                cat.convert(analyte, 1.0, cmap.ucum_for(unit))
            except Rejected:
                problems.append(f"code {local!r}: unit {unit!r} does not convert to {analyte.canonical_unit!r} "
                                f"({analyte.key})")
    for local, ucum in cmap.units.items():
        ok = False
        for analyte in analytes:
            try:
                cat.convert(analyte, 1.0, ucum)
                ok = True
                break
            except Rejected:
                pass
        if not ok:
            problems.append(f"unit {local!r} -> {ucum!r} converts to the canonical unit of none of the mapped "
                            f"analytes")
    return problems
