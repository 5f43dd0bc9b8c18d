"""Protocol replay (issue 17): self-replay gives no difference; a candidate with a lowered ALT
grade-3 multiple changes exactly the patients and alerts expected from the cohort's ALT values
(computed here from the values, not by the replay); the reader handles the simulator's export
in every wire format and the patient-stream layout (``kind`` headers); the HTML report is
self-contained; the command line."""
from __future__ import annotations

import copy
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from alerts.protocol import default_protocols, load_protocol
from alerts.replay import CourseEvent, PatientCourse, patient_ref, replay, with_candidate
from alerts.testkit import at, dose, obs
from monitor.cli import main as cli_main
from monitor.replay import Collected, Window, interpret, read_file, render_html
from monitor.settings import Settings
from monitor.simulate import generate_cohort, write_cohort

ROOT = Path(__file__).resolve().parents[2]
IV = ROOT / "alerts/protocols/onasemnogene-abeparvovec-iv.yaml"
ULN = 40.0
SECRET = "replay-test-secret"


def lowered_alt(tmp: Path, multiple: float = 4.0) -> Path:
    """The shipped IV protocol with only the ALT grade-3 multiple lowered (AST shares the band
    list through a YAML alias: copy it before editing)."""
    data = yaml.safe_load(IV.read_text(encoding="utf-8"))
    data["version"] = str(data["version"]) + "-lower-alt-g3"
    for rule in data["rules"]:
        if rule["id"] == "liver.alt_increased":
            rule["bands"] = copy.deepcopy(rule["bands"])
            for band in rule["bands"]:
                if band["grade"] == 3:
                    assert band["value"] == 5.0 and band["op"] == ">"
                    band["value"] = multiple
    path = tmp / "candidate.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


#: patient -> ALT results (day, value in U/L); the pre-dose value is normal so the x ULN bands apply
ALT_COURSES = {
    "pt-normal": [(7, 30), (14, 35)],
    "pt-g1": [(7, 80), (14, 30)],
    "pt-3.5x": [(7, 140), (14, 60)],
    "pt-4.0x": [(7, 160), (14, 60)],    # boundary: "> 4x" is not met at exactly 4x
    "pt-4.1x": [(7, 164), (14, 60)],
    "pt-4.6x": [(7, 120), (14, 184), (21, 90)],
    "pt-5.0x": [(7, 200), (21, 30)],    # boundary: not > 5x (baseline grade 2), > 4x (candidate grade 3)
    "pt-6x": [(7, 240), (14, 100)],
    "pt-25x": [(7, 1000), (14, 300)],
}
#: a result later withdrawn still raised its alert while it stood (both runs)
WITHDRAWN = {"pt-withdrawn": [(10, 180)]}


def constructed_cohort() -> list[PatientCourse]:
    courses = []
    seq = 0
    for pid, alts in {**ALT_COURSES, **WITHDRAWN}.items():
        pc = PatientCourse(pid)
        events = [(at(-1) + timedelta(hours=1), obs("alt", 30, -1, high=ULN, patient=pid, oid=f"{pid}-base")),
                   (at(0), dose(patient=pid))]
        for day, value in alts:
            o = obs("alt", value, day, high=ULN, patient=pid, oid=f"{pid}-d{day}")
            events.append((o.received_at, o))
        if pid in WITHDRAWN:
            o = obs("alt", None, 10, patient=pid, oid=f"{pid}-w", status="entered-in-error", corrects=f"{pid}-d10")
            events.append((at(11), o))
        for when, ev in events:
            pc.events.append(CourseEvent(when, seq, ev))
            seq += 1
        courses.append(pc)
    return courses


def expected_changes(multiple_new: float = 4.0, multiple_old: float = 5.0) -> dict[str, tuple[str, str]]:
    """From the ALT values alone: the highest ALT multiple of a patient decides the highest CTCAE
    grade its ALT alert reaches; grade 2 (> 3x) is a warning, grade 3 a high alert. A patient
    changes when its peak is above the new grade-3 multiple but not above the old one."""
    out = {}
    for pid, alts in {**ALT_COURSES, **WITHDRAWN}.items():
        peak = max(v for _, v in alts) / ULN
        if multiple_new < peak <= multiple_old:
            assert peak > 3.0  # it is a grade-2 (warning) alert in the baseline
            out[pid] = ("warning", "high")
    return out


def test_self_replay_gives_no_difference():
    courses = constructed_cohort()
    protos = default_protocols()
    end = at(60)
    rep = replay(courses, protos, protos, end, secret=SECRET).to_json()
    assert rep["differences"] == 0 and rep["patients_changed"] == []
    assert rep["patients"] == len(courses)
    # something happened: the cohort raises ALT alerts in both runs, counted the same
    alt = rep["rules"]["liver.alt_increased"]
    assert alt["opened"]["baseline"] == alt["opened"]["candidate"] >= 8
    assert alt["time_to_first_alert_delta_h"]["matched"] == alt["opened"]["baseline"]
    # patient-days: first recorded event (day -1 + 1 h) to the end of the window
    assert rep["patient_days"] == pytest.approx(len(courses) * (61 - 1 / 24), abs=0.01)


def test_lowered_alt_grade3_changes_exactly_the_expected_patients_and_alerts(tmp_path):
    cand = with_candidate(default_protocols(), [load_protocol(lowered_alt(tmp_path))])
    expected = expected_changes()
    assert set(expected) == {"pt-4.1x", "pt-4.6x", "pt-5.0x", "pt-withdrawn"}
    rep = replay(constructed_cohort(), default_protocols(), cand, at(60), secret=SECRET, identify=True).to_json()
    got = {p["patient_id"]: p for p in rep["patients_changed"]}
    assert set(got) == set(expected)
    for pid, (before, after) in expected.items():
        p = got[pid]
        assert p["gained"] == [] and p["lost"] == [] and p["timing"] == []
        assert [(c["rule"], c["baseline"], c["candidate"]) for c in p["changed"]] == \
            [("liver.alt_increased", before, after)]
    assert rep["differences"] == len(expected)
    alt = rep["rules"]["liver.alt_increased"]
    assert alt["changed_severity"] == len(expected) and alt["gained"] == alt["lost"] == 0
    assert alt["by_severity"]["high"]["candidate"] - alt["by_severity"]["high"].get("baseline", 0) == len(expected)
    # pages are warning and above: a warning that becomes high was already a page
    assert alt["pages"]["baseline"] == alt["pages"]["candidate"]
    others = {r: v for r, v in rep["rules"].items() if r != "liver.alt_increased"}
    assert all(v["gained"] == v["lost"] == v["changed_severity"] == v["timing_changed"] == 0 for v in others.values())


def test_changed_patients_are_pseudonymous_by_default_with_the_inbox_reference(tmp_path):
    from monitor.inbox.store import patient_ref as inbox_ref

    cand = with_candidate(default_protocols(), [load_protocol(lowered_alt(tmp_path))])
    rep = replay(constructed_cohort(), default_protocols(), cand, at(60), secret=SECRET).to_json()
    refs = {p["patient"] for p in rep["patients_changed"]}
    assert refs == {patient_ref(SECRET, pid) for pid in expected_changes()}
    assert refs == {inbox_ref(SECRET.encode(), pid) for pid in expected_changes()}
    text = json.dumps(rep)
    assert "pt-" not in text  # no patient id anywhere in the pseudonymous report


def test_a_gained_alert_and_its_earlier_first_alert(tmp_path):
    """A candidate that lowers the grade-1 ALT multiple gains alerts for results between the two
    multiples, and opens earlier for a patient whose first raised ALT is in that band."""
    data = yaml.safe_load(IV.read_text(encoding="utf-8"))
    for rule in data["rules"]:
        if rule["id"] == "liver.alt_increased":
            rule["bands"] = copy.deepcopy(rule["bands"])
            rule["bands"][0]["value"] = 0.5
    path = tmp_path / "g1.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    cand = with_candidate(default_protocols(), [load_protocol(path)])
    rep = replay(constructed_cohort(), default_protocols(), cand, at(60), secret=SECRET, identify=True).to_json()
    got = {p["patient_id"]: p for p in rep["patients_changed"]}
    # every patient's normal ALT (30 U/L = 0.75x ULN) now raises grade 1: "pt-normal" gains one
    assert [g["rule"] for g in got["pt-normal"]["gained"]] == ["liver.alt_increased"]
    alt = rep["rules"]["liver.alt_increased"]
    assert alt["gained"] >= 1 and alt["opened"]["candidate"] > alt["opened"]["baseline"]


def _sim_file(tmp: Path, fmt: str, n: int = 40, seed: int = 5) -> str:
    cohort = generate_cohort(n, seed, days=60, formats=(fmt,))
    return write_cohort(cohort, tmp / fmt)["events_path"]


@pytest.mark.parametrize("fmt", ["json", "mixed"])
def test_a_simulated_cohort_replays_against_itself_with_no_difference(tmp_path, fmt):
    path = _sim_file(tmp_path, fmt)
    got = read_file(path, Settings(), Window(None, None))
    assert got.skipped == {}
    assert len(got.courses) == 40
    protos = default_protocols()
    rep = replay([got.courses[p] for p in got.order], protos, protos, got.last, secret=SECRET).to_json()
    assert rep["differences"] == 0
    assert sum(r["opened"]["baseline"] for r in rep["rules"].values()) > 40  # the cohort does raise alerts


def test_the_reader_handles_the_patient_stream_layout():
    """Records on ``observations`` with a ``kind`` header: treatments are decoded from their
    original bytes, actions are skipped; plain records are canonical observations."""
    s = Settings()
    out = Collected()
    w = Window(None, None)
    o = obs("alt", 200, 7, high=ULN, patient="pk")
    d = dose(patient="pk")
    interpret(out, s, s.topic_observations, o.model_dump_json().encode(), {}, None, w)
    interpret(out, s, s.topic_observations, d.model_dump_json().encode(), {"kind": b"treatment"}, at(0), w)
    interpret(out, s, s.topic_observations, b'{"action":"acknowledge"}', {"kind": b"action"}, at(8), w)
    interpret(out, s, s.topic_observations, b"not json", {}, None, w)
    events = out.courses["pk"].events
    assert [type(e.event).__name__ for e in events] == ["Observation", "DoseEvent"]
    assert events[0].arrival == o.received_at and events[1].arrival == at(0)
    assert out.skipped == {f"{s.topic_observations} kind=action": 1, "rejected: schema-invalid": 1}
    # records after --until are not replayed (before --since they are: they are the course's history)
    out2 = Collected()
    interpret(out2, s, s.topic_observations, o.model_dump_json().encode(), {}, None, Window(None, at(6)))
    interpret(out2, s, s.topic_observations, o.model_dump_json().encode(), {}, None, Window(at(30), None))
    assert len(out2.courses["pk"].events) == 1 and out2.skipped == {"after --until": 1}


def test_html_report_is_self_contained_and_has_the_chart(tmp_path):
    cand = with_candidate(default_protocols(), [load_protocol(lowered_alt(tmp_path))])
    rep = replay(constructed_cohort(), default_protocols(), cand, at(60), secret=SECRET).to_json()
    page = render_html(rep)
    assert '<svg id="burden-chart"' in page
    n_rules = len(rep["rules"])
    assert page.count('class="bar-baseline"') == n_rules and page.count('class="bar-candidate"') == n_rules
    # no external resource: no src/href to a URL, no @import, no network fetch
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "@import" not in page and "fetch(" not in page
    for ref in (p["patient"] for p in rep["patients_changed"]):
        assert ref in page


def test_cli_replay_from_a_simulated_file_writes_json_and_html(tmp_path, capsys):
    path = _sim_file(tmp_path, "json", n=20)
    cand = lowered_alt(tmp_path)
    out_json, out_html = tmp_path / "r.json", tmp_path / "r.html"
    rc = cli_main(["protocol", "replay", "--candidate", str(cand), "--from-file", path, "--json", str(out_json),
                   "--html", str(out_html), "--patients", "15"])
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert set(data) >= {"patients", "patient_days", "differences", "rules", "patients_changed"}
    assert data["patients"] == 15
    assert out_html.read_text().startswith("<!doctype html>")
    captured = capsys.readouterr()
    assert "replay: baseline 15/15" in captured.err  # progress on stderr
    assert f"{data['differences']} difference(s)" in captured.out


def test_cli_replay_one_line_errors(tmp_path, capsys):
    cand = lowered_alt(tmp_path)
    assert cli_main(["protocol", "replay", "--candidate", str(cand), "--from-file", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    f = tmp_path / "e.jsonl"
    f.write_text("")
    assert cli_main(["protocol", "replay", "--candidate", str(cand), "--from-file", str(f), "--since", "yesterday"]) == 2
    assert "--since" in capsys.readouterr().err
    assert cli_main(["protocol", "replay", "--candidate", str(cand), "--from-file", str(f), "--since",
                     "2025-03-02T00:00:00Z", "--until", "2025-03-01T00:00:00Z"]) == 2
    assert "--until is before --since" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\n")
    assert cli_main(["protocol", "replay", "--candidate", str(bad), "--from-file", str(f)]) == 2
    assert "protocol" in capsys.readouterr().err
