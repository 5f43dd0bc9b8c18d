"""The outbox for the delivery tests and benchmarks: alert versions (one alert opened by the
lifecycle from a liver finding, a page, and copies of it as other alerts' versions), and the
commit a release without the open-alerts index leaves."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

T0 = datetime(2026, 12, 1, 8, 0, tzinfo=timezone.utc)


def paged_alert(patient_id: str = "P-000001"):
    """A firing, paging alert version 1 as the lifecycle opens it."""
    from alerts.lifecycle import AlertBook, LifecycleConfig, apply_finding
    from schemas.findings import Evidence, Finding, FindingText, ProtocolRef

    finding = Finding(
        finding_id="f-1", patient_id=patient_id, rule_id="liver.alt_increased", dedupe_key="", state="present",
        severity="high", grade=3,
        evidence=[Evidence(observation_id="obs-1", analyte="ALT", value=200.0, unit="U/L", limit=120.0,
                           comparison=">")],
        protocol=ProtocolRef(id="sma-oa", version="1.2.0"), effective_at=T0, evaluated_at=T0, route="liver",
        text=FindingText(what="ALT above 3x ULN", why="possible AAV liver injury", action="repeat LFTs"),
        ward="PICU", care_team="neuro-picu")
    (alert,) = apply_finding(AlertBook(patient_id=patient_id), finding, T0, LifecycleConfig())
    return alert


def alert_version(template, alert_id: str, version: int, *, closing: bool = False, **update):
    """Version ``version`` of alert ``alert_id``: paging when it is the first, resolved (a page:
    its status changed) when ``closing``, else an update that pages nobody."""
    from schemas.alert import AlertStatus

    return template.model_copy(update={
        "alert_id": alert_id, "version": version, "notify": version == 1,
        "status": AlertStatus.RESOLVED if closing else AlertStatus.FIRING,
        "previous_status": AlertStatus.FIRING if closing else None,
        "closed_at": T0 + timedelta(minutes=version) if closing else None,
        "updated_at": T0 + timedelta(minutes=version), **update})


def commit_without_index(bootstrap: str, group: str, topic: str, end: int) -> None:
    """What a release without the open-alerts index does: commits the outbox group's position on
    partition 0 of ``topic``, and writes no index."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        c.commit({TopicPartition(topic, 0): OffsetAndMetadata(end, "", -1)})
    finally:
        c.close()
