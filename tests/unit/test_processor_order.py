"""Same input, same alerts, whatever the arrival order, through the whole clinical stage.

``test_engine_properties`` shuffles patient courses through the engine alone and compares
the findings that stay present. Here the same courses go through ``ClinicalProcessor`` as
records of the patient stream (engine, alert lifecycle and patient store together, as the
runner feeds them), in event order and in a shuffled arrival order, followed by a clock
tick; each record is processed an hour after the newest event time seen so far (the stage's
clock moves forward, whatever the order of the event times). The alerts left open at the end (the latest version of each alert, open) must be the
same in both orders, and must be exactly the findings the engine alone leaves present, with
the same severity, grade and evidence: no alert left on a superseded or withdrawn result,
none missing where the engine's verdict is present. The alert *history* may differ (an
order can show a late worse result that another order saw in time); what the ward has open
at the end may not.
"""
from __future__ import annotations

import json
from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from alerts.testkit import T0, Sim
from monitor.clinical.store import InMemoryPatientStore
from schemas.alert import OPEN_STATUSES
from schemas.events import Observation
from test_clinical_processor import Stream, engine, lifecycle, processor  # noqa: F401 (fixtures)
from test_engine_properties import SETTINGS, _arrival, _brief, courses

#: a record arrives this long after the newest event time of the course so far (the clock of
#: the stage only moves forward, whatever the order of the event times)
DELAY = timedelta(hours=1)
#: the clock runs this long after the last arrival, once the steroid taper gate has settled
SETTLE = timedelta(hours=2)


def _arrival_times(events) -> list:
    """The processing time of each event in this arrival order: an hour after the newest event
    time seen so far (a dose or steroid record's, or a result's effective time)."""
    out, newest = [], T0 - timedelta(days=30)
    for e in events:
        t = e.effective_at if isinstance(e, Observation) else getattr(e, "administered_at", None) or e.at
        newest = max(newest, t)
        out.append(newest + DELAY)
    return out
#: the open statuses as they appear in an alert version's JSON
OPEN = {s.value for s in OPEN_STATUSES}


def _through_the_stage(engine, lifecycle, events) -> dict:  # noqa: F811 (fixtures passed in)
    """(rule, dedupe key) -> (severity, grade, evidence ids) of every alert whose latest version
    is open, after ``events`` went through the processor in this order and the clock ran."""
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream()
    outputs = []
    times = _arrival_times(events)
    for e, now in zip(events, times):
        outputs += p.process([s.observation(e) if isinstance(e, Observation) else s.treatment(e)], now)
    assert not [o for o in outputs if o.topic == "dead-letter"], "every record of the course is valid"
    outputs += p.tick(store.patient_ids([0]), times[-1] + SETTLE)
    latest: dict = {}
    for o in outputs:
        if o.topic == "alerts":
            a = json.loads(o.value)
            if a["alert_id"] not in latest or a["version"] > latest[a["alert_id"]]["version"]:
                latest[a["alert_id"]] = a
    return {(a["rule_id"], a["dedupe_key"]): (a["severity"], a["grade"],
                                              sorted(e["observation_id"] or "" for e in a["evidence"]))
            for a in latest.values() if a["status"] in OPEN}


def _engine_verdicts(engine, events) -> dict:  # noqa: F811
    """The same, of the findings the engine alone leaves present (the same arrival and clock)."""
    sim = Sim(engine)
    times = _arrival_times(events)
    for e, now in zip(events, times):
        sim.feed([e], now=now)
    sim.findings += engine.check_schedule(sim.state, times[-1] + SETTLE)
    return {(f.rule_id, f.dedupe_key): (f.severity.value, f.grade, sorted(e.observation_id or "" for e in f.evidence))
            for f in sim.present().values()}


@SETTINGS
@given(course=courses(), seed=st.randoms(use_true_random=False))
def test_shuffled_courses_leave_the_same_alerts_open_through_the_clinical_stage(
        engine, lifecycle, course, seed):  # noqa: F811 (fixtures)
    in_order = [e for _, _, e in course]
    arrival = _arrival(course, seed)
    open_in_order = _through_the_stage(engine, lifecycle, in_order)
    assert _through_the_stage(engine, lifecycle, arrival) == open_in_order, [_brief(e) for e in arrival]
    assert open_in_order == _engine_verdicts(engine, in_order)


@SETTINGS
@given(course=courses(ranged=True), seed=st.randoms(use_true_random=False))
def test_shuffled_courses_with_implausible_ranges_leave_the_same_alerts_open(
        engine, lifecycle, course, seed):  # noqa: F811 (fixtures)
    """The same with reference ranges that are implausible (0, a tenth or ten times the default)
    and results reported twice in the same second: the data-quality alerts too."""
    in_order = [e for _, _, e in course]
    arrival = _arrival(course, seed)
    open_in_order = _through_the_stage(engine, lifecycle, in_order)
    assert _through_the_stage(engine, lifecycle, arrival) == open_in_order, [_brief(e) for e in arrival]
    assert open_in_order == _engine_verdicts(engine, in_order)
