"""``bench/bench_clinical.py``: the in-process measure runs on a small cohort, with and
without its restore section (``--restore-patients 0`` once divided by zero)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_clinical", ROOT / "bench" / "bench_clinical.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("restore", ["0", "50"])
def test_small_cohort_runs_and_reports(restore, capsys):
    rc = _bench().main(["--patients", "5", "--days", "10", "--batch", "100", "--churn-rounds", "0",
                        "--restore-patients", restore])
    out = capsys.readouterr().out
    assert rc == 0
    assert "records/s in-process" in out
    if restore == "0":
        assert "skipped (--restore-patients 0)" in out and "restore 50" not in out
    else:
        assert "restore " in out and "memory per patient:" in out and "skipped" not in out
