"""Worker settings from the environment (pydantic-settings)."""
from __future__ import annotations

from functools import lru_cache

from pydantic import Field, model_validator
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
    #: patient demographics (compacted, keyed by patient id; JSON, FHIR Patient or HL7 ADT in,
    #: canonical ``schemas/patients.PatientRecord`` out); shown to signed-in clinical users only
    topic_patients: str = "patients"
    #: retention of the patient stream ``observations`` in days (the timeline rebuilds from it;
    #: the clinical record topics never expire)
    observations_retention_days: int = Field(default=400, ge=180)
    #: compacted changelog of the clinical stage's patient store (empty: ``<app id>-patients-changelog``)
    topic_patient_changelog: str = ""
    #: the changelog's segment size: compaction never touches a partition's active segment, so on a
    #: broker's default (1 GiB) the versions of every patient since the last roll stay, and a restore
    #: reads them all (docs/measurements.md, "The changelog's uncompacted tail")
    changelog_segment_bytes: int = Field(default=16 * 1024 * 1024, ge=1024 * 1024, description=(
        "`segment.bytes` of the patient store changelog and of the open-alerts index (`TOPIC_OPEN_ALERTS`), "
        "set when a topic is created and on an existing topic that has no value of its own: the broker "
        "compacts only closed segments, so this bounds the versions a restore reads beyond the latest one "
        "per key (per partition, about this much plus what the cleaner has not reached yet). At least 1 MiB, "
        "Kafka's minimum, and at least MAX_MESSAGE_BYTES: the broker refuses a record batch larger than a "
        "segment"))
    #: compacted record of delivered alert versions per sink (the restart-safe idempotency ledger)
    topic_deliveries: str = "alert-deliveries"
    #: compacted index of the open alerts Alertmanager has been given, per outbox partition (one
    #: partition per partition of ``alerts``): a worker taking an outbox partition over reads it
    #: instead of the partition's whole history (``monitor.notify.open_alerts``)
    topic_open_alerts: str = "open-alerts"
    #: compacted ledger of replayed dead letters (``monitor dlq replay``); empty = "<topic_dead_letter>-replays"
    topic_dead_letter_replays: str = ""
    topic_partitions: int = 3
    topic_replication_factor: int = 1

    # Kafka security (see README "Kafka security")
    kafka_security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None
    kafka_sasl_mechanism: str | None = None  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    kafka_sasl_username: str | None = None
    kafka_sasl_password: str | None = Field(default=None, repr=False, exclude=True)

    #: consumer-group session timeout: how soon a crashed worker's partitions move
    kafka_session_timeout_seconds: float = 10.0
    #: how long a command or the worker's start-up waits for a first broker connection
    #: before it fails with a one-line error (unreachable broker, wrong credentials)
    kafka_connect_timeout_seconds: float = Field(default=30.0, gt=0)

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

    # integrator conventions (docs/integration.md)
    hl7_processing_id: str = Field(default="P", pattern=r"^[PTD]$", description=(
        "HL7 v2 processing id (MSH-11) accepted: P (production), T (test/training) or D (debugging); "
        "another is answered AR with ERR 202 over MLLP and dead-lettered (hl7_processing_id) on the input topics"))
    code_maps_dir: str = Field(default="", description=(
        "directory of per-source code maps (*.yaml: local observation code -> LOINC, local unit -> UCUM), "
        "selected by MSH-4 (HL7) or Observation.meta.source (FHIR); empty = no maps (docs/integration.md)"))

    # protocol files: empty means the shipped defaults
    protocol_files: str = ""

    # alert delivery sinks (empty URL = sink off)
    alertmanager_url: str = ""
    #: open alerts are re-pushed to Alertmanager this often, with endsAt = now + 4 intervals (a
    #: restarted Alertmanager, which keeps no alerts, has them back within one interval)
    alertmanager_refresh_seconds: float = Field(default=60.0, gt=0)
    #: public base URL of the inbox: Alertmanager's generatorURL links to <url>/alerts/<alert id>
    #: (an opaque id; the page needs a sign-in). Empty: no link
    inbox_public_url: str = ""
    webhook_url: str = ""
    #: a failed delivery to a sink is retried with exponential backoff (0.5 s, 1 s, 2 s ...)
    #: capped at this many seconds between attempts
    delivery_retry_max_seconds: float = Field(default=60.0, gt=0)
    webhook_secret: str = Field(default="", repr=False, exclude=True)
    #: key of the alert ids and pseudonymous alert references (HMAC); required, >= 32 characters,
    #: no default (``require_secrets`` refuses to start without it)
    pseudonym_secret: str = Field(default="", repr=False, exclude=True)
    #: include the patient id in third-party notifications (off by default)
    notify_include_patient_id: bool = False
    #: lab source names kept as the ``source`` metric label (comma-separated); others: "other"
    metrics_sources: str = ""
    #: users for the actions API and the inbox, and the directory action roles come from (H4)
    inbox_users_file: str = ""
    #: serve the worker's actions API (HTTP Basic) on a non-loopback WEB_HOST: only behind TLS
    #: (review M7); by default it answers 503 there and people act through the inbox
    actions_api_allow_exposed: bool = False

    # clocks
    tick_interval_seconds: float = 30.0

    # clinical stage
    #: 2 s rather than 0.5 s (docs/measurements.md, thirteenth pass): at 2,000 alert-changing events/s
    #: p99 was lower in 7 of 8 alternated pairs (median 168 against 285 ms; each checkpoint writes
    #: every patient changed since the last one, about 6 MB in one burst in that test), and a
    #: backlog's changelog writes fell by a third
    clinical_checkpoint_interval_seconds: float = Field(default=2.0, ge=0, description=(
        "how long the clinical stage lets acknowledged batches accumulate before it writes the changed "
        "patients to the changelog and commits their offsets (one write per patient per checkpoint, not per "
        "batch; due at 20,000 records too, and processing waits for the checkpoint in flight once 30,000 records "
        "are not durable); idle input, a revocation, a stop or a clock tick checkpoint at once; "
        "0 = every batch. A crash replays up to this much more input (idempotent; alert versions "
        "deduplicated downstream)"))

    clinical_takes_own_writes: bool = Field(default=True, description=(
        "with ingest in the worker's process (ingest_processes = 0): the clinical stage takes the records its "
        "own ingest wrote to the patient stream, once the broker acknowledged them, in offset order, instead "
        "of fetching them back; a partition fetches again as soon as someone else's record comes in between "
        "(its end is checked every 50 ms). false = always fetch"))

    # ingest
    ingest_processes: int = Field(default=0, ge=0, le=16, description=(
        "processes of its own that run the worker's ingest loop (validation, units, the writes to the patient "
        "stream), supervised by the worker, so that ingest and the clinical stage each have a core. 0 (the "
        "default) = ingest in the worker's own process, one core per worker. 1 raised one worker's throughput "
        "from ~13,000-16,000 to ~21,000-22,000 observations/s on the 2-core benchmark machine, but lengthened the "
        "tail at 2,000 alert-changing events/s there (p99 129-209 ms against 91-108 ms), where the broker and "
        "the load generator share the two cores (README \"Performance\"): set it where the worker has a core to "
        "spare"))

    log_level: str = "INFO"

    @model_validator(mode="after")
    def _changelog_segment_holds_a_message(self) -> "Settings":
        if self.changelog_segment_bytes < self.max_message_bytes:
            raise ValueError(
                f"CHANGELOG_SEGMENT_BYTES ({self.changelog_segment_bytes}) is below MAX_MESSAGE_BYTES "
                f"({self.max_message_bytes}): the broker would refuse a patient's changelog value larger than a "
                f"segment; raise CHANGELOG_SEGMENT_BYTES")
        return self


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
    "patients": "topic_patients",
    "alert-deliveries": "topic_deliveries",
    "open-alerts": "topic_open_alerts",
}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def is_loopback(host: str) -> bool:
    """True when ``host`` (an address or ``localhost``) is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- secrets
#
# No silent secrets (security review H2/H3): a component refuses to start, naming the
# variable, when a secret it needs is missing, shorter than MIN_SECRET_CHARS, or a
# value printed in this repository (previous defaults, documentation placeholders).

MIN_SECRET_CHARS = 32
KNOWN_DEFAULTS = frozenset({
    "change-me-pseudonym-secret", "dev-only-pseudonym-secret", "change-me", "changeme", "admin", "secret",
    "password", "pseudo-secret", "test-secret", "webhook-secret",
})


def secret_problem(name: str, value: str | None) -> str | None:
    """Why ``value`` is not acceptable as the secret ``name`` (None = fine)."""
    v = (value or "").strip()
    if not v:
        return f"{name} is not set (generate one: python -c 'import secrets; print(secrets.token_hex(32))')"
    if v.lower() in KNOWN_DEFAULTS or v.lower().startswith("change-me"):
        return f"{name} is a known default value; set a random secret"
    if len(v) < MIN_SECRET_CHARS:
        return f"{name} is shorter than {MIN_SECRET_CHARS} characters"
    return None


def secret_problems(component: str, s: Settings, env: dict[str, str] | None = None) -> list[str]:
    """Every missing or default secret ``component`` (worker, inbox, mllp) needs."""
    import os

    env = os.environ if env is None else env
    problems: list[str] = []

    def check(name: str, value: str | None) -> None:
        p = secret_problem(name, value)
        if p:
            problems.append(p)

    if component == "worker":
        check("PSEUDONYM_SECRET", s.pseudonym_secret)
        if s.webhook_url.strip():
            check("WEBHOOK_SECRET", s.webhook_secret)
            if s.webhook_secret and s.webhook_secret == s.pseudonym_secret:
                problems.append("WEBHOOK_SECRET must differ from PSEUDONYM_SECRET (the receiver holds it)")
    if component == "inbox":
        check("INBOX_SECRET", env.get("INBOX_SECRET"))
    if (s.kafka_sasl_mechanism or "").strip() and not (s.kafka_sasl_password or "").strip():
        problems.append("KAFKA_SASL_PASSWORD is not set while KAFKA_SASL_MECHANISM is")
    return problems


def require_secrets(component: str, s: Settings | None = None) -> None:
    """Exit with status 2, naming each variable, when a needed secret is missing or a default."""
    import sys

    problems = secret_problems(component, s or get_settings())
    if problems:
        for p in problems:
            print(f"monitor {component}: refusing to start: {p}", file=sys.stderr)
        raise SystemExit(2)
