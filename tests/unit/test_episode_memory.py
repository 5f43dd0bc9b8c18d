"""The episode memory (``PatientState.ev``): per analyte, the newest five post-dose results
that meet a composite condition, plus the extremes since dosing, whatever the order the
results arrived in. A condition is a multiple of each result's own reference limit, so the
extremes are kept by value, by value over the result's own limit, and by value among the
results that carry no limit (graded against the protocol's default)."""
from __future__ import annotations

import itertools

from alerts.state import EV_KEEP, PatientState


def _held(entries, direction):
    s = PatientState("p1")
    for e in entries:
        s.hold_episode("alt" if direction > 0 else "platelets", e, direction)
    return s.ev["alt" if direction > 0 else "platelets"]


def _ids(held):
    return [e[2] for e in held]


def test_the_peak_over_its_own_uln_is_kept_when_five_newer_results_have_higher_values():
    # (time, value, id, low, high): ALT 900 with a ULN of 35 is 25.7x; the newer 960-990 with a
    # ULN of 50 are 19.2-19.8x, and higher values
    peak = (800, 900.0, "other-lab", None, 35.0)
    newer = [(900 + i, 960.0 + 5 * i, f"local-{i}", None, 50.0) for i in range(EV_KEEP)]
    for order in ([peak, *newer], [*newer, peak]):
        held = _held(order, +1)
        assert _ids(held) == ["other-lab", *[e[2] for e in newer]]


def test_the_nadir_under_its_own_lln_and_the_lowest_value_without_a_limit_are_kept():
    # platelets: 60 with an LLN of 150 (0.40x) is deeper than 55 with an LLN of 100 (0.55x);
    # 58 without a limit is graded against the protocol's default, kept as well
    deep = (100, 60.0, "lln-150", 150.0, None)
    low_value = (110, 55.0, "lln-100", 100.0, None)
    bare = (120, 58.0, "no-limit", None, None)
    newer = [(200 + i, 70.0 + i, f"n{i}", 150.0, None) for i in range(EV_KEEP)]
    expected = ["lln-150", "lln-100", "no-limit", *[e[2] for e in newer]]
    for order in itertools.permutations([deep, low_value, bare, *newer[:2]]):
        held = _held([*order, *newer[2:]], -1)
        assert _ids(held) == expected, [e[2] for e in order]


def test_nothing_extra_is_kept_when_the_extremes_are_among_the_newest():
    entries = [(i, 100.0 + i, f"r{i}", None, 40.0) for i in range(EV_KEEP + 3)]
    assert _ids(_held(entries, +1)) == [e[2] for e in entries[-EV_KEEP:]]


def test_the_oldest_of_equal_extremes_is_kept_with_the_newest():
    """Haemoglobin 60 on the day of a platelet count of 10 pairs with it in the TMA screen; four
    more 60s two weeks later and a twin of 100 at the first time push it out of the newest five.
    Of equal extremes the newest was kept alone, so a dose record arriving after them all found
    no haemoglobin near the count."""
    first = (0, 60.0, "c1", 100.0, None)
    twin = (0, 100.0, "c2", 100.0, None)
    later = [(14 * 86400 + i, 60.0, f"c{3 + i}", 100.0, None) for i in range(4)]
    held = _held([first, twin, *later], -1)
    assert "c1" in _ids(held) and _ids(held)[-EV_KEEP:] == ["c2", *[e[2] for e in later]]
