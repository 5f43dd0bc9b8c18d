"""docs/configuration.md is generated from the settings and lists every environment variable the code reads."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_READ = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|getenv\(|_env_bool\()\s*["']([A-Z][A-Z0-9_]+)["']""")


def test_checked_in_configuration_table_is_current():
    from monitor.config_docs import render_markdown

    assert (ROOT / "docs" / "configuration.md").read_text() == render_markdown(), \
        "run `monitor config docs --out docs/configuration.md` and commit"


def test_every_setting_has_a_meaning():
    from monitor.config_docs import rows
    from monitor.settings import Settings

    table = rows()  # raises KeyError naming a setting without a description
    assert len(table) == len(Settings.model_fields)
    assert all(meaning.strip() for _, _, meaning in table)


def test_every_environment_variable_read_in_the_code_is_documented():
    from monitor.config_docs import documented_names

    read = set()
    for package in ("monitor", "schemas", "alerts"):
        for path in (ROOT / package).rglob("*.py"):
            read |= set(ENV_READ.findall(path.read_text(encoding="utf-8")))
    assert read, "the scan found nothing: the pattern is broken"
    assert {"INBOX_SECRET", "MLLP_PORT", "LOG_FORMAT"} <= read
    assert read - documented_names() == set(), "add them to monitor/config_docs.py EXTRA"


def test_secrets_are_masked_in_config_show(monkeypatch):
    from monitor import settings as settings_mod
    from monitor.config_docs import effective_config

    monkeypatch.setenv("KAFKA_SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("WEBHOOK_SECRET", "s3cret")
    monkeypatch.delenv("PSEUDONYM_SECRET", raising=False)
    settings_mod.get_settings.cache_clear()
    try:
        cfg = effective_config()
    finally:
        settings_mod.get_settings.cache_clear()
    assert cfg["KAFKA_SASL_PASSWORD"] == "***" and cfg["WEBHOOK_SECRET"] == "***"
    assert "hunter2" not in str(cfg) and "s3cret" not in str(cfg)
    assert cfg["PSEUDONYM_SECRET"] == "(not set)"  # there is no default secret any more (review H3)
