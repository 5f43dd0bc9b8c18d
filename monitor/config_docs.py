"""The configuration reference: every environment variable, its default and meaning.

Generated from ``monitor.settings.Settings`` (the worker's pydantic settings) plus the
few variables other processes read directly (inbox, MLLP listener, logging). Printed by
``monitor config docs``; ``docs/configuration.md`` is its output and a unit test fails
when the two differ or when a setting has no description here.
"""
from __future__ import annotations

from typing import Any

from .settings import Settings

#: meaning of each Settings field (the field's own ``description`` wins when set)
DESCRIPTIONS: dict[str, str] = {
    "kafka_bootstrap_servers": "Kafka bootstrap servers, comma-separated `host:port`.",
    "app_id": "Faust application id: prefix of the consumer groups, changelog topics and client ids.",
    "topic_lab_results": "Input topic: lab results (JSON, FHIR R4 Observation/Bundle, HL7 v2 ORU^R01).",
    "topic_vital_signs": "Input topic: vital signs (JSON or FHIR).",
    "topic_liver_function": "Input topic: liver function panels (JSON, several results per event).",
    "topic_treatments": "Input topic: dose and steroid events, keyed by patient id.",
    "topic_observations": "Canonical observations written by ingest and the MLLP listener, keyed by patient id.",
    "topic_dead_letter": "Rejected inputs: original bytes plus `dlq.*` headers (see `monitor dlq`).",
    "topic_findings": "Rule findings (internal, per patient).",
    "topic_alerts": "Alert versions published by the lifecycle (read by the inbox and the sinks).",
    "topic_alert_actions": "Acknowledge / resolve / silence actions from the inbox and the actions API.",
    "topic_patients": "Patient demographics (name, MRN, date of birth, ward, bed), compacted by patient id; "
                      "written by the MLLP listener (ADT) and `monitor patients load` (JSON, FHIR Patient).",
    "alertmanager_refresh_seconds": "Open alerts are re-pushed to Alertmanager this often, with a rolling "
                                    "endsAt of four intervals, so a restarted Alertmanager has them back.",
    "delivery_retry_max_seconds": "Longest wait between two attempts to deliver an alert version to a sink that "
                                  "fails (exponential backoff from 0.5 s, capped here; retried until delivered).",
    "inbox_public_url": "Public base URL of the inbox: Alertmanager's generatorURL links to "
                        "`<url>/alerts/<alert id>` (opaque id; sign-in required). Empty: no link.",
    "observations_retention_days": "Retention of the patient stream `observations` in days (at least 180); "
                                   "alerts, actions, treatments and patients never expire.",
    "topic_patient_changelog": "Compacted changelog of the clinical stage's patient store (empty: "
                               "`<app id>-patients-changelog`), one partition per partition of the patient stream.",
    "topic_deliveries": "Compacted ledger of delivered alert versions per sink (restart-safe idempotency).",
    "topic_open_alerts": "Compacted index of the open alerts Alertmanager has been given, one partition per "
                         "partition of `TOPIC_ALERTS`: a worker taking an outbox partition over reads it instead of "
                         "the partition's whole history (README \"Paging via Alertmanager\").",
    "topic_dead_letter_replays": "Compacted ledger of replayed dead letters (`monitor dlq replay`); "
                                 "empty means `<TOPIC_DEAD_LETTER>-replays`.",
    "topic_partitions": "Partitions of topics the service creates (`monitor topics`, worker start).",
    "topic_replication_factor": "Replication factor of topics the service creates.",
    "kafka_security_protocol": "Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
    "kafka_ssl_cafile": "CA bundle (PEM) to verify the brokers (SSL, SASL_SSL).",
    "kafka_ssl_certfile": "Client certificate (PEM) for mutual TLS.",
    "kafka_ssl_keyfile": "Private key (PEM) of the client certificate.",
    "kafka_sasl_mechanism": "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (unset: PLAIN).",
    "kafka_sasl_username": "SASL user name.",
    "kafka_sasl_password": "SASL password (secret).",
    "kafka_session_timeout_seconds": "Consumer-group session timeout: how soon a crashed worker's partitions move.",
    "kafka_connect_timeout_seconds": "How long a command or the worker's start-up waits for a first broker connection "
                                     "before failing with a one-line error (unreachable broker, wrong credentials).",
    "data_dir": "Directory for the worker's local data (table store files).",
    "web_host": "Address of the worker's web server (/healthz, /readyz, /metrics, actions API).",
    "web_port": "Port of the worker's web server.",
    "max_payload_bytes": "Largest input payload accepted; larger ones are dead-lettered `payload_too_large`.",
    "max_message_bytes": "Largest Kafka message the worker can read or dead-letter (the broker's "
                         "`message.max.bytes` must allow it).",
    "max_json_depth": "Deepest JSON nesting accepted; deeper inputs are dead-lettered `too_deep`.",
    "max_future_skew_seconds": "How far in the future an effective time may be before `future_timestamp`.",
    "protocol_files": "Comma-separated protocol YAML files; empty means the shipped protocols.",
    "alertmanager_url": "Alertmanager base URL for alert delivery; empty turns the sink off.",
    "webhook_url": "Webhook URL for alert delivery (signed JSON POST); empty turns the sink off.",
    "webhook_secret": "HMAC secret signing webhook bodies (secret); empty falls back to PSEUDONYM_SECRET.",
    "pseudonym_secret": "Secret for pseudonymous patient references in third-party notifications (secret; "
                        "change the default).",
    "notify_include_patient_id": "Put the patient id into third-party notifications (off by default).",
    "metrics_sources": ("Comma-separated lab source names (MSH-4, FHIR meta.source, JSON source) kept as the `source` "
                        "label of `monitor_source_last_event_timestamp_seconds`; any other name is counted as "
                        "`other`. Empty: the first 200 names seen by the process (sender-chosen: set this in "
                        "production so a sender cannot fill the label and blind `MonitorLabSourceSilent`)."),
    "inbox_users_file": ("YAML users file (username -> password_hash, role) for the inbox and the actions API; the "
                         "worker resolves the role of every alert action from it (by the action's `by`; without it "
                         "every action is dead-lettered `action_unknown_user`)."),
    "tick_interval_seconds": "Seconds between in-process clock runs over the owned patients (overdue samples, escalation, missing dose records).",
    "log_level": "Log level: DEBUG, INFO, WARNING or ERROR.",
    "actions_api_allow_exposed": "Serve the worker's actions API on a non-loopback WEB_HOST (off: it answers 503 "
                                 "there; put the inbox or a TLS proxy in front instead).",
}

#: variables read outside ``Settings``: (name, default, meaning, read by)
EXTRA: list[tuple[str, str, str, str]] = [
    ("LOG_FORMAT", "text", "`text` for plain lines, `json` for one JSON object per line (log shippers).",
     "every command"),
    ("CLINICAL_CORE", "auto", "`auto`: the clinical core's compiled modules where `make core` built them from "
     "the exact source on disk (`alerts/compiled_core.py`); `python`: the plain modules (e.g. to profile "
     "the core with py-spy).", "every command"),
    ("CLINICAL_CORE_DIR", ".build/clinical-core", "Directory of the compiled core's artefacts.", "every command"),
    ("CLINICAL_CORE_CACHE", "${XDG_CACHE_HOME:-~/.cache}/sma-monitor/clinical-core",
     "The machine's cache of compiled core builds, shared by every checkout and keyed by each module's source "
     "and the build's recipe (Cython, its directives, the compiler, its flags, this Python); empty: no cache.",
     "`make core`"),
    ("MONITOR_LAG_INTERVAL_SECONDS", "10", "Seconds between consumer-lag measurements for /metrics.", "worker"),
    ("MLLP_HOST", "127.0.0.1", "Address the MLLP listener binds (`monitor mllp --host`).", "mllp"),
    ("MLLP_PORT", "2575", "Port of the MLLP listener (`monitor mllp --port`).", "mllp"),
    ("MLLP_MAX_CONNECTIONS", "64", "Connections the MLLP listener keeps open at once.", "mllp"),
    ("MLLP_MAX_CONNECTIONS_PER_PEER", "16", "Connections open at once from one sender address.", "mllp"),
    ("MLLP_FRAME_TIMEOUT_SECONDS", "30", "Seconds from a frame's first byte to its end block.", "mllp"),
    ("MLLP_IDLE_TIMEOUT_SECONDS", "300", "Seconds without a byte between frames before a connection is closed.",
     "mllp"),
    ("MLLP_ALLOWED_PEERS", "(empty: any)", "Comma-separated sender networks (CIDR) allowed to connect.", "mllp"),
    ("MLLP_TLS_CERT", "(empty)", "PEM certificate (chain): serve MLLP over TLS.", "mllp"),
    ("MLLP_TLS_KEY", "(empty)", "PEM private key of MLLP_TLS_CERT if not in the same file.", "mllp"),
    ("MLLP_TLS_CLIENT_CA", "(empty)", "PEM CA bundle: require client certificates it signed (mutual TLS).", "mllp"),
    ("MLLP_METRICS_PORT", "0", "Port of the MLLP listener's Prometheus metrics (0 = off).", "mllp"),
    ("MLLP_METRICS_HOST", "127.0.0.1", "Address of the MLLP listener's metrics endpoint.", "mllp"),
    ("INBOX_HOST", "WEB_HOST", "Address the inbox binds (`monitor inbox --host`).", "inbox"),
    ("INBOX_PORT", "6067", "Port of the inbox (`monitor inbox --port`).", "inbox"),
    ("INBOX_USERS_FILE", "(empty)", "Same as the setting above; `monitor inbox --users-file` sets it.", "inbox"),
    ("INBOX_SECRET", "(none: required)", "Secret signing inbox sessions and the opaque patient references in "
     "its URLs (secret, at least 32 characters); the inbox refuses to start without it.", "inbox"),
    ("INBOX_SESSION_IDLE_MINUTES", "30", "Inbox session idle timeout, minutes.", "inbox"),
    ("INBOX_SESSION_MAX_HOURS", "12", "Inbox session absolute lifetime, hours.", "inbox"),
    ("INBOX_METRICS_PORT", "0", "Port of the inbox's Prometheus metrics, apart from the user-facing port "
     "(`monitor inbox --metrics-port`; 0 = off).", "inbox"),
    ("INBOX_METRICS_HOST", "127.0.0.1", "Address of the inbox's metrics endpoint (`--metrics-host`).", "inbox"),
    ("INBOX_SECURE_COOKIES", "(on with TLS)", "Mark cookies Secure (`true`/`false`); set `true` behind a "
     "TLS-terminating proxy.", "inbox"),
    ("INBOX_TRUST_PROXY", "false", "Trust `X-Forwarded-For`/`-Proto` (only from INBOX_TRUSTED_PROXIES when that "
     "is set).", "inbox"),
    ("INBOX_TRUSTED_PROXIES", "(empty)", "Comma-separated proxy addresses or networks whose forwarded headers are "
     "believed; the client is the right-most address that is not one of them. Setting it implies "
     "INBOX_TRUST_PROXY.", "inbox"),
    ("INBOX_TLS_CERT", "(empty)", "Certificate (PEM) to serve the inbox over HTTPS.", "inbox"),
    ("INBOX_TLS_KEY", "(empty)", "Private key (PEM) of INBOX_TLS_CERT.", "inbox"),
    ("INBOX_TIMEZONE", "UTC", "The site's IANA time zone (e.g. `Europe/London`): every time in the inbox is shown "
     "in it with its offset (UTC on hover), and silence expiries are entered in it.", "inbox"),
]

SECRET_FIELDS = frozenset({"kafka_sasl_password", "webhook_secret", "pseudonym_secret"})


def env_name(name: str, field: Any) -> str:
    alias = field.validation_alias
    return str(alias) if isinstance(alias, str) else name.upper()


def _default(field: Any) -> str:
    d = field.default
    if d is None or d == "":
        return "(empty)"
    if isinstance(d, bool):
        return "true" if d else "false"
    return str(d)


def rows() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every Settings field, in declaration order."""
    out = []
    for name, field in Settings.model_fields.items():
        meaning = field.description or DESCRIPTIONS.get(name)
        if not meaning:
            raise KeyError(f"setting {name!r} has no description: add one to monitor/config_docs.py DESCRIPTIONS")
        out.append((env_name(name, field), _default(field), meaning))
    return out


def render_markdown() -> str:
    def cell(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [
        "# Configuration",
        "",
        "<!-- generated by `monitor config docs --out docs/configuration.md`; do not edit by hand -->",
        "",
        "Every process reads its configuration from environment variables (names are case-insensitive).",
        "Secrets are marked *(secret)*; never leave their defaults in production.",
        "`monitor config show` prints the effective values with secrets masked.",
        "",
        "## Worker and shared settings (`monitor.settings.Settings`)",
        "",
        "Read by the worker and by every command that talks to Kafka (`publish`, `topics`, `dlq`, `mllp`, `inbox`).",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    lines += [f"| `{v}` | `{cell(d)}` | {cell(m)} |" for v, d, m in rows()]
    lines += [
        "",
        "## Other variables",
        "",
        "| variable | default | meaning | read by |",
        "|---|---|---|---|",
    ]
    lines += [f"| `{v}` | `{cell(d)}` | {cell(m)} | {r} |" for v, d, m, r in EXTRA]
    return "\n".join(lines) + "\n"


def documented_names() -> set[str]:
    return {v for v, _, _ in rows()} | {v for v, *_ in EXTRA}


def effective_config() -> dict[str, Any]:
    """The effective settings by environment variable name, secrets masked."""
    from .settings import get_settings

    s = get_settings()
    out: dict[str, Any] = {}
    for name, field in Settings.model_fields.items():
        value = getattr(s, name)
        if name in SECRET_FIELDS:
            value = "***" if value else "(not set)"
        out[env_name(name, field)] = value
    return out
