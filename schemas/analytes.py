"""LOINC value sets and unit conversion to one canonical unit per analyte.

The tables are data (``schemas/data/analytes.yaml``, with the LOINC licence notice).
A unit that is not listed for an analyte is never guessed: ``convert`` raises
``Rejected(UNIT_NOT_CONVERTIBLE)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from .errors import Reason, Rejected
from .yaml_text import safe_load as load_yaml

SIGNIFICANT_DIGITS = 10


@dataclass(frozen=True)
class UnitConversion:
    factor: float
    offset: float = 0.0

    def apply(self, value: float) -> float:
        return round_sig(value * self.factor + self.offset)


@dataclass(frozen=True)
class Analyte:
    key: str
    name: str
    kind: str  # "lab" | "vital"
    loinc: tuple[str, ...]
    canonical_unit: str
    units: dict[str, UnitConversion] = field(hash=False, compare=False)
    monitored: bool = True
    unconfirmed: bool = False
    #: the values the quantity can take, in the canonical unit (``valid`` in the catalogue;
    #: default: not below 0, no upper bound). A value outside is dead-lettered as
    #: ``implausible_value``, never judged: platelets of -40 are not a grade 4 count
    valid_min: float | None = 0.0
    valid_max: float | None = None


def round_sig(value: float, digits: int = SIGNIFICANT_DIGITS, _isfinite=math.isfinite, _floor=math.floor,
              _log10=math.log10) -> float:
    """Round to significant digits so conversions that are exact on paper compare equal."""
    if value == 0 or not _isfinite(value):
        return value
    try:
        return round(value, digits - 1 - int(_floor(_log10(abs(value)))))
    except OverflowError:  # rounded past the largest double: infinite, as float arithmetic overflows
        return math.copysign(math.inf, value)


#: ``round_sig`` of values seen (bounded): a pure function of the float, and values repeat
#: (a heart rate, a lab's usual reporting steps); rounding is ~0.4 us, a hit ~0.05 us
_ROUNDED: dict[float, float] = {}
MAX_ROUNDED = 16_384  # ~2 MB at most (the table and two floats an entry)


def round_sig_cached(value: float) -> float:
    """``round_sig(value)`` (the same float), remembered for a finite, non-zero float with a
    finite result: zero is not kept (-0.0 and 0.0 are equal keys but not the same result),
    nor NaN or an infinity (returned as they are)."""
    if type(value) is not float:
        return round_sig(value)
    r = _ROUNDED.get(value)
    if r is None:
        r = round_sig(value)
        if value != 0 and r - r == 0:
            if len(_ROUNDED) >= MAX_ROUNDED:
                _ROUNDED.clear()
            _ROUNDED[value] = r
    return r


class AnalyteCatalogue:
    def __init__(self, data: dict) -> None:
        self.aliases: dict[str, str] = dict(data.get("aliases") or {})
        self.by_key: dict[str, Analyte] = {}
        self.by_loinc: dict[str, Analyte] = {}
        #: (analyte key, unit as received) -> (analyte, conversion): see ``conversion``
        self._conversions: dict[tuple[str, str | None], tuple[Analyte, UnitConversion]] = {}
        for key, spec in data["analytes"].items():
            units = {
                u: UnitConversion(float(c["factor"]), float(c.get("offset", 0.0)))
                for u, c in spec["units"].items()
            }
            valid_min, valid_max = spec.get("valid") or [0.0, None]
            analyte = Analyte(
                key=key,
                name=spec["name"],
                kind=spec["kind"],
                loinc=tuple(spec["loinc"]),
                canonical_unit=spec["canonical_unit"],
                units=units,
                monitored=spec.get("monitored", True),
                unconfirmed=spec.get("unconfirmed", False),
                valid_min=valid_min,
                valid_max=valid_max,
            )
            if analyte.canonical_unit not in units:
                raise ValueError(f"analyte {key}: canonical unit not among its units")
            self.by_key[key] = analyte
            for code in analyte.loinc:
                if code in self.by_loinc:
                    raise ValueError(f"LOINC {code} listed twice")
                self.by_loinc[code] = analyte

    def analyte_for_loinc(self, loinc: str) -> Analyte:
        try:
            return self.by_loinc[loinc]
        except KeyError:
            raise Rejected(Reason.UNKNOWN_LOINC, f"LOINC code {loinc!r} is not in any value set") from None

    #: entries of the conversion cache (below): the units seen are few, but they come from input
    MAX_CACHED_CONVERSIONS = 4096

    def conversion(self, analyte: Analyte, unit: str | None) -> UnitConversion:
        """The conversion of ``unit`` to the analyte's canonical unit, or ``Rejected`` as ``convert``.

        Cached per (analyte, unit as received): the alias lookup and strip were ~0.4 us per
        value converted. Only a conversion found is cached (bounded), only for a unit that is
        a str or None, and only for this catalogue's own analyte objects."""
        if unit is None or type(unit) is str:
            hit = self._conversions.get((analyte.key, unit))
            if hit is not None and hit[0] is analyte:
                return hit[1]
        code = self.canonical_unit_code(unit)
        conv = analyte.units.get(code)
        if conv is None:
            raise Rejected(
                Reason.UNIT_NOT_CONVERTIBLE,
                f"unit {unit!r} cannot be converted to {analyte.canonical_unit!r} for {analyte.key}",
            )
        if (unit is None or type(unit) is str) and len(self._conversions) < self.MAX_CACHED_CONVERSIONS \
                and self.by_key.get(analyte.key) is analyte:
            self._conversions[(analyte.key, unit)] = (analyte, conv)
        return conv

    def canonical_unit_code(self, unit: str | None) -> str:
        unit = (unit or "").strip()
        return self.aliases.get(unit, unit)

    def convert(self, analyte: Analyte, value: float, unit: str | None) -> float:
        """Convert ``value`` in ``unit`` to the analyte's canonical unit, or reject."""
        return self.conversion(analyte, unit).apply(value)


@lru_cache(maxsize=1)
def catalogue() -> AnalyteCatalogue:
    text = resources.files("schemas").joinpath("data/analytes.yaml").read_text(encoding="utf-8")
    return AnalyteCatalogue(load_yaml(text))
