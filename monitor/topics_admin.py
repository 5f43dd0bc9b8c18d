"""Create the service's topics (idempotent) with kafka-python's admin client."""
from __future__ import annotations

import logging
import threading
import time

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from .kafka_config import kafka_python_config
from .settings import SERVICE_TOPICS, Settings

log = logging.getLogger(__name__)


def service_topics(s: Settings) -> list[str]:
    return [getattr(s, field) for field in SERVICE_TOPICS.values()]


class KafkaUnreachable(RuntimeError):
    """The brokers could not be reached or refused our credentials within the deadline."""


SASL_DROPS_MEAN_AUTH_FAILURE = 3

#: how long a tool waits for a topic it reads to show up in the brokers' metadata
TOPIC_METADATA_WAIT_SECONDS = 10.0


def topic_partitions(consumer, topic: str, wait: float = TOPIC_METADATA_WAIT_SECONDS) -> set[int]:
    """The partition ids of ``topic`` as a kafka-python ``consumer`` sees them, asking the
    brokers again for up to ``wait`` seconds while it sees none.

    kafka-python's ``partitions_for_topic`` answers an empty set both for a topic that does
    not exist and for one the metadata left out for a moment (just after it was created,
    or while a partition's leader is elected: the topic comes back with an error and its
    partitions are dropped). A reader that takes the empty set at its word reports an
    empty topic where there may be records (a protocol replay printed "0 patients" with exit
    status 0 for a patient stream the brokers did not have). Empty after ``wait``: the topic
    is not there, or this user may not see it."""
    deadline = time.monotonic() + wait
    while True:
        parts = consumer.partitions_for_topic(topic)  # asks the brokers when it knows none
        if parts or time.monotonic() >= deadline:
            return set(parts or ())
        time.sleep(0.2)


def admin_client(s: Settings, timeout: float | None = None) -> KafkaAdminClient:
    """A connected admin client, or ``KafkaUnreachable`` after ``timeout`` seconds
    (default ``KAFKA_CONNECT_TIMEOUT_SECONDS``).

    kafka-python retries the bootstrap for ever, also after an authentication failure
    (a wrong SASL password): bound it, so a misconfigured worker fails with a clear
    message instead of hanging.
    """
    timeout = timeout or s.kafka_connect_timeout_seconds
    result: dict = {}

    def connect() -> None:
        try:
            result["admin"] = KafkaAdminClient(client_id=f"{s.app_id}-admin", **kafka_python_config(s))
        except Exception as exc:  # reported below
            result["error"] = exc

    sasl = s.kafka_security_protocol.startswith("SASL")

    class _AuthWatch(logging.Handler):
        """kafka-python logs, then retries, an authentication failure: notice it.

        A Kafka 4 broker answers a wrong SCRAM password either with an authentication
        error or (about half the time, seen on 4.1) by closing the socket after the
        client's final SASL message. On a SASL listener, a TCP connection that is
        accepted and then closed by the broker three times in a row is reported as a
        failed authentication too (an unreachable broker refuses the connection instead).
        """

        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if "SaslAuthenticationFailed" in text or "Authentication failed" in text or "AuthenticationFailed" in text:
                result.setdefault("auth_failed", "authentication failed")
            elif sasl and "Bootstrap connection to" in text and "socket disconnected" in text:
                result["dropped"] = result.get("dropped", 0) + 1
                if result["dropped"] >= SASL_DROPS_MEAN_AUTH_FAILURE:
                    result.setdefault("auth_failed", "the broker closed the connection during SASL authentication "
                                                     f"{result['dropped']} times")

    watch = _AuthWatch(level=logging.WARNING)
    kafka_log = logging.getLogger("kafka")
    kafka_log.addHandler(watch)
    t = threading.Thread(target=connect, name="kafka-admin-connect", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    try:
        while t.is_alive() and time.monotonic() < deadline and "auth_failed" not in result:
            t.join(0.1)
    finally:
        kafka_log.removeHandler(watch)
    if "admin" in result:
        return result["admin"]
    if "auth_failed" in result:
        why = f"{result['auth_failed']} (wrong SASL user name, password or mechanism?)"
    elif "error" in result:
        why = type(result["error"]).__name__
    else:
        why = f"no connection within {timeout:.0f}s"
    raise KafkaUnreachable(
        f"cannot use Kafka at {s.kafka_bootstrap_servers} ({s.kafka_security_protocol}"
        f"{', SASL ' + (s.kafka_sasl_mechanism or 'PLAIN') if s.kafka_security_protocol.startswith('SASL') else ''}): "
        f"{why}; check the bootstrap servers, TLS files and SASL credentials")


def changelog_topic(s: Settings) -> str:
    """The clinical stage's patient store changelog (compacted; one partition per
    partition of the patient stream ``observations``)."""
    return s.topic_patient_changelog or f"{s.app_id}-patients-changelog"


def compacted_topics(s: Settings) -> set[str]:
    return {s.topic_deliveries, changelog_topic(s), s.topic_patients, s.topic_open_alerts}


def partitioned_like(s: Settings) -> dict[str, str]:
    """Topics whose partition ``p`` holds the state of partition ``p`` of another topic, so they
    are created with as many partitions as that one: the patient changelog (the patient stream
    ``observations``) and the open-alerts index (the outbox ``alerts``)."""
    return {changelog_topic(s): s.topic_observations, s.topic_open_alerts: s.topic_alerts}


def topic_configs(s: Settings, name: str) -> dict[str, str]:
    """Retention per topic (README "Retention"): clinical records never expire.

    * compacted (latest value per key, kept for ever): the patient demographics, the delivery
      ledger, the patient store changelog, the open-alerts index;
    * no time- or size-based deletion (``retention.ms=-1``): ``alerts`` (every version: the
      history), ``alert-actions`` (who did what), ``treatments`` (the dose: ward, team, day 0);
    * ``observations``: ``OBSERVATIONS_RETENTION_DAYS`` (at least 180);
    * the rest (raw inputs, findings, dead letters): the broker's default.

    The changelog and the open-alerts index also get ``segment.bytes`` = ``CHANGELOG_SEGMENT_BYTES``:
    the broker compacts closed segments only, and both are rewritten as they change (every
    checkpoint writes a new version of each changed patient), so with the broker's default
    segment (1 GiB) a restore would read every version since the last roll
    (``bench/bench_changelog_restore.py``).
    """
    if name in compacted_topics(s):
        compacted = {"cleanup.policy": "compact", "retention.ms": "-1"}
        if name in (changelog_topic(s), s.topic_open_alerts):
            compacted["segment.bytes"] = str(s.changelog_segment_bytes)
        return compacted
    if name in (s.topic_alerts, s.topic_alert_actions, s.topic_treatments):
        return {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
    if name == s.topic_observations:
        return {"retention.ms": str(s.observations_retention_days * 86_400_000)}
    return {}


def ensure_topics(s: Settings, names: list[str] | None = None, timeout: float | None = None) -> list[str]:
    """Create missing topics (the service topics and the patient changelog); returns the
    names created. The changelog gets as many partitions as the patient stream has, the
    open-alerts index as many as the outbox (``partitioned_like``)."""
    names = names or [*service_topics(s), changelog_topic(s)]
    admin = admin_client(s, timeout)
    try:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            like = partitioned_like(s)
            # an existing source topic keeps its count (it may have more partitions than configured)
            sources = sorted({like[n] for n in missing if n in like and like[n] in existing})
            counts = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(sources)} if sources else {}
            try:
                admin.create_topics([
                    NewTopic(n, counts.get(like.get(n, ""), 0) or s.topic_partitions, s.topic_replication_factor,
                             topic_configs=topic_configs(s, n))
                    for n in missing
                ])
            except TopicAlreadyExistsError:
                pass
            log.info("created %d topics", len(missing))
        align_retention(admin, s, [n for n in names if n in existing])
        return missing
    finally:
        admin.close()


#: settings the service sets on a topic only where the topic has no value of its own (an
#: operator's choice is kept, larger or smaller)
UNLESS_SET_ON_TOPIC = frozenset({"segment.bytes"})


def retention_changes(s: Settings, name: str, current: dict[str, str],
                      set_on_topic: frozenset[str] | set[str] = frozenset()) -> dict[str, str]:
    """The settings of an existing topic that must change so its records last as long as
    ``topic_configs`` says (an upgrade from a release that created them with the broker's
    7-day default). Never shortens what an operator lengthened: a retention already
    unlimited or longer than wanted is kept. The changelog's ``segment.bytes`` is set when
    the value in force is the broker's (``set_on_topic``: the keys the topic sets itself)."""
    changes: dict[str, str] = {}
    for key, want in topic_configs(s, name).items():
        have = current.get(key)
        if have is None or have == want:
            continue
        if key in UNLESS_SET_ON_TOPIC:
            if key not in set_on_topic:
                changes[key] = want
        elif key == "cleanup.policy":
            if want not in have.split(","):
                changes[key] = want
        elif int(have) != -1 and (int(want) == -1 or int(have) < int(want)):
            changes[key] = want
    return changes


#: ``config_source`` of a value set on the topic itself (DescribeConfigs)
TOPIC_SOURCE = "DYNAMIC_TOPIC_CONFIG"


def align_retention(admin: KafkaAdminClient, s: Settings, names: list[str]) -> dict[str, dict[str, str]]:
    """Bring existing topics' retention, and the changelog's segment size, to ``topic_configs`` (SET only
    the keys that differ). Without the right to alter topic configs (the worker's Kafka
    identity has none: Strimzi's KafkaTopic resources own them) it logs a warning naming
    the topics and keys and carries on; ``monitor topics`` run as an administrator fixes it."""
    from kafka.admin import ConfigResource, ConfigResourceType
    from kafka.errors import KafkaError

    names = [n for n in names if topic_configs(s, n)]
    if not names:
        return {}
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names],
                                           config_filter="all")
    except KafkaError as exc:
        log.warning("cannot read the retention of existing topics (%s): not checked", type(exc).__name__)
        return {}
    todo: dict[str, dict[str, str]] = {}
    for by_name in described.values():
        for name, entries in by_name.items():
            current = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in entries.items()}
            own = {k for k, v in entries.items() if isinstance(v, dict) and v.get("config_source") == TOPIC_SOURCE}
            changes = retention_changes(s, name, {k: str(v) for k, v in current.items() if v is not None}, own)
            if changes:
                todo[name] = changes
    if not todo:
        return {}
    try:
        result = admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, n, c) for n, c in todo.items()])
        # kafka-python 3: {resource type: {topic: "OK" or the error's text}}
        failed = [f"{n}: {r}" for by_name in result.values() for n, r in by_name.items() if r != "OK"]
        if failed:
            raise RuntimeError("; ".join(failed))
    except (KafkaError, RuntimeError, ValueError) as exc:
        log.warning("topics keep a retention (or the changelog a segment size) the service needs changed (%s), "
                    "and altering them failed (%s): "
                    "run `monitor topics` with a Kafka identity allowed to alter topic configs",
                    ", ".join(f"{n}: {', '.join(sorted(c))}" for n, c in sorted(todo.items())),
                    str(exc)[:200])
        return {}
    for name, changes in sorted(todo.items()):
        log.info("topic %s: %s", name, ", ".join(f"{k}={v}" for k, v in sorted(changes.items())))
    return todo
