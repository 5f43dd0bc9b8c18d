"""Worker settings from the environment (pydantic-settings)."""
from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every field reads the upper-case environment variable of the same name."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    app_id: str = Field(default="sma-monitor", validation_alias="MONITOR_APP_ID")

    # topics
    topic_lab_results: str = "lab-results"
    topic_vital_signs: str = "vital-signs"
    topic_liver_function: str = "liver-function"
    topic_treatments: str = "treatments"
    topic_observations: str = "observations"
    topic_dead_letter: str = "dead-letter"
    topic_findings: str = "findings"
    topic_alerts: str = "alerts"
    topic_alert_actions: str = "alert-actions"
    #: retired: the clock runs in-process (kept until deploy/k8s drops the topic)
    topic_ticks: str = "patient-ticks"
    #: compacted changelog of the clinical stage's patient store (empty: ``<app id>-patients-changelog``)
    topic_patient_changelog: str = ""
    #: compacted record of delivered alert versions per sink (the restart-safe idempotency ledger)
    topic_deliveries: str = "alert-deliveries"
    topic_partitions: int = 3
    topic_replication_factor: int = 1

    # Kafka security (see README "Kafka security")
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = Field(default=None, repr=False)

    #: consumer-group session timeout: how soon a crashed worker's partitions move
    kafka_session_timeout_seconds: float = 10.0

    #: faust's data directory (faust keeps no tables here any more; the patient store is in
    #: memory, rebuilt from its changelog topic)
    data_dir: str = ".monitor-data"

    # web server (health, metrics, actions API, inbox)
    web_host: str = "127.0.0.1"
    web_port: int = 6066

    # input limits
    max_payload_bytes: int = 1_048_576
    #: largest Kafka message the worker can read or dead-letter (broker message.max.bytes must allow it)
    max_message_bytes: int = 16 * 1024 * 1024
    max_json_depth: int = 32
    max_future_skew_seconds: float = 86_400.0

    # protocol files: empty means the shipped defaults
    protocol_files: str = ""

    # alert delivery sinks (empty URL = sink off)
    alertmanager_url: str = ""
    webhook_url: str = ""
    webhook_secret: str = Field(default="", repr=False)
    #: secret for pseudonymous alert references in third-party notifications
    pseudonym_secret: str = Field(default="change-me-pseudonym-secret", repr=False)
    #: include the patient id in third-party notifications (off by default)
    notify_include_patient_id: bool = False
    #: users for the actions API and the inbox (YAML: username -> {password_hash, role})
    inbox_users_file: str = ""

    # clocks
    tick_interval_seconds: float = 30.0

    log_level: str = "INFO"


#: the one list of the service's topics: default (short) name -> settings field. The inputs
#: come first; the patient changelog is named after the app id (``topics_admin.changelog_topic``).
INPUT_TOPICS = {
    "lab-results": "topic_lab_results",
    "vital-signs": "topic_vital_signs",
    "liver-function": "topic_liver_function",
    "treatments": "topic_treatments",
}
SERVICE_TOPICS = {
    **INPUT_TOPICS,
    "observations": "topic_observations",
    "dead-letter": "topic_dead_letter",
    "findings": "topic_findings",
    "alerts": "topic_alerts",
    "alert-actions": "topic_alert_actions",
    "patient-ticks": "topic_ticks",
    "alert-deliveries": "topic_deliveries",
}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
