"""Censored results ("<5", ">3000"): when the bound can stand for the value (pure).

A censored result says only that the true value lies beyond the reported bound X in the
comparator's direction. The engine stores X as the value, so every rule sees X. That is
sound for a condition that points the SAME way as the comparator (``>`` / ``>=`` against
``>X``; ``<`` / ``<=`` against ``<X``): if it holds at X it holds for every value beyond X,
and if it does not hold at X the rule grades "at least as X" (a lower bound: troponin
``>50000`` is at least grade-for-50000; platelets ``<10`` at least grade-for-10).

A condition pointing the OTHER way is sound at X only when it is false at X (then it is
false for every value beyond X too: troponin ``<10`` is below a ULN of 40 whatever it is).
If it holds at X, the true value may or may not satisfy it (ALT ``<500`` against ULN 40;
platelets ``>20`` against grade 4 ``< 25``): the result cannot be graded safely.
:func:`conflicts` lists those conditions; the engine then does not use the value and raises
the protocol's ``censored`` rule (``data_quality.censored_value``) instead, so a person sees
it. Nothing is dead-lettered.

Every condition that reads the analyte counts: graded bands (including the abnormal-
baseline bands), composite and completion conditions, delta ratios (against the previous
result) and early-warning cuts, in the patient's protocol, or in every protocol while no
dose event says which one applies. A reference the rule would not have (no ULN, no
baseline) makes the condition unevaluable, so it cannot conflict.

Known limit: a censored PRE-dose result becomes the baseline at its bound. For a ``<X``
baseline of an "increased" rule (creatinine ``<0.2`` before dosing), the baseline-relative
limits are then computed from X, i.e. less sensitive than from the unknown true baseline;
the ULN-relative limits are unaffected.
"""
from __future__ import annotations

from typing import Iterable

from .protocol import (
    CompletionRule,
    CompositeRule,
    Condition,
    DeltaRule,
    GradedRule,
    Protocol,
    ScoreRule,
)
from .rules import OPS, reference
from .state import PatientState

UP = (">", ">=")
DOWN = ("<", "<=")


def _walk(expr, analyte: str, out: list) -> None:
    if expr is None:
        return
    if isinstance(expr, Condition):
        if expr.analyte == analyte:
            out.append((expr.op, expr.value, expr.basis))
        return
    for sub in (expr.all if expr.all is not None else expr.any) or ():
        _walk(sub, analyte, out)


def conditions(protocol: Protocol, analyte: str) -> list[tuple[str, str, float, str]]:
    """Every (rule id, op, multiple, basis) of ``protocol`` that reads ``analyte``."""
    out: list[tuple[str, str, float, str]] = []
    for r in protocol.rules:
        found: list[tuple[str, float, str]] = []
        if isinstance(r, GradedRule):
            if analyte in r.analytes:
                for b in list(r.bands) + list(r.abnormal_baseline_bands or ()):
                    found.append((b.op, b.value, b.basis))
        elif isinstance(r, (CompositeRule,)):
            _walk(r.when, analyte, found)
            _walk(r.unless, analyte, found)
        elif isinstance(r, CompletionRule):
            _walk(r.when, analyte, found)
        elif isinstance(r, DeltaRule):
            if r.analyte == analyte:
                found.append((r.op, r.ratio, "previous"))
        elif isinstance(r, ScoreRule):
            ew = protocol.early_warning
            for sysm in (ew.pews, ew.news2):
                for it in sysm.items:
                    if it.item == analyte:
                        for band in it.bands:
                            for c in band.cuts:
                                found.append((c.op, c.value, "absolute"))
        out.extend((r.id, op, value, basis) for op, value, basis in found)
    return out


def conflicts(compiled: Iterable, state: PatientState, analyte: str, entry: tuple, comparator: str) -> list[str]:
    """Rules the bound cannot decide: ``["rule (op limit)", ...]`` (empty: usable at its bound).

    ``compiled``: the CompiledProtocol(s) that may apply; ``entry`` the result as a state
    entry ``(t, bound, id, ref_low, ref_high)`` in canonical units."""
    x = entry[1]
    away = DOWN if comparator in UP else UP  # conditions pointing the other way
    out: list[str] = []
    seen: set[str] = set()
    for cp in compiled:
        for rule_id, op, mult, basis in conditions(cp.protocol, analyte):
            if op not in away:
                continue
            if basis == "previous":
                prev = None
                for e in state.hist.get(analyte, ()):
                    if e[0] < entry[0] and e[2] != entry[2]:
                        prev = e
                if prev is None or prev[1] <= 0:
                    continue
                ref = prev[1]
            else:
                ref = reference(cp.ranges, state, analyte, entry, basis)
            if ref is None:
                continue
            limit = mult * ref
            if OPS[op](x, limit) and rule_id not in seen:  # the first undecidable limit per rule
                seen.add(rule_id)
                out.append(f"{rule_id} ({op} {limit:.4g})")
    return out
