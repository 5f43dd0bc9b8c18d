"""No silent secrets (security review H3 and the defaults): the worker, the inbox and
the MLLP listener are real processes here; each must exit non-zero, naming the
variable, when a secret it needs is missing or a known default -- before touching Kafka."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from workers import ROOT, TEST_PSEUDONYM_SECRET, TEST_WEBHOOK_SECRET

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

BASE = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "KAFKA_CONNECT_TIMEOUT_SECONDS": "1", "HOME": os.environ.get("HOME", "/tmp")}


def run(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "monitor.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=90, env={**BASE, **env})


def test_worker_with_webhook_and_no_webhook_secret_exits_naming_it():
    proc = run(["worker"], PSEUDONYM_SECRET=TEST_PSEUDONYM_SECRET, WEBHOOK_URL="https://pager.example/hook")
    assert proc.returncode != 0
    assert "WEBHOOK_SECRET" in proc.stderr and "PSEUDONYM_SECRET" not in proc.stderr
    # and it never reached Kafka (127.0.0.1:1 would have failed differently)
    assert "Kafka" not in proc.stderr


@pytest.mark.parametrize("value", [None, "change-me-pseudonym-secret", "short"])
def test_worker_without_a_real_pseudonym_secret_exits_naming_it(value):
    env = {} if value is None else {"PSEUDONYM_SECRET": value}
    proc = run(["worker"], **env)
    assert proc.returncode != 0 and "PSEUDONYM_SECRET" in proc.stderr


def test_webhook_secret_must_not_be_the_pseudonym_secret():
    proc = run(["worker"], PSEUDONYM_SECRET=TEST_PSEUDONYM_SECRET, WEBHOOK_URL="https://pager.example/hook",
               WEBHOOK_SECRET=TEST_PSEUDONYM_SECRET)
    assert proc.returncode != 0 and "WEBHOOK_SECRET must differ" in proc.stderr


def test_worker_with_its_secrets_gets_past_the_check():
    proc = run(["worker"], PSEUDONYM_SECRET=TEST_PSEUDONYM_SECRET, WEBHOOK_URL="https://pager.example/hook",
               WEBHOOK_SECRET=TEST_WEBHOOK_SECRET)
    assert "refusing to start" not in proc.stderr
    assert proc.returncode != 0  # no broker at 127.0.0.1:1: it fails later, on Kafka


def test_inbox_without_inbox_secret_exits_naming_it(tmp_path):
    users = tmp_path / "users.json"
    users.write_text("{}")
    proc = run(["inbox", "serve", "--port", "0", "--users-file", str(users)])
    assert proc.returncode != 0 and "INBOX_SECRET" in proc.stderr


def test_mllp_with_sasl_and_no_password_exits_naming_it():
    proc = run(["mllp", "--port", "0"], KAFKA_SASL_MECHANISM="SCRAM-SHA-512", KAFKA_SASL_USERNAME="mllp")
    assert proc.returncode != 0 and "KAFKA_SASL_PASSWORD" in proc.stderr


def test_settings_dump_carries_no_secret():
    """Review L9: ``Settings.model_dump()`` used to include the secrets."""
    from monitor.settings import Settings

    s = Settings(pseudonym_secret=TEST_PSEUDONYM_SECRET, webhook_secret=TEST_WEBHOOK_SECRET,
                 kafka_sasl_password="sasl-pw-123")
    dumped = str(s.model_dump()) + repr(s)
    for secret in (TEST_PSEUDONYM_SECRET, TEST_WEBHOOK_SECRET, "sasl-pw-123"):
        assert secret not in dumped
    assert s.pseudonym_secret == TEST_PSEUDONYM_SECRET
