"""The clinicians' protocol tests (alerts/protocols/tests) run through the real engine and lifecycle."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alerts.scenarios import format_results, run_paths, scenario_files, shipped_suite

SHIPPED = scenario_files()


def test_the_shipped_suite_exists_and_covers_both_protocols():
    assert SHIPPED, "no shipped scenarios"
    text = "\n".join(p.read_text() for p in SHIPPED)
    assert "onasemnogene-abeparvovec-iv" in text and "onasemnogene-abeparvovec-it" in text


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_scenario_passes(path: Path):
    results = run_paths([path])
    assert all(r.ok for r in results), format_results(results)
    assert results[0].checks > 0


def test_every_rule_of_both_protocols_has_a_scenario():
    from alerts.protocol import default_protocols
    import yaml

    covered: dict[str, set[str]] = {}
    for p in SHIPPED:
        d = yaml.safe_load(p.read_text())
        rules = set(d.get("covers") or [])
        for e in d.get("expect") or []:
            rules |= {a["rule"] for a in e.get("alerts") or []}
            rules |= set(e.get("absent") or [])
        covered.setdefault(d["protocol"], set()).update(rules)
    missing = {p.id: sorted({r.id for r in p.rules} - covered.get(p.id, set())) for p in default_protocols()}
    assert not any(missing.values()), f"rules without a scenario: {missing}"


WRONG = textwrap.dedent("""
    name: a scenario with a wrong expectation
    protocol: onasemnogene-abeparvovec-iv
    patient: {birth_date: 2024-09-01}
    dose: {day: 0}
    events:
      - {day: 7, lab: {analyte: alt, value: 100, high: 40}}   # 2.5x ULN: grade 1, info
    expect:
      - at: 8
        alerts:
          - {rule: liver.alt_increased, severity: critical, status: open}
        absent: [liver.alt_increased]
""")


def test_a_wrong_expectation_fails_with_a_readable_diff(tmp_path: Path):
    f = tmp_path / "wrong.yaml"
    f.write_text(WRONG)
    results = run_paths([f])
    assert not results[0].ok
    assert len(results[0].failures) == 2
    out = format_results(results)
    assert "FAIL" in out and "at day 8: expected alert" in out
    assert "- expected: liver.alt_increased: severity critical, status open" in out
    assert "+ actual:  liver.alt_increased: info grade 1, firing" in out
    assert "expected no open alert" in out
    # the command exits non-zero and prints the same diff
    proc = subprocess.run([sys.executable, "-m", "monitor.cli", "protocol", "test", str(f)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "- expected: liver.alt_increased: severity critical" in proc.stdout


def test_the_command_runs_the_shipped_suite_without_a_path():
    proc = subprocess.run([sys.executable, "-m", "monitor.cli", "protocol", "test"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("PASS ")]
    assert len(lines) == len(SHIPPED)
    assert str(shipped_suite()) in proc.stdout


def test_a_broken_scenario_is_an_error_not_a_pass(tmp_path: Path):
    f = tmp_path / "broken.yaml"
    f.write_text("name: x\nprotocol: no-such-protocol\npatient: {birth_date: 2024-09-01}\nexpect: [{at: 1}]\n")
    results = run_paths([f])
    assert results[0].error and "no-such-protocol" in results[0].error
    assert "ERROR" in format_results(results)
