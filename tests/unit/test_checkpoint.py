"""The clinical stage's coalesced changelog checkpoint, without a broker: when a checkpoint
is due (``PendingCheckpoint``), and that the store keeps a patient's marks across batches
until the checkpoint takes them, so a patient changed by many batches is encoded once with
the state of all of them (monitor/clinical/runner.py, module docstring)."""
from __future__ import annotations

from aiokafka.structs import TopicPartition

from alerts.testkit import at, dose, obs
from monitor.clinical.runner import ClinicalRunner, PendingCheckpoint
from monitor.clinical.store import InMemoryPatientStore, decode
from monitor.settings import Settings
from test_clinical_processor import Stream, by_topic, engine, lifecycle, processor  # noqa: F401 (fixtures)

A, B = TopicPartition("observations", 0), TopicPartition("observations", 1)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_interval_zero_checkpoints_every_batch():
    p = PendingCheckpoint(0.0, 1000)
    assert not p.due() and not p  # nothing pending: nothing to checkpoint
    p.add({A: 5}, 5)
    assert p.due()
    assert p.take() == {A: 5}
    assert not p and not p.due() and p.partitions() == set()


def test_a_checkpoint_is_due_once_the_oldest_pending_batch_is_older_than_the_interval():
    clock = Clock()
    p = PendingCheckpoint(0.5, 1000, clock=clock)
    p.add({A: 10}, 10)
    clock.t += 0.3
    p.add({A: 20, B: 4}, 14)  # a newer batch does not restart the interval
    assert not p.due()
    clock.t += 0.19
    assert not p.due()
    clock.t += 0.02
    assert p.due()
    assert p.records == 24 and p.partitions() == {0, 1}
    assert p.take() == {A: 20, B: 4}  # the last offset + 1 of the newest batch per partition
    # the next interval starts with the next batch, not with the take
    clock.t += 5
    p.add({A: 30}, 10)
    assert not p.due()
    clock.t += 0.5
    assert p.due()


def test_offsets_never_go_back_and_the_record_cap_makes_it_due():
    clock = Clock()
    p = PendingCheckpoint(60.0, 100, clock=clock)
    p.add({A: 50}, 60)
    p.add({A: 40}, 30)  # (cannot happen in order; never lowers what is committed)
    assert p.offsets == {A: 50} and not p.due()
    p.add({B: 7}, 10)
    assert p.due()  # 100 records pending, long before the interval


def test_the_default_interval_and_zero_are_accepted_and_negative_is_not():
    assert Settings(_env_file=None).clinical_checkpoint_interval_seconds > 0
    assert Settings(clinical_checkpoint_interval_seconds=0).clinical_checkpoint_interval_seconds == 0
    try:
        Settings(clinical_checkpoint_interval_seconds=-1)
    except ValueError:
        pass
    else:
        raise AssertionError("a negative interval was accepted")
    r = ClinicalRunner(Settings(clinical_checkpoint_interval_seconds=0.25), processor=None,
                       store=InMemoryPatientStore())
    assert r.pending.interval == 0.25 and r.pending.max_records == ClinicalRunner.CHECKPOINT_MAX_RECORDS


def test_marks_survive_batches_and_one_take_encodes_each_patient_once_with_every_batch(engine, lifecycle):
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s0, s1 = Stream(partition=0), Stream(partition=1)
    # three batches, acknowledged one after another, no checkpoint between them
    p.process([s0.treatment(dose(patient="c1")), s1.treatment(dose(patient="c2"))], at(1))
    p.process([s0.observation(obs("platelets", 320, -1, low=150, high=450, patient="c1"))], at(2))
    out = p.process([s0.observation(obs("platelets", 40, 5, low=150, high=450, patient="c1"))], at(6))
    assert any(a["rule_id"] == "heme.platelets_decreased" for a in by_topic(out, "alerts"))
    assert store.changed_partitions() == {0, 1}
    changed = store.take_changed()
    assert sorted((pid, part) for pid, part, _ in changed) == [("c1", 0), ("c2", 1)]  # once each
    assert store.changed_partitions() == set() and store.take_changed() == []
    state, book = decode(dict((pid, v) for pid, _, v in changed)["c1"])
    # the one value holds every batch: the dose, both results, and the alert of the last batch
    assert state.dose_at is not None
    assert len([h for hs in state.hist.values() for h in hs]) == 2
    assert "heme.platelets_decreased" in {a.rule_id for a in book.open_alerts()}


def test_an_internal_error_keeps_a_patient_whose_changes_wait_for_the_checkpoint(engine, lifecycle, monkeypatch):
    """A patient changed by an acknowledged batch that is not checkpointed yet is not rolled
    back to its older durable bytes by a later record's internal error: that would lose
    the acknowledged batch's change from the next checkpoint while its offset is committed.
    The patient goes back to the durable bytes and the pending record is applied again."""
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream()
    p.process([s.treatment(dose(patient="c3"))], at(1))
    store.take_changed()  # checkpoint 1: the dose is durable
    p.process([s.observation(obs("alt", 30, 0.5, high=40, patient="c3"))], at(1))  # pending
    real = p.engine.evaluate_observation

    def boom(state, o, now):
        if o.value == 31:
            state.ward = "half-updated"
            raise RuntimeError("bug")
        return real(state, o, now)

    monkeypatch.setattr(p.engine, "evaluate_observation", boom)
    (dead,) = p.process([s.observation(obs("alt", 31, 0.6, high=40, patient="c3"))], at(1))
    assert dict(dead.headers)["dlq.reason"] == b"internal_error"
    (pid, _part, value), = store.take_changed()  # checkpoint 2 still holds the acknowledged result
    state, _ = decode(value)
    assert pid == "c3" and len([h for hs in state.hist.values() for h in hs]) == 1
    assert state.ward != "half-updated"


def test_the_replay_cap_counts_the_checkpoint_in_flight_and_the_batches_since():
    """A batch waits for the changelog in flight only when a crash would replay
    ``REPLAY_MAX_RECORDS``: that checkpoint's records plus those pending since
    (monitor/clinical/runner.py, step 4)."""
    r = ClinicalRunner(Settings(_env_file=None), processor=None, store=InMemoryPatientStore())
    cap = ClinicalRunner.REPLAY_MAX_RECORDS
    r.pending.add({A: 3_000}, 3_000)
    assert not r._replay_full()  # nothing in flight: a checkpoint of 3,000 would simply start
    r._persist_records = cap - 3_001
    assert not r._replay_full()
    r.pending.add({A: 3_001}, 1)
    assert r._replay_full()  # in flight and pending together reach the cap
    assert not r.pending.records >= cap  # neither alone would


def test_in_a_backlog_the_batch_after_a_checkpoint_does_not_wait_for_its_changelog():
    """A backlog's checkpoint is due at ``CHECKPOINT_MAX_RECORDS``; the next full batch
    must be processed while that checkpoint's changelog is written, not wait for it (with
    the replay cap equal to the trigger it waited at every checkpoint)."""
    r = ClinicalRunner(Settings(_env_file=None), processor=None, store=InMemoryPatientStore())
    r._persist_records = ClinicalRunner.CHECKPOINT_MAX_RECORDS  # the checkpoint just started
    r.pending.add({A: 1_000}, ClinicalRunner.MAX_BATCH)  # the next full batch, acknowledged
    assert not r._replay_full()
    # but the replay stays bounded: half a checkpoint's records more, and the next batch waits
    r.pending.add({A: 10_000}, ClinicalRunner.CHECKPOINT_MAX_RECORDS // 2)
    assert r._replay_full()


def test_a_limited_take_encodes_the_first_marked_patients_and_a_mark_again_keeps_its_place(engine, lifecycle):
    """A due checkpoint encodes its patients a slice at a time (``ClinicalRunner._encode_slice``):
    the store hands them out in the order they were first marked, so the patients marked when
    the checkpoint became due come before any marked later, and each value holds every batch
    processed before its slice."""
    store = InMemoryPatientStore()
    p = processor(engine, lifecycle, store)
    s = Stream()
    p.process([s.treatment(dose(patient=pid)) for pid in ("d1", "d2", "d3")], at(1))
    assert store.changed_count() == 3
    first = store.take_changed(limit=2)
    assert [pid for pid, _, _ in first] == ["d1", "d2"] and store.changed_count() == 1
    # d3 is still marked; d1 is marked again (after its slice) and d4 for the first time
    p.process([s.observation(obs("platelets", 40, 5, low=150, high=450, patient="d1")),
               s.observation(obs("platelets", 320, 5, low=150, high=450, patient="d3")),
               s.treatment(dose(patient="d4"))], at(6))
    assert store.changed_count() == 3
    (pid, _part, value), = store.take_changed(limit=1)
    state, _ = decode(value)
    assert pid == "d3" and len(state.hist.get("platelets", [])) == 1  # its value holds the later batch
    assert store.take_changed(limit=0) == [] and store.changed_count() == 2
    assert [pid for pid, _, _ in store.take_changed()] == ["d1", "d4"]
    assert store.changed_count() == 0 and store.changed_partitions() == set()


def test_a_batch_made_before_its_partitions_rollback_is_not_processed_after_it():
    """A batch that waited for the lock while a clock chunk's failed write rolled its
    partition back (to the commit) is dropped for that partition: records past the new
    position must not be processed before the ones in between (they are read again)."""
    import asyncio

    from monitor.clinical.own_writes import StreamRecord

    class Processed(Exception):
        pass

    class Processor:
        handoff = None

        def process(self, records):
            raise Processed([r.partition for r in records])

    class Consumer:
        def assignment(self):
            return {TopicPartition("obs", 0), TopicPartition("obs", 1)}

    r = ClinicalRunner(Settings(_env_file=None, topic_observations="obs"), processor=Processor(),
                       store=InMemoryPatientStore())
    r.consumer = Consumer()
    r.owned = frozenset({0, 1})
    r._next = {0: 5, 1: 9}
    batch = {TopicPartition("obs", p): [StreamRecord("obs", p, off, b"k", b"v", ())] for p, off in ((0, 7), (1, 9))}
    made = dict(r._epoch)
    r._epoch[0] = 1  # partition 0 rolled back after the batch was made
    try:
        asyncio.run(r.process_batch(dict(batch), made))
    except Processed as p:
        assert p.args[0] == [1]  # only the partition not rolled back
    else:
        raise AssertionError("nothing processed")
    try:
        asyncio.run(r.process_batch(dict(batch)))  # no epochs: as before
    except Processed as p:
        assert p.args[0] == [0, 1]
    else:
        raise AssertionError("nothing processed")


def test_uncheckpointed_records_are_those_a_crash_now_would_process_again():
    """``monitor_clinical_uncheckpointed_records``: pending batches, those of a due checkpoint
    being encoded, and those of a changelog write until it is acknowledged (a refused one
    still counts: its records are processed again)."""
    import asyncio

    from monitor.metrics import CLINICAL_UNCHECKPOINTED, REGISTRY

    r = ClinicalRunner(Settings(_env_file=None), processor=None, store=InMemoryPatientStore())
    assert r.uncheckpointed_records() == 0
    r.pending.add({A: 300}, 300)
    r._collect_records = 200
    assert r.uncheckpointed_records() == 500

    async def go():
        loop = asyncio.get_running_loop()
        seen = []
        for result in (None, set(), {0}):  # in flight; acknowledged; refused (partition 0 to restore)
            r._persist_task = loop.create_future()
            r._persist_records = 1_000
            if result is not None:
                r._persist_task.set_result(result)
            seen.append(r.uncheckpointed_records())
        r._persist_task = loop.create_future()
        r._persist_task.cancel()
        seen.append(r.uncheckpointed_records())
        return seen

    assert asyncio.run(go()) == [1_500, 500, 1_500, 1_500]
    # the gauge asks the runner (ClinicalRunner.start binds it) at each scrape
    CLINICAL_UNCHECKPOINTED.set_function(r.uncheckpointed_records)
    r._persist_task = None
    assert REGISTRY.get_sample_value("monitor_clinical_uncheckpointed_records") == 500
    r.pending.take()
    r._collect_records = 0
    assert REGISTRY.get_sample_value("monitor_clinical_uncheckpointed_records") == 0
