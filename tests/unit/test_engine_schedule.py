"""Clock-driven findings: overdue samples and end of monitoring, with a controllable clock."""
from __future__ import annotations

from alerts.testkit import Sim, at, dose, obs, steroid

IT = "onasemnogene-abeparvovec-it"
LIVER = ("alt", "ast", "bilirubin_total")


def liver(day, **kw):
    return [obs(a, v, day, high=h) for a, v, h in (("alt", 30, 40), ("ast", 40, 60), ("bilirubin_total", 0.4, 1.2))]


def full_panel(day):
    return liver(day) + [obs("pt", 12, day, high=13.5), obs("platelets", 300, day, low=150),
                         obs("troponin_i", 10, day, high=40)]


def overdue(sim, group):
    return sim.present().get(f"schedule.overdue|{group}")


def test_overdue_is_driven_by_the_clock():
    sim = Sim()
    sim.feed([dose()] + full_panel(6))
    # weekly in month 1 + 24 h grace: due by day 6 + 7 + 1 = 14
    assert sim.clock(13.9) == []
    out = sim.clock(14.1)
    groups = sorted(f.dedupe_key for f in out if f.state == "present")
    assert groups == ["coagulation", "liver", "platelets", "troponin"]
    f = overdue(sim, "liver")
    assert f.severity.value == "warning" and f.route == "monitoring-coordinator"
    assert {e.analyte for e in f.evidence} == set(LIVER) and all(e.basis == "schedule" for e in f.evidence)
    # the same clock again: nothing new
    assert sim.clock(14.2) == []


def test_sample_arrival_clears_overdue_and_partial_panel_keeps_it():
    sim = Sim()
    sim.feed([dose()] + full_panel(6))
    sim.clock(14.5)
    out = sim.feed([obs("alt", 30, 14.4, high=40), obs("ast", 40, 14.4, high=60)], now=sim_now(14.5))
    # bilirubin still missing: the liver finding updates (fewer analytes), it does not clear
    assert [(f.state, [e.analyte for e in f.evidence]) for f in out if f.dedupe_key == "liver"][-1] == (
        "present", ["bilirubin_total"])
    out = sim.feed([obs("bilirubin_total", 0.4, 14.4, high=1.2)], now=sim_now(14.5))
    assert [(f.dedupe_key, f.state) for f in out] == [("liver", "cleared")]


def sim_now(day):
    from alerts.testkit import at

    return at(day)


def test_no_result_since_dosing_is_overdue_after_first_interval():
    sim = Sim()
    sim.feed([dose()])
    assert sim.clock(7.9) == []
    assert overdue(sim, "liver") is None
    sim.clock(8.1)
    assert overdue(sim, "liver") is not None


def test_interval_widens_after_month_one():
    sim = Sim()
    sim.feed([dose()] + full_panel(32))
    sim.clock(40)  # every 14 days from day 30: due 32 + 14 + 1 = 47
    assert overdue(sim, "liver") is None
    sim.clock(47.5)
    assert overdue(sim, "liver") is not None
    assert overdue(sim, "troponin") is None  # monthly in months 2-3: due 32 + 30 + 1 = 63


def test_it_schedule_follows_steroid_phase():
    sim = Sim()
    sim.feed([steroid("full", -1), dose(product=IT)] + liver(35))
    # full dose after month 1: still weekly
    sim.clock(43.5)
    assert overdue(sim, "liver") is not None
    sim.feed(liver(43.4), now=sim_now(43.5))
    assert overdue(sim, "liver") is None
    # stopped: still weekly for a month (audit PS-15: the label's every other week needs
    # unremarkable findings at the end of the taper, which the schedule cannot know)
    sim.feed([steroid("stopped", 44)])
    sim.clock(51.3)
    assert overdue(sim, "liver") is None
    sim.clock(51.5)  # due 43.4 + 7 + 1
    assert overdue(sim, "liver") is not None
    # more than 30 days after stopping, before month 3: every other week
    sim.feed(liver(76), now=sim_now(76.1))
    sim.clock(90.5)
    assert overdue(sim, "liver") is None
    sim.clock(89.9 + 1.2)  # due 76 + 14 + 1 = 91
    assert overdue(sim, "liver") is not None


def test_it_schedule_without_steroid_events_is_weekly():
    # audit PS-15: no steroid events (a missing pharmacy feed): a taper may be running unseen
    sim = Sim()
    sim.feed([dose(product=IT)] + liver(31))
    sim.clock(38.9)
    assert overdue(sim, "liver") is None
    sim.clock(39.5)  # due 31 + 7 + 1 (was 31 + 14 + 1)
    assert overdue(sim, "liver") is not None


def test_no_schedule_before_dose_but_no_silent_patient():
    # PS-8: no overdue schedule before a dose record, but results of a patient with no dose
    # record raise monitoring.no_dose_record once 12 h have passed since the first result
    sim = Sim()
    sim.feed(liver(-3))
    assert sim.clock(-2.6) == []  # 9.6 h after the first result: within the grace period
    out = sim.clock(30)
    assert [(f.rule_id, f.state, f.severity.value, f.route) for f in out] == [
        ("monitoring.no_dose_record", "present", "warning", "monitoring-coordinator")]
    assert not [f for f in out if f.rule_id == "schedule.overdue"]
    assert sim.clock(31) == []  # the same clock again: nothing new
    # the dose record resolves it
    out = sim.feed([dose(day=-1)], now=at(31))
    assert ("monitoring.no_dose_record", "cleared") in [(f.rule_id, f.state) for f in out]


def test_monitoring_complete_after_three_months_with_label_criteria():
    sim = Sim()
    sim.feed([obs("platelets", 300, -2, low=150), obs("troponin_i", 10, -2, high=40), dose()]
             + full_panel(88) + full_panel(90.2))
    assert [f for f in sim.clock(89) if f.rule_id == "monitoring.complete"] == []  # < 90 days
    out = sim.clock(90.5)
    (c,) = [f for f in out if f.rule_id == "monitoring.complete"]
    assert c.state == "present" and c.severity.value == "info"
    # every piece of evidence was taken at or after day 90
    assert all(e.effective_at >= at(90) for e in c.evidence)
    # completion ends the label's "until unremarkable" liver period after month 3
    sim.clock(120)
    assert not any(k.startswith("schedule.overdue") for k in sim.present())
    # a new abnormal result unsettles completion
    out = sim.feed([obs("alt", 100, 121, high=40)], now=sim_now(121))
    assert ("monitoring.complete", "cleared") in [(f.rule_id, f.state) for f in out]


def test_completion_needs_results_from_day_90_not_older_ones():
    """Issue: an IV patient at day 95 whose last liver panel was on day ~75 (draws on days 84
    and 98 missed) was marked complete, and completion then hid the overdue liver sample."""
    sim = Sim()
    sim.feed([obs("platelets", 300, -2, low=150), obs("troponin_i", 10, -2, high=40), dose()]
             + full_panel(75))
    out = sim.clock(95)
    assert "monitoring.complete" not in sim.present()
    assert not [f for f in out if f.rule_id == "monitoring.complete"]
    f = overdue(sim, "liver")
    assert f is not None and f.state == "present"  # due by 75 + 14 + 1 = day 90
    assert {e.analyte for e in f.evidence} == set(LIVER)
    # a day-91 panel with only liver tests: still not complete (PT/INR, platelets, troponin
    # have no result since day 90)
    sim.feed(liver(95.2), now=sim_now(95.3))
    assert overdue(sim, "liver") is None
    sim.clock(95.5)
    assert "monitoring.complete" not in sim.present()
    # the rest of the end-of-monitoring panel on day 96 completes it
    sim.feed([obs("pt", 12, 96, high=13.5), obs("platelets", 300, 96, low=150), obs("troponin_i", 10, 96, high=40)],
             now=sim_now(96.1))
    sim.clock(96.2)
    assert "monitoring.complete" in sim.present()


def test_completion_never_hides_an_overdue_sample():
    # IT: liver tests stay weekly while the steroid is tapered, also after day 90
    sim = Sim()
    sim.feed([steroid("full", -1), obs("platelets", 300, -2, low=150), dose(product=IT), steroid("taper", 80)]
             + liver(91) + [obs("platelets", 300, 91, low=150)])
    sim.clock(92)
    assert "monitoring.complete" in sim.present()  # day-91 results meet the criteria
    out = sim.clock(99.5)  # weekly during the taper: due by 91 + 7 + 1 = 99
    assert overdue(sim, "liver") is not None
    assert "monitoring.complete" not in sim.present()  # withheld while a sample is overdue
    assert ("monitoring.complete", "cleared") in [(f.rule_id, f.state) for f in out]
    sim.feed(liver(99.6), now=sim_now(99.7))
    assert overdue(sim, "liver") is None
    sim.clock(99.8)
    assert "monitoring.complete" in sim.present()


def test_overdue_raised_as_soon_as_deadline_plus_grace_passes_and_clears_on_arrival():
    """A controllable clock stepping every 3 hours: the overdue finding appears at the
    first tick after the deadline + grace, stays (no repeats) and clears when the sample
    arrives. Weekly liver samples stop after day 6: due by 6 + 7 + 1 = day 14."""
    sim = Sim()
    sim.feed([dose()] + liver(-1) + [x for d in (0.5, 3, 6) for x in liver(d)])
    first = None
    emitted = []
    step = 0.125
    day = 0.0
    while day <= 20:
        out = [f for f in sim.clock(day) if f.dedupe_key == "liver"]
        emitted += [(day, f.state) for f in out]
        if first is None and overdue(sim, "liver") is not None:
            first = day
        day += step
    assert first is not None and 14.0 < first <= 14.0 + step
    assert emitted == [(first, "present")]  # raised once, not repeated on every tick
    f = overdue(sim, "liver")
    assert f.evidence[0].note.startswith("due by") and f.evidence[0].effective_at == at(6)
    out = sim.feed(liver(20.1), now=sim_now(20.2))  # alt, ast, bilirubin one by one
    states = [(f.dedupe_key, f.state) for f in out if f.rule_id == "schedule.overdue"]
    assert states[-1] == ("liver", "cleared") and len(states) == 3  # 2 left, 1 left, none
    assert overdue(sim, "liver") is None
    assert not [f for f in sim.clock(20.3) if f.dedupe_key == "liver"]


def test_skipped_sample_followed_by_a_later_one_is_not_flagged_afterwards():
    # documented: the deadline runs from the last sample; a later sample satisfies the schedule
    sim = Sim()
    sim.feed([dose()] + liver(6) + liver(20))  # the day-13 draw was skipped
    sim.clock(21)
    assert overdue(sim, "liver") is None
    # ... but a clock check between the missed deadline and the later sample did flag it
    sim2 = Sim()
    sim2.feed([dose()] + liver(6))
    sim2.clock(14.5)
    assert overdue(sim2, "liver") is not None
    sim2.feed(liver(20), now=sim_now(20.1))
    assert overdue(sim2, "liver") is None


def test_monitoring_not_complete_when_alt_at_2x_uln():
    sim = Sim()
    sim.feed([dose()] + full_panel(88) + [obs("alt", 85, 89, high=40)])
    sim.clock(95)
    assert "monitoring.complete" not in sim.present()
