"""Retention on upgrade: which settings of an existing topic ``monitor topics`` changes."""
from __future__ import annotations

from monitor.settings import Settings
from monitor.topics_admin import retention_changes

S = Settings()
WEEK = str(7 * 86_400_000)


def test_a_week_on_a_record_topic_becomes_unlimited():
    assert retention_changes(S, S.topic_alerts, {"cleanup.policy": "delete", "retention.ms": WEEK,
                                                 "retention.bytes": "-1"}) == {"retention.ms": "-1"}
    assert retention_changes(S, S.topic_treatments, {"retention.ms": "-1", "retention.bytes": "1073741824",
                                                     "cleanup.policy": "delete"}) == {"retention.bytes": "-1"}


def test_compacted_topics_get_compaction_added_and_kept():
    assert retention_changes(S, S.topic_patients, {"cleanup.policy": "delete", "retention.ms": WEEK}) == {
        "cleanup.policy": "compact", "retention.ms": "-1"}
    assert retention_changes(S, S.topic_patients, {"cleanup.policy": "compact,delete", "retention.ms": "-1"}) == {}


def test_never_shortens_what_an_operator_lengthened():
    want = S.observations_retention_days * 86_400_000
    assert retention_changes(S, S.topic_observations, {"retention.ms": WEEK}) == {"retention.ms": str(want)}
    assert retention_changes(S, S.topic_observations, {"retention.ms": str(2 * want)}) == {}
    assert retention_changes(S, S.topic_observations, {"retention.ms": "-1"}) == {}


def test_raw_inputs_keep_the_broker_default():
    assert retention_changes(S, S.topic_lab_results, {"retention.ms": WEEK}) == {}


def test_the_changelog_gets_its_segment_size_unless_the_topic_sets_its_own():
    """Compaction never touches the active segment: the changelog's size bounds what a restore
    reads (README "State in memory"). A broker's default (1 GiB) is replaced; a value an
    operator set on the topic, larger or smaller, is kept."""
    from monitor.topics_admin import changelog_topic, topic_configs

    cl = changelog_topic(S)
    want = str(S.changelog_segment_bytes)
    assert topic_configs(S, cl)["segment.bytes"] == want == str(16 * 1024 * 1024)
    base = {"cleanup.policy": "compact", "retention.ms": "-1"}
    assert retention_changes(S, cl, {**base, "segment.bytes": "1073741824"}) == {"segment.bytes": want}
    assert retention_changes(S, cl, {**base, "segment.bytes": "1073741824"}, {"segment.bytes"}) == {}
    assert retention_changes(S, cl, {**base, "segment.bytes": "1048576"}, {"segment.bytes"}) == {}
    assert retention_changes(S, cl, {**base, "segment.bytes": want}) == {}
    # only the changelog: the ledger writes each key once, demographics change rarely
    assert "segment.bytes" not in topic_configs(S, S.topic_patients)
    assert "segment.bytes" not in topic_configs(S, S.topic_deliveries)


def test_a_changelog_segment_smaller_than_a_message_is_refused_at_start():
    """The broker refuses a record batch larger than a segment: a patient's changelog value
    up to MAX_MESSAGE_BYTES must fit, or its checkpoint would be refused again and again."""
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="CHANGELOG_SEGMENT_BYTES .* is below MAX_MESSAGE_BYTES"):
        Settings(_env_file=None, changelog_segment_bytes=4 * 1024 * 1024)
    with pytest.raises(ValidationError):
        Settings(_env_file=None, changelog_segment_bytes=512 * 1024, max_message_bytes=512 * 1024)  # Kafka's minimum
    assert Settings(_env_file=None, changelog_segment_bytes=4 * 1024 * 1024,
                    max_message_bytes=4 * 1024 * 1024).changelog_segment_bytes == 4 * 1024 * 1024
