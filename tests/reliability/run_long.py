#!/usr/bin/env python
"""Long mode of the reliability suite, one command:

    .venv/bin/python tests/reliability/run_long.py [--kills 20] [--broker-restarts 3]
                                                   [--fuzz 1000000] [--only crash,fuzz,...]

Runs the reliability tests with the long-mode budgets (RELIABILITY_KILLS,
RELIABILITY_BROKER_RESTARTS, FUZZ_EXAMPLES) and prints the figures: kills survived,
broker restarts, fuzzed inputs, lost and duplicated counts (both must be 0). Exit status
is pytest's (non-zero if any check failed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SUITES = {
    "crash": "tests/reliability/test_crash.py",
    "broker": "tests/reliability/test_broker_restart.py",
    "rebalance": "tests/reliability/test_rebalance.py",
    "scale": "tests/reliability/test_scale_out.py",
    "outage": "tests/reliability/test_sink_outage.py",
    "security": "tests/reliability/test_security.py",
    "fuzz": "tests/fuzz",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--broker-restarts", type=int, default=3)
    ap.add_argument("--fuzz", type=int, default=1_000_000, help="fuzzed inputs in total over the targets")
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--only", default=",".join(SUITES), help="comma-separated: " + ",".join(SUITES))
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SUITES]
    if unknown:
        ap.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    tmp = Path(tempfile.mkdtemp(prefix="reliability-long-"))
    figures, fuzz_stats = tmp / "figures.jsonl", tmp / "fuzz.json"
    env = {**os.environ, "RELIABILITY_KILLS": str(args.kills), "RELIABILITY_BROKER_RESTARTS": str(args.broker_restarts),
           "FUZZ_EXAMPLES": str(args.fuzz), "RELIABILITY_PATIENTS": str(args.patients),
           "RELIABILITY_FIGURES": str(figures), "FUZZ_STATS": str(fuzz_stats),
           "FUZZ_DATABASE": os.environ.get("FUZZ_DATABASE", str(ROOT / ".hypothesis" / "fuzz-long"))}
    if args.seed is not None:
        env["RELIABILITY_SEED"] = str(args.seed)
    # the crash run's worker logs and timings, to explain a failure after pytest's tmp dirs rotate
    env.setdefault("RELIABILITY_KEEP_DIR", str(tmp / "crash"))
    rc = 0
    durations = {}
    for name in chosen:
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s", "--timeout=0", SUITES[name]]
        print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
        r = subprocess.run(cmd, cwd=ROOT, env=env)
        durations[name] = round(time.monotonic() - t0, 1)
        rc = rc or r.returncode
    figs = {}
    if figures.exists():
        for line in figures.read_text().splitlines():
            d = json.loads(line)
            figs[d["name"]] = d["value"]
    fuzz = json.loads(fuzz_stats.read_text()) if fuzz_stats.exists() else {}
    lost = sum(int(v.get("lost", 0)) for v in figs.values() if isinstance(v, dict))
    dup = sum(int(v.get("duplicated", 0)) for v in figs.values() if isinstance(v, dict))
    in_flight = sum(int(v.get("in_flight_repeats", 0)) for v in figs.values() if isinstance(v, dict))
    report = {
        "kills_survived": figs.get("crash", {}).get("kills_survived"),
        "broker_restarts": figs.get("broker_restart", {}).get("broker_restarts"),
        "fuzzed_inputs": fuzz.get("total"),
        "fuzz_seconds": durations.get("fuzz"),
        "lost": lost,
        "duplicated": dup,
        "in_flight_repeats_after_sigkill": in_flight,
        "durations_s": durations,
        "details": figs,
        "fuzz_by_target": fuzz.get("inputs"),
        "pytest_exit": rc,
    }
    report["kept"] = str(tmp)
    print(json.dumps(report, indent=1, default=str))
    return rc or (1 if lost or dup else 0)


if __name__ == "__main__":
    sys.exit(main())
