"""Property tests (hypothesis): unit invariance, arrival-order invariance, replay invariance."""
from __future__ import annotations

import json
from datetime import timedelta
import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from alerts.engine import Engine
from alerts.state import EV_KEEP, PatientState
from alerts.testkit import T0, Sim, dose, obs, steroid
from schemas.analytes import catalogue
from schemas.events import Observation

ENGINE = Engine()
SETTINGS = settings(max_examples=int(__import__("os").environ.get("HYPOTHESIS_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

# analyte -> (rule, canonical values strategy (as a lab reports them), ULN in canonical unit, other units)
UNIT_CASES = {
    "alt": ("liver.alt_increased", st.integers(5, 2000).map(float), 40.0, ["[IU]/L", "ukat/L", "nkat/L"]),
    "bilirubin_total": ("liver.bilirubin_increased", st.integers(1, 400).map(lambda v: v / 20), 1.2, ["umol/L", "mg/L"]),
    "creatinine": ("renal.creatinine_increased", st.integers(5, 400).map(lambda v: v / 100), 0.4, ["umol/L", "mmol/L"]),
    "platelets": ("heme.platelets_decreased", st.integers(5, 600).map(float), None, ["10*3/uL", "/nL"]),
    "hemoglobin": ("heme.anemia", st.integers(40, 180).map(float), None, ["g/dL", "mmol/L"]),
    "troponin_i": ("cardiac.troponin_i_increased", st.integers(1, 500).map(float), 40.0, ["ng/mL", "ug/L"]),
    "temperature": ("vitals.fever", st.integers(350, 420).map(lambda v: v / 10), None, ["[degF]"]),
}


def _to_unit(analyte: str, canonical: float, unit: str) -> float:
    conv = catalogue().by_key[analyte].units[unit]
    return (canonical - conv.offset) / conv.factor


def _grade(analyte, value_in_unit, unit, uln_in_unit):
    sim = Sim(ENGINE)
    sim.feed([dose(), obs(analyte, value_in_unit, 7, unit=unit, high=uln_in_unit)])
    f = sim.present().get(UNIT_CASES[analyte][0])
    return None if f is None else (f.severity, f.grade)


@SETTINGS
@given(data=st.data(), analyte=st.sampled_from(sorted(UNIT_CASES)))
def test_unit_invariance(data, analyte):
    rule, values, uln, units = UNIT_CASES[analyte]
    canonical = data.draw(values)
    unit = data.draw(st.sampled_from(units))
    canonical_unit = catalogue().by_key[analyte].canonical_unit
    expected = _grade(analyte, canonical, canonical_unit, uln)
    got = _grade(analyte, _to_unit(analyte, canonical, unit), unit,
                 None if uln is None else _to_unit(analyte, uln, unit))
    assert got == expected


def test_unit_invariance_is_not_vacuous():
    # the comparison above must see grades, not only "absent"
    assert _grade("alt", 250.0, "U/L", 40.0)[1] == 3
    assert _grade("alt", 250.0 / 60, "ukat/L", 40.0 / 60)[1] == 3


# a patient's results: a pool of (analyte, day, value, ULN) with distinct times per analyte
ANALYTES = {"alt": (10, 1000, 40), "ast": (10, 1000, 60), "bilirubin_total": (0.2, 6.0, 1.2),
            "platelets": (10, 450, None), "ldh": (100, 1500, 600), "inr": (0.8, 3.0, None),
            "creatinine": (0.1, 1.5, 0.4), "temperature": (36.0, 41.0, None)}


def _draw_results(draw, analytes: list[str], most: int, last_day: int, offsets: list[float]) -> list[tuple]:
    """(analyte, day, value, observation id) for up to ``most`` of ``analytes``, each at up to
    five distinct days."""
    out = []
    for analyte in draw(st.lists(st.sampled_from(sorted(analytes)), min_size=1, max_size=most, unique=True)):
        lo, hi, _uln = ANALYTES[analyte]
        for d in draw(st.lists(st.integers(-5, last_day), min_size=1, max_size=5, unique=True)):
            v = round(draw(st.floats(lo, hi)), 2)
            out.append((analyte, d + draw(st.sampled_from(offsets)), v, f"r{len(out) + 1}"))
    return out


@st.composite
def results(draw):
    return [(a, day, v, ANALYTES[a][2], oid)
            for a, day, v, oid in _draw_results(draw, list(ANALYTES), 6, 60, [0.0, 0.25, 0.5])]


def _obs(r):
    analyte, day, v, uln, oid = r
    return obs(analyte, v, day, high=uln, oid=oid)


def _final(events_in_order):
    sim = Sim(ENGINE)
    sim.feed([dose()])
    sim.feed(events_in_order, now=T0)
    return sim


@SETTINGS
@given(rs=results(), seed=st.randoms(use_true_random=False))
# found by hypothesis: the ALF episode (INR 2.0 with AST 3x ULN on day 1) is held open by the
# bilirubin rise of day 4 (1.0 -> 2.0, above ULN); random.Random(2) makes the rise arrive after
# the INR/AST results that resolve the episode, and the engine used to skip the ALF rule for
# that "plain" bilirubin (it meets no composite condition), so the finding vanished
@example(rs=[("creatinine", 0.0, 1.0, 0.4, "r1"), ("bilirubin_total", 0.0, 1.0, 1.2, "r2"),
             ("bilirubin_total", 1.0, 1.0, 1.2, "r3"), ("bilirubin_total", 4.0, 2.0, 1.2, "r4"),
             ("bilirubin_total", 2.0, 1.0, 1.2, "r5"), ("bilirubin_total", 3.0, 1.0, 1.2, "r6"),
             ("inr", 0.0, 1.0, None, "r7"), ("inr", 2.0, 1.0, None, "r8"), ("inr", 1.0, 2.0, None, "r9"),
             ("alt", 0.0, 10.0, 40, "r10"), ("alt", 1.0, 10.0, 40, "r11"), ("platelets", 0.0, 10.0, None, "r12"),
             ("platelets", 21.0, 14.0, None, "r13"), ("platelets", -1.0, 69.0, None, "r14"),
             ("platelets", 11.0, 18.0, None, "r15"), ("platelets", 5.5, 389.0, None, "r16"),
             ("ast", 60.0, 37.0, 60, "r17"), ("ast", 1.0, 180.0, 60, "r18")],
         seed=random.Random(2))
def test_arrival_order_invariance(rs, seed):
    ordered = [_obs(r) for r in sorted(rs, key=lambda r: r[1])]
    shuffled = list(ordered)
    seed.shuffle(shuffled)
    a, b = _final(ordered), _final(shuffled)
    assert a.state.to_dict() == b.state.to_dict()
    pa, pb = a.present(), b.present()
    assert {k: (f.severity, f.grade, sorted(e.observation_id for e in f.evidence)) for k, f in pa.items()} == {
        k: (f.severity, f.grade, sorted(e.observation_id for e in f.evidence)) for k, f in pb.items()}
    assert {k: f.finding_id for k, f in pa.items()} == {k: f.finding_id for k, f in pb.items()}


#: per analyte: the ULNs (or, for platelets, the LLNs) a lab may send: its own plausible one most
#: often, and the implausible ones the range check catches (0, a tenth or ten times the default)
RANGES = {"alt": ("high", 40.0), "ast": ("high", 60.0), "bilirubin_total": ("high", 1.2), "ldh": ("high", 600.0),
          "creatinine": ("high", 0.4), "platelets": ("low", 150.0)}


@st.composite
def results_with_ranges(draw):
    out = []
    for a, day, v, oid in _draw_results(draw, list(RANGES), 4, 40, [0.0, 0.25]):
        which, limit = RANGES[a]
        out.append((a, day, v, which, draw(st.sampled_from([limit, limit, 0.0, limit / 10, limit * 10])), oid))
    return out


def _ranged(r):
    analyte, day, v, which, sent, oid = r
    return obs(analyte, v, day, oid=oid, **{which: sent})


@SETTINGS
@given(rs=results_with_ranges(), seed=st.randoms(use_true_random=False), dose_at=st.integers(0, 40))
# found by hypothesis: a result with a plausible range held when one with an implausible range
# arrived for an earlier time opened data_quality.implausible_range, which in time order the
# newer result had closed; and results held before the dose record were never range-checked
@example(rs=[("alt", 1.0, 10.0, "high", 40.0, "r1"), ("alt", 0.0, 10.0, "high", 0.0, "r2")],
         seed=random.Random(1), dose_at=3)
def test_arrival_order_invariance_with_implausible_ranges_and_a_late_dose_record(rs, seed, dose_at):
    """The range check's findings and the limits results are graded against do not depend on the
    order results arrive in, nor on whether the dose record came before them (the README's
    promise): ``dose_at`` is where the dose record falls among the shuffled results."""
    a, b = _ranged_in_order_and_shuffled(rs, seed, dose_at)
    pa, pb = a.present(), b.present()
    assert {k: (f.severity, f.grade, sorted(e.observation_id for e in f.evidence)) for k, f in pa.items()} == {
        k: (f.severity, f.grade, sorted(e.observation_id for e in f.evidence)) for k, f in pb.items()}
    assert {k: f.finding_id for k, f in pa.items()} == {k: f.finding_id for k, f in pb.items()}


def _ranged_in_order_and_shuffled(rs, seed, dose_at):
    """Results with ranges fed after the dose record in time order (then id), and shuffled with
    the dose record at ``dose_at`` among them; the limits held and the baselines must be the same."""
    ordered = [dose()] + [_ranged(r) for r in sorted(rs, key=lambda r: (r[1], r[5]))]
    shuffled = [_ranged(r) for r in rs]
    seed.shuffle(shuffled)
    shuffled.insert(min(dose_at, len(shuffled)), dose())
    a, b = Sim(ENGINE), Sim(ENGINE)
    a.feed(ordered, now=T0)
    b.feed(shuffled, now=T0)
    assert a.state.hist == b.state.hist and a.state.base == b.state.base
    return a, b


def _present(sim):
    return {k: (f.severity, f.grade, sorted(e.observation_id for e in f.evidence)) for k, f in sim.present().items()}


@st.composite
def same_time_results_with_ranges(draw):
    """Results of two analytes on few days, so that several share an effective time, each with
    a plausible or an implausible limit."""
    out = []
    for a in draw(st.lists(st.sampled_from(["alt", "platelets"]), min_size=1, max_size=2, unique=True)):
        which, limit = RANGES[a]
        lo, hi, _uln = ANALYTES[a]
        for d in draw(st.lists(st.integers(-2, 4), min_size=1, max_size=6)):
            v = round(draw(st.floats(lo, hi)), 2)
            out.append((a, float(d), v, which, draw(st.sampled_from([limit, 0.0, limit / 10, limit * 10])),
                        f"r{len(out) + 1}"))
    return out


@SETTINGS
@given(rs=same_time_results_with_ranges(), seed=st.randoms(use_true_random=False), dose_at=st.integers(0, 12))
# found by hypothesis: of two results at the same second, a plausible one (r1) and one with an
# upper limit of 0 (r2), the dose record arriving after both raised the finding for r2 (the
# last held), though on arrival a result of the same time answers the question
@example(rs=[("alt", 0.0, 10.0, "high", 40.0, "r1"), ("alt", 0.0, 10.0, "high", 0.0, "r2")],
         seed=random.Random(0), dose_at=2)
# found by hypothesis (3,000 examples): ALT 81 with a ULN of 4 (20x, the more cautious limit
# kept) is the liver-failure signature's peak, but not the highest value; arriving after five
# newer results it was not held in the episode memory (kept by value), so the signature it
# raised in event order was never raised
@example(rs=[("alt", 1.0, 120.0, "high", 40.0, "r1"), ("alt", 1.0, 120.0, "high", 40.0, "r2"),
             ("alt", 1.0, 120.0, "high", 40.0, "r3"), ("alt", 0.0, 81.0, "high", 4.0, "r4"),
             ("alt", 0.0, 12.0, "high", 4.0, "r5"), ("alt", 0.0, 120.0, "high", 40.0, "r6"),
             ("platelets", 0.0, 10.0, "low", 150.0, "r7")],
         seed=random.Random(0), dose_at=0)
def test_range_check_of_results_at_the_same_time_does_not_depend_on_arrival_order(rs, seed, dose_at):
    """Two results of the same effective second: a plausible one answers the question; of two
    implausible ones the finding shows the larger id, whichever came first."""
    a, b = _ranged_in_order_and_shuffled(rs, seed, dose_at)
    assert _present(a) == _present(b)


#: analytes whose censored results are decidable from the result alone once the dose is known and
#: every result is after it (no baseline held; no delta rule reads them)
CENSORED = {"alt": (10, 3000, 40), "troponin_i": (1, 500, 40)}


@st.composite
def post_dose_censored_results(draw):
    out = []
    for a in draw(st.lists(st.sampled_from(sorted(CENSORED)), min_size=1, max_size=2, unique=True)):
        lo, hi, uln = CENSORED[a]
        for d in draw(st.lists(st.integers(1, 6), min_size=1, max_size=6)):
            v = round(draw(st.floats(lo, hi)), 2)
            out.append((a, float(d), v, uln, draw(st.sampled_from([None, "<", ">", "<"])), f"r{len(out) + 1}"))
    return out


def _censored(r):
    analyte, day, v, uln, comparator, oid = r
    o = obs(analyte, v, day, high=uln, oid=oid)
    return o.model_copy(update={"comparator": comparator}) if comparator else o


@SETTINGS
@given(rs=post_dose_censored_results(), seed=st.randoms(use_true_random=False))
# found by hypothesis: two ALT ">10" results that cannot be graded, on days 0 and 1 (or at the
# same second): the later arrival replaced the finding's evidence, whichever result it was
@example(rs=[("alt", 1.0, 10.0, 40, ">", "r1"), ("alt", 1.0, 10.0, 40, ">", "r2")], seed=random.Random(0))
@example(rs=[("alt", 2.0, 10.0, 40, ">", "r1"), ("alt", 1.0, 10.0, 40, ">", "r2")], seed=random.Random(0))
def test_censored_finding_shows_the_newest_ungradable_result_in_any_arrival_order(rs, seed):
    """``data_quality.censored_value`` rests on the newest censored result that cannot be graded
    (by time, then id), unless a usable result at least as new settled it. (Whether a bound can be
    graded may still depend on a baseline or previous result held when it arrives: README,
    "Censored results".)"""
    ordered = [dose()] + [_censored(r) for r in sorted(rs, key=lambda r: (r[1], r[5]))]
    shuffled = [_censored(r) for r in rs]
    seed.shuffle(shuffled)
    a, b = Sim(ENGINE), Sim(ENGINE)
    a.feed(ordered, now=T0)
    b.feed([dose()] + shuffled, now=T0)
    assert _present(a) == _present(b)


@SETTINGS
@given(rs=results())
def test_replay_invariance(rs):
    events = [_obs(r) for r in rs]
    a, b = _final(events), _final(events)
    assert [f.model_dump(mode="json") for f in a.findings] == [f.model_dump(mode="json") for f in b.findings]
    before = a.state.to_dict()
    assert a.feed(events, now=T0) == []  # the topic processed twice: nothing new
    assert a.state.to_dict() == before
    # restart from the changelog (JSON) and replay: still nothing new
    restored = Sim(ENGINE)
    restored.state = PatientState.from_dict(json.loads(json.dumps(before)))
    assert restored.feed(events, now=T0) == []


def test_order_invariance_catches_a_real_difference():
    # sanity: two different inputs do give different final states (the property is not vacuous)
    x = _final([obs("alt", 250, 7, high=40, oid="x")])
    y = _final([obs("alt", 30, 7, high=40, oid="x")])
    assert x.present() != y.present()


def test_alf_marker_rise_holds_the_episode_open_in_any_arrival_order():
    # ALF signature on day 1 (newest INR 2.0 with AST 3x ULN); INR and AST are back to normal
    # on day 2 (fresh results of everything it rested on), but bilirubin rises above ULN on
    # day 4 (1.0 -> 2.0, 1.7x ULN: no composite condition, a marker of the ALF rule): falling
    # transaminases with a rising bilirubin keep the finding open, whether the rise arrives
    # before or after the results that would otherwise resolve it
    from itertools import permutations
    episode = [obs("inr", 2.0, 1, oid="i1"), obs("ast", 180, 1, high=60, oid="a1"),
               obs("bilirubin_total", 1.0, 1, high=1.2, oid="b1")]
    after = [obs("inr", 1.0, 2, oid="i2"), obs("ast", 40, 2, high=60, oid="a2"),
             obs("bilirubin_total", 1.0, 2, high=1.2, oid="b2"), obs("bilirubin_total", 2.0, 4, high=1.2, oid="b3")]
    seen = set()
    for perm in permutations(after):
        sim = _final(episode + list(perm))
        f = sim.present().get("liver.acute_liver_failure_signature")
        assert f is not None, [e.observation_id for e in perm]
        assert "bilirubin_total 1 -> 2 still worsening" in f.text.what, f.text.what
        seen.add((json.dumps(sim.state.to_dict(), sort_keys=True), f.finding_id))
    assert len(seen) == 1
    # without the rise the same results resolve it (the test can fail)
    sim = _final(episode + after[:3])
    assert "liver.acute_liver_failure_signature" not in sim.present()


def _fever(events):
    sim = Sim(ENGINE)
    sim.feed(events, now=T0)
    f = sim.present().get("vitals.fever")
    return None if f is None else (f.severity, f.grade, tuple(sorted(e.observation_id for e in f.evidence)))


def test_sustained_fever_does_not_depend_on_arrival_order():
    # > 40 C sustained > 24 h is grade 4 (CTCAE v5) whichever order the readings (and the
    # dose) arrive in; the vital-sign history holds only the newest two readings, so the
    # run must come from the readings of the sustained window, not from that history
    from itertools import permutations
    readings = [obs("temperature", 37.0, -1.0, oid="t0"), obs("temperature", 41.0, 0.0, oid="t1"),
                obs("temperature", 40.6, 0.5, oid="t2"), obs("temperature", 41.2, 1.25, oid="t3"),
                obs("temperature", 40.8, 1.5, oid="t4")]
    expected = _fever([dose()] + readings)
    assert expected is not None and expected[1] == 4, expected
    assert "t1" in expected[2], "the run's first reading is the evidence of when it began"
    for perm in permutations([dose()] + readings):
        assert _fever(list(perm)) == expected, [getattr(e, "observation_id", "dose") for e in perm]


def test_a_normal_reading_ends_the_sustained_run_in_any_order():
    from itertools import permutations
    readings = [obs("temperature", 41.0, 0.0, oid="u1"), obs("temperature", 37.0, 0.75, oid="u2"),
                obs("temperature", 41.0, 1.25, oid="u3"), obs("temperature", 41.1, 1.5, oid="u4")]
    results = {_fever([dose()] + list(perm)) for perm in permutations(readings)}
    assert len(results) == 1
    (only,) = results
    assert only is not None and only[1] != 4  # 0.25 day of fever after the normal reading


# -- whole patient courses: late dose and steroid records, corrections, withdrawals (issue 12) --

COURSE = {"alt": (10, 1200, 40), "ast": (10, 1200, 60), "bilirubin_total": (0.2, 6.0, 1.2), "alp": (100, 1500, 500),
          "platelets": (10, 450, None), "hemoglobin": (60, 150, None), "ldh": (100, 1500, 600),
          "creatinine": (0.1, 1.5, 0.4), "inr": (0.8, 3.0, None), "troponin_i": (5, 6000, 40),
          "systolic_bp": (70, 150, None)}


#: the limits a lab may send with a result in a course with ``ranged``: its own plausible one most
#: often, or one the range check catches (0, a tenth or ten times the default)
COURSE_RANGES = {"alt": ("high", 40.0), "ast": ("high", 60.0), "bilirubin_total": ("high", 1.2),
                 "ldh": ("high", 600.0), "creatinine": ("high", 0.4), "platelets": ("low", 150.0),
                 "hemoglobin": ("low", 100.0)}


@st.composite
def courses(draw, ranged: bool = False):
    """A patient course as events in event-time order, each with its arrival constraints:
    a correction or withdrawal always arrives after the result it corrects (the same
    observation id is never reordered on its partition); everything else may arrive in
    any order, the dose and steroid records included.

    ``ranged``: results carry implausible reference ranges too, and some have a twin at the
    same second (a draw reported twice: only for the analytes whose ranges are checked; a twin
    of another value for an analyte a rule reads as ``newest`` (INR, PT) or at onset (ALP)
    makes "the newest" depend on which twin the stage held when the rule was judged, README,
    "Known bounds"), at most ``EV_KEEP`` results of an analyte in all:
    with more, a dose record arriving after the newest of them pairs only what the episode
    memory holds then (the newest five and the extremes), while in event order a composite rule
    was met by a result it no longer holds and stays open (README, "Known bounds": haemoglobin
    61 on the day of a platelet count of 10 and a twin of 100, four 60s on days 15-17, the dose
    record last: no TMA screen). A withdrawal is then drawn for none of them: a
    withdrawn newest result exposes an older one whose range was implausible, which the range
    check cannot ask about again (it keeps the limits it graded against, not the ones sent;
    README, "Reference ranges sent with results").

    Known bound (documented in the README): a withdrawal (entered in error) can expose an
    older result that one arrival order had already pruned from the compact state and
    another had not, so withdrawals are drawn for a lab analyte's newest result only (labs
    hold 3 results, vital signs 2), and only in courses without a taper record:
    ``steroid.taper_gate_at_start`` reads the newest result before the taper began, deeper
    in the history than a withdrawn newest result leaves order independent."""
    taper = draw(st.booleans())
    events = []  # (event time, chain id, event)
    n = 0
    for analyte in draw(st.lists(st.sampled_from(sorted(COURSE)), min_size=2, max_size=6, unique=True)):
        lo, hi, uln = COURSE[analyte]
        days = sorted(draw(st.lists(st.integers(-4, 45), min_size=1, max_size=4, unique=True)))
        per_analyte = len(days)
        for d in days:
            n += 1
            oid = f"c{n}"
            day = d + draw(st.sampled_from([0.0, 0.3]))
            v = round(draw(st.floats(lo, hi)), 2)
            limits = {"high": uln}
            if ranged and analyte in COURSE_RANGES:
                which, limit = COURSE_RANGES[analyte]
                limits = {which: draw(st.sampled_from([limit, limit, limit, 0.0, limit / 10, limit * 10]))}
            events.append((day, oid, obs(analyte, v, day, oid=oid, **limits)))
            if (ranged and analyte in COURSE_RANGES and per_analyte < EV_KEEP
                    and draw(st.sampled_from([False, False, False, True]))):
                per_analyte += 1
                n += 1
                twin = f"c{n}"
                events.append((day, twin, obs(analyte, round(draw(st.floats(lo, hi)), 2), day, oid=twin, **limits)))
            lab = catalogue().by_key[analyte].kind == "lab"
            last = d == days[-1] and lab and not taper and not ranged
            fixes = ["none", "none", "none", "corrected", "amended"] + (["withdrawn"] if last else [])
            fix = draw(st.sampled_from(fixes))
            if fix == "corrected":
                v2 = round(draw(st.floats(lo, hi)), 2)
                events.append((day + 0.01, oid, obs(analyte, v2, day, oid=oid, status="corrected", **limits)))
            elif fix == "amended":
                v2 = round(draw(st.floats(lo, hi)), 2)
                events.append((day + 0.01, oid, obs(analyte, v2, day, oid=oid + "a", status="amended",
                                                     corrects=oid, **limits)))
            elif fix == "withdrawn":
                events.append((day + 0.01, oid, obs(analyte, None, day, oid=oid, status="entered-in-error")))
    events.append((0.0, "dose", dose()))
    if taper:
        events.append((-1.0, "st1", steroid("full", -1)))
        events.append((draw(st.integers(20, 40)), "st2", steroid("taper", 30)))
    events.sort(key=lambda x: x[0])
    return events


def _arrival(events, rnd):
    """Shuffle, then restore the order within each chain (same observation id)."""
    order = list(range(len(events)))
    rnd.shuffle(order)
    by_chain: dict = {}
    for i, (_, chain, _) in enumerate(events):
        by_chain.setdefault(chain, []).append(i)
    slots: dict = {}
    for chain, idxs in by_chain.items():
        positions = sorted(order.index(i) for i in idxs)
        for p, i in zip(positions, idxs):
            slots[p] = i
    return [events[slots[p]][2] for p in range(len(events))]


def _brief(e):
    if isinstance(e, Observation):
        return (e.observation_id, e.analyte, e.value, round((e.effective_at - T0).total_seconds() / 86400, 2),
                e.status.value, e.corrects)
    return (type(e).__name__, getattr(e, "phase", None), str(getattr(e, "at", getattr(e, "administered_at", ""))))


def _final_alerts(sim):
    return {k: (f.severity, f.grade, sorted(e.observation_id or "" for e in f.evidence), f.finding_id)
            for k, f in sim.present().items()}


def _course_in_order_and_shuffled(course, seed):
    """The course fed in event order and in an arrival order ``seed`` draws, each followed by
    a clock tick once the steroid taper gate has settled (settle_hours after the records
    arrived), so its judgement is compared too; the final alerts must be the same."""
    in_order = Sim(ENGINE)
    in_order.feed([e for _, _, e in course], now=T0)
    shuffled = Sim(ENGINE)
    arrival = _arrival(course, seed)
    shuffled.feed(arrival, now=T0)
    for sim in (in_order, shuffled):
        sim.findings += sim.engine.check_schedule(sim.state, T0 + timedelta(hours=2))
    assert _final_alerts(shuffled) == _final_alerts(in_order), [_brief(e) for e in arrival]
    return in_order, shuffled


@SETTINGS
@given(course=courses(), seed=st.randoms(use_true_random=False))
def test_shuffled_courses_with_late_dose_and_corrections_end_with_the_same_alerts(course, seed):
    in_order, shuffled = _course_in_order_and_shuffled(course, seed)
    if not any(getattr(e, "status", None) is not None and e.status.value in ("amended", "entered-in-error")
               for _, _, e in course):
        # without removals the held state itself is order independent too (a withdrawn
        # result can leave an older one held in one order and already pruned in another)
        assert shuffled.state.to_dict() == in_order.state.to_dict()


@SETTINGS
@given(course=courses(ranged=True), seed=st.randoms(use_true_random=False))
# found by hypothesis: a bilirubin result with an upper limit of 0 at the dose time, then its
# correction under the same id (still "0-0"): arriving after the dose record, the correction's
# withdrawal of the version it replaced closed the range question its own check had just
# raised again; arriving before it, the question stayed open
@example(course=[(-1.0, "c1", obs("alt", 10.0, -1, high=40.0, oid="c1")),
                 (0.0, "c5", obs("bilirubin_total", 1.0, 0, high=0.0, oid="c5")), (0.0, "dose", dose()),
                 (0.01, "c5", obs("bilirubin_total", 1.0, 0, high=0.0, oid="c5", status="corrected"))],
         seed=random.Random(1))
def test_shuffled_courses_with_implausible_ranges_and_same_time_results_end_with_the_same_alerts(course, seed):
    _course_in_order_and_shuffled(course, seed)


def test_a_correction_keeps_the_range_question_of_a_result_whose_twin_is_held():
    # found by hypothesis: two ALT results of one second, both "0-0"; the finding rests on "c9"
    # (the larger id). Its correction under the same id, still "0-0", did not take the finding
    # over (c10 of the same second was held), and its withdrawal of the old c9 then closed it,
    # though both results held carry the implausible range
    sim = Sim(ENGINE)
    sim.feed([dose(), obs("alt", 10.0, 1, high=0.0, oid="c9"), obs("alt", 10.0, 1, high=0.0, oid="c10")], now=T0)
    sim.feed([obs("alt", 12.0, 1, high=0.0, oid="c9", status="corrected")], now=T0)
    present = sim.present()["data_quality.implausible_range|alt"]
    assert [e.observation_id for e in present.evidence] == ["c9"]


def test_shuffled_course_property_is_not_vacuous():
    # a course whose alerts depend on pairing across time (Hy's law from an earlier ALT peak)
    course = [(-1, "b", obs("alt", 30, -1, high=40, oid="b")), (0.0, "dose", dose()),
              (20, "a", obs("alt", 400, 20, high=40, oid="a")), (27, "c", obs("alt", 100, 27, high=40, oid="c")),
              (27, "d", obs("bilirubin_total", 3.0, 27, high=1.2, oid="d"))]
    import random
    sim = Sim(ENGINE)
    sim.feed(_arrival(course, random.Random(3)), now=T0)
    assert "liver.hys_law" in sim.present()
    assert _final_alerts(sim) != {}
