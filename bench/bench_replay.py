"""Benchmark ``monitor protocol replay``: N simulated patients over D days, baseline vs candidate.

Run: .venv/bin/python bench/bench_replay.py [--patients 1000] [--days 90] [--seed 7]

Generates a cohort with ``monitor simulate`` (JSON wire format) into a temporary
``events.jsonl``, writes a candidate protocol (the shipped IV protocol with the ALT grade-3
multiple lowered from 5x to 4x ULN), and times the whole command path the way a protocol
author runs it: ``monitor protocol replay --from-file events.jsonl --candidate ... --json
--html`` (reading and decoding the file, two full replays through the engine and lifecycle
with the hourly clock, the comparison, and both reports). Prints the figures; the target
(issue 17) is <= 60 s for 1,000 patients over 90 days.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from monitor.cli import main as cli_main  # noqa: E402
from monitor.simulate import generate_cohort, write_cohort  # noqa: E402


def lowered_alt_candidate(path: Path, multiple: float = 4.0) -> None:
    data = yaml.safe_load((ROOT / "alerts/protocols/onasemnogene-abeparvovec-iv.yaml").read_text(encoding="utf-8"))
    data["version"] = str(data.get("version", "")) + "-candidate"
    for rule in data["rules"]:
        if rule["id"] == "liver.alt_increased":
            rule["bands"] = [dict(b) for b in rule["bands"]]
            for b in rule["bands"]:
                if b["grade"] == 3:
                    b["value"] = multiple
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=1000, help="cohort size (default: 1000)")
    ap.add_argument("--days", type=int, default=90, help="days of follow-up (default: 90)")
    ap.add_argument("--seed", type=int, default=7, help="cohort seed (default: 7)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        cohort = generate_cohort(a.patients, a.seed, days=a.days, formats=("json",))
        info = write_cohort(cohort, tmp / "sim")
        gen_s = time.perf_counter() - t
        cand = tmp / "candidate.yaml"
        lowered_alt_candidate(cand)
        t = time.perf_counter()
        rc = cli_main(["protocol", "replay", "--quiet", "--from-file", info["events_path"], "--candidate", str(cand),
                       "--json", str(tmp / "r.json"), "--html", str(tmp / "r.html")])
        replay_s = time.perf_counter() - t
        data = json.loads((tmp / "r.json").read_text(encoding="utf-8"))
        print(f"cohort: {a.patients} patients, {a.days} days, {info['events']} records (generated in {gen_s:.1f} s)")
        print(f"replay (read + baseline + candidate + compare + reports): {replay_s:.1f} s "
              f"for {data['patients']} patients, {data['patient_days']:.0f} patient-days "
              f"({1000 * replay_s / max(1, data['patients']):.1f} ms per patient); exit {rc}")
        print(f"differences: {data['differences']} in {len(data['patients_changed'])} patients; "
              f"target <= 60 s: {'met' if replay_s <= 60 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
