"""``bench/bench_clinical.py``: the in-process measure runs on a small cohort, with and
without its restore section (``--restore-patients 0`` once divided by zero)."""
from __future__ import annotations

import pytest
from script_module import load_script


def _bench():
    return load_script("bench/bench_clinical.py", "bench_clinical")


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
