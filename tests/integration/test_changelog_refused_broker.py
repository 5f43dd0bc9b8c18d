"""The clinical runner writes a batch's changelog in the background, while the next batch is
read and processed (monitor/clinical/runner.py). When the broker refuses that changelog,
nothing may be committed past it and no state built on it may be kept: the batches are
restored from the durable changelog and processed again. Real broker, real worker: the
changelog topic is created with a ``max.message.bytes`` smaller than any patient's state,
so every changelog write fails until the limit is raised."""
from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic

from test_clinical_broker import INPUTS, OUTPUTS, dose, result, send
from workers import service_env, wait_committed, wait_for

from monitor.topics_admin import topic_partitions

pytestmark = pytest.mark.integration


def _committed_and_ends(bootstrap: str, group: str, topic: str) -> tuple[int, int]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(topic_partitions(c, topic))]
        ends = c.end_offsets(tps)
        return sum(c.committed(tp) or 0 for tp in tps), sum(ends.values())
    finally:
        c.close()


def _alerts(bootstrap: str, topic: str) -> list[dict]:
    """Every alert version on ``topic`` now (read to its end offsets)."""
    from kafka_broker import read_topic

    return [json.loads(m.value) for m in read_topic(bootstrap, topic)]


def _logged(w, text: bytes, times: int, timeout: float = 60.0) -> None:
    """Wait until the worker's log holds ``text`` at least ``times`` times."""
    deadline = time.monotonic() + timeout
    while w.log_path.read_bytes().count(text) < times:
        assert time.monotonic() < deadline, f"{text!r} not logged {times} times within {timeout}s:\n{w.tail()}"
        time.sleep(0.1)


def test_a_refused_changelog_holds_the_commit_and_the_state_back(kafka_bootstrap, topic_factory, worker_factory):
    prefix = f"clr{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    changelog = f"{prefix}-patients-changelog"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(changelog, 3, 1, topic_configs={"cleanup.policy": "compact",
                                                                      "max.message.bytes": "200"})])
        # a refused changelog is noticed, and its batches rolled back and processed again, at
        # the next batch or clock tick: ticks every 2 s (not the default 30 s) so that the
        # retries below do not wait for a tick
        w = worker_factory(service_env(topics, app_id=prefix, TICK_INTERVAL_SECONDS="2"), name="w1")
        now = datetime.now(timezone.utc)
        d = now - timedelta(days=5)
        send(kafka_bootstrap, [(topics["treatments"], "clr-1", dose("clr-1", d))])
        send(kafka_bootstrap, [(topics["lab-results"], "clr-1", result("clr-1", "plt-0", "platelets", 320,
                                                                      d - timedelta(days=1), 150, 450)),
                               (topics["lab-results"], "clr-1", result("clr-1", "plt-1", "platelets", 40,
                                                                      now - timedelta(days=1), 150, 450))])
        # every changelog write is refused: the worker says so, rolls back, and commits nothing
        # ... and retries: refused again after the rollback (the test waited 3 s for this)
        _logged(w, b"clinical changelog not acknowledged", times=2)
        committed, end = _committed_and_ends(kafka_bootstrap, f"{prefix}-clinical", topics["observations"])
        assert end >= 3 and committed == 0, (committed, end)
        # operations see it on /metrics: refused checkpoints, rollbacks and their restores, and
        # records waiting for a checkpoint; none written
        wait_for(lambda: w.metric("monitor_rollbacks_total", stage="clinical", reason="changelog_refused") >= 2, 30,
                 "two rollbacks counted")
        assert w.metric("monitor_clinical_checkpoints_total", outcome="refused") >= 2
        assert w.metric("monitor_clinical_checkpoints_total", outcome="written") == 0
        # (the second rollback began after the first one's restore, which is then observed)
        assert w.metric("monitor_clinical_restore_seconds_count", cause="rollback") >= 1
        assert w.metric("monitor_clinical_restore_seconds_count", cause="assigned") >= 1
        assert w.metric("monitor_clinical_partitions_owned") == 3
        wait_for(lambda: w.metric("monitor_clinical_uncheckpointed_records") > 0, 30,
                 "records waiting for a checkpoint counted")
        # the outputs went out before the state (each retry emits the same alert version again)
        first = [a for a in _alerts(kafka_bootstrap, topics["alerts"]) if a["rule_id"] == "heme.platelets_decreased"]
        assert first and {a["version"] for a in first} == {1}

        # the broker takes the changelog again: everything is committed, the state is durable
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, changelog, {"max.message.bytes": "1048588"})])
        wait_committed(kafka_bootstrap, f"{prefix}-clinical", [topics["observations"]], timeout=60)
        assert w.metric("monitor_clinical_checkpoints_total", outcome="written") >= 1
        wait_for(lambda: w.metric("monitor_clinical_uncheckpointed_records") == 0, 30,
                 "nothing waiting for a checkpoint once the changelog is taken")
    finally:
        admin.close()

    # a new worker process restores that state: the next result updates the same alert
    w.stop()
    worker_factory(service_env(topics, app_id=prefix), name="w2")
    send(kafka_bootstrap, [(topics["lab-results"], "clr-1", result("clr-1", "plt-2", "platelets", 30, now, 150, 450))])
    deadline = time.monotonic() + 60
    versions: set = set()
    while time.monotonic() < deadline:
        alerts = [a for a in _alerts(kafka_bootstrap, topics["alerts"]) if a["rule_id"] == "heme.platelets_decreased"]
        versions = {(a["alert_id"], a["version"]) for a in alerts}
        if any(v > 1 for _id, v in versions):
            break
        time.sleep(0.2)
    assert len({i for i, _v in versions}) == 1, versions  # one alert, not a second one opened afresh
    assert max(v for _i, v in versions) == 2, versions
    last = max(alerts, key=lambda a: a["version"])
    assert "plt-2" in {e["observation_id"] for e in last["evidence"]}


def test_a_refused_output_write_rolls_back_the_pending_work_of_every_partition(kafka_bootstrap, topic_factory,
                                                                              worker_factory):
    """Coalesced checkpoint (monitor/clinical/runner.py): batches of other partitions whose
    outputs were acknowledged wait, uncheckpointed, when a later batch's outputs are refused.
    Their changes are marked in the same store as the refused batch's, so they cannot be
    written alone: they are rolled back too, and no offset is ever committed without its
    patients on the changelog. The ``alerts`` topic refuses every alert version (its
    ``max.message.bytes`` is smaller than any) until the limit is raised; meanwhile new
    patients keep arriving on every partition."""
    import threading

    from test_clinical_broker import Durable, Reader, _send_steadily

    prefix = f"rbo{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *[o for o in OUTPUTS if o != "alerts"], prefix=prefix)
    topics["alerts"] = f"{prefix}.alerts"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    stop = threading.Event()
    try:
        admin.create_topics([NewTopic(topics["alerts"], 3, 1, topic_configs={"max.message.bytes": "300"})])
        w = worker_factory(service_env(topics, app_id=prefix, CLINICAL_CHECKPOINT_INTERVAL_SECONDS="0.3",
                                       TICK_INTERVAL_SECONDS="3600"), name="w1")
        now = datetime.now(timezone.utc)
        trt, lab = topics["treatments"], topics["lab-results"]
        durable = Durable(kafka_bootstrap, topics, prefix)
        # a new patient (a dose: no alert) every 20 ms, on every partition
        filler = threading.Thread(target=_send_steadily, args=(
            kafka_bootstrap, lambda i: [(trt, f"rb-{i}", dose(f"rb-{i}", now - timedelta(days=1)))],
            lambda i: stop.is_set(), 0.02), daemon=True)
        filler.start()
        # the filler's patients are processed and checkpointed (the test waited 2 s for this)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not sum(durable.check().values()):
            time.sleep(0.1)
        assert sum(durable.check().values()), "no filler batch was checkpointed"
        d = now - timedelta(days=5)
        send(kafka_bootstrap, [
            (trt, "rb-x", dose("rb-x", d)),
            (lab, "rb-x", result("rb-x", "rbx-0", "platelets", 320, d - timedelta(days=1), 150, 450)),
            (lab, "rb-x", result("rb-x", "rbx-1", "platelets", 40, now - timedelta(days=1), 150, 450))])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and b"clinical batch not acknowledged" not in w.log_path.read_bytes():
            durable.check()  # asserts: no committed offset without its patients on the changelog
            time.sleep(0.2)
        assert b"clinical batch not acknowledged" in w.log_path.read_bytes()
        # several refusals and rollbacks (about one a second), the filler flowing: five of
        # them (the test watched for 8 s before)
        deadline = time.monotonic() + 60
        while w.log_path.read_bytes().count(b"clinical batch not acknowledged") < 5:
            assert time.monotonic() < deadline, f"fewer than 5 refusals within 60 s:\n{w.tail()}"
            durable.check()
            time.sleep(0.2)
        durable.check()
        wait_for(lambda: w.metric("monitor_rollbacks_total", stage="clinical", reason="write_refused") >= 5, 30,
                 "the refusals counted as rollbacks")
        assert w.metric("monitor_rollbacks_total", stage="clinical", reason="changelog_refused") == 0
        # the broker takes the alert versions again: everything is processed, committed, durable
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topics["alerts"],
                                            {"max.message.bytes": "1048588"})])
        stop.set()
        filler.join(10)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and durable.check() != durable.stream_ends():
            time.sleep(0.3)
        assert durable.check() == durable.stream_ends()
        alerts = Reader(kafka_bootstrap, topics["alerts"])
        try:
            alerts.wait_for(lambda x: x["patient_id"] == "rb-x" and x["rule_id"] == "heme.platelets_decreased",
                            timeout=30)
        finally:
            alerts.close()
        durable.close()
    finally:
        stop.set()
        admin.close()


def test_alerts_keep_reaching_the_nurses_while_the_changelog_is_throttled(kafka_bootstrap, topic_factory,
                                                                          worker_factory):
    """A batch's alerts do not wait for the changelog write in flight (monitor/clinical/
    runner.py, step 4). The broker throttles the changelog's producer (a produce quota of
    100 bytes/s on its client id ``<app id>-clinical-changelog``: after the first write it
    mutes that connection for about 11 s per write), and patient after patient still gets
    the alert within seconds while the offsets wait uncommitted. The worker then dies
    (SIGKILL) with that state not durable; with the quota lifted, a new worker restores
    what is on the changelog, reads the uncommitted records again and commits them, and
    the next result updates the same alert: nothing lost, no alert opened twice. The clock
    ticks every second meanwhile, and a tick does not wait for the changelog either. (With
    the batch after a checkpoint waiting for its changelog, or with a tick checkpointing and
    writing its own changelog before each chunk, the second patient's alert waited out the
    throttle; with the changelog on the alerts' producer, alerts and commits would both be
    throttled, or neither.)"""
    from kafka_broker import read_topic, set_client_quota
    from test_clinical_broker import Reader

    prefix = f"clq{uuid.uuid4().hex[:8]}"
    topics = topic_factory(*INPUTS, *OUTPUTS, prefix=prefix)
    changelog = f"{prefix}-patients-changelog"
    changelog_client = f"{prefix}-clinical-changelog"
    group = f"{prefix}-clinical"
    # session timeout 6 s (the broker's group.min.session.timeout.ms): the killed worker's
    # partitions reach the next one sooner
    env = service_env(topics, app_id=prefix, CLINICAL_CHECKPOINT_INTERVAL_SECONDS="0.2", TICK_INTERVAL_SECONDS="1",
                      KAFKA_SESSION_TIMEOUT_SECONDS="6")
    lab = topics["lab-results"]
    patients = [f"clq-{i}" for i in range(3)]
    now = datetime.now(timezone.utc)
    set_client_quota(kafka_bootstrap, changelog_client, 100)
    alerts, lifted = None, False
    try:
        w = worker_factory(env, name="w1")
        alerts = Reader(kafka_bootstrap, topics["alerts"])
        d = now - timedelta(days=5)
        took = []
        for pid in patients:
            sent = time.monotonic()
            send(kafka_bootstrap, [(topics["treatments"], pid, dose(pid, d)),
                                   (lab, pid, result(pid, f"{pid}-0", "platelets", 320, d - timedelta(days=1), 150, 450)),
                                   (lab, pid, result(pid, f"{pid}-1", "platelets", 40, now - timedelta(days=1), 150, 450))])
            alerts.wait_for(lambda a, pid=pid: a["patient_id"] == pid and a["rule_id"] == "heme.platelets_decreased",
                            timeout=30)
            took.append(round(time.monotonic() - sent, 1))
            time.sleep(0.5)  # the patient's checkpoint is due (0.2 s) and started meanwhile
        # the changelog is throttled: the offsets of the later patients wait uncommitted ...
        committed, end = _committed_and_ends(kafka_bootstrap, group, topics["observations"])
        assert end >= 3 * len(patients) and committed < end, (committed, end)
        # ... and the alerts did not wait for it (a throttled write waits about 11 s)
        assert max(took) < 6.0, took
        w.kill()  # a crash, with the later patients' state not durable
        set_client_quota(kafka_bootstrap, changelog_client, None)  # the quota lifted
        lifted = True
        worker_factory(env, name="w2")
        wait_committed(kafka_bootstrap, group, [topics["observations"]], timeout=60)
        assert set(patients) <= {m.key.decode() for m in read_topic(kafka_bootstrap, changelog)}
    finally:
        if not lifted:
            set_client_quota(kafka_bootstrap, changelog_client, None)
        if alerts is not None:
            alerts.close()

    send(kafka_bootstrap, [(lab, "clq-0", result("clq-0", "clq-0-2", "platelets", 30, now, 150, 450))])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        versions = {(a["patient_id"], a["alert_id"], a["version"]) for a in _alerts(kafka_bootstrap, topics["alerts"])
                    if a["rule_id"] == "heme.platelets_decreased"}
        if ("clq-0", 2) in {(p, v) for p, _i, v in versions}:
            break
        time.sleep(0.2)
    # one alert per patient (the replay re-sent version 1 with the same id), and clq-0's next
    # result updated it
    assert {p for p, _i, _v in versions} == set(patients), versions
    assert len({i for _p, i, _v in versions}) == len(patients), versions
    assert {v for p, _i, v in versions if p == "clq-0"} == {1, 2}, versions
