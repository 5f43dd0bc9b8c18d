"""The service's own Prometheus metrics (seconds and ``_total``).

Labels are bounded enums only: topic, format, reason, analyte, rule id, severity,
status, sink, outcome, source (a lab system's name). Never a patient id, MRN,
encounter or free text.
"""
from __future__ import annotations

import gc
import time
from bisect import bisect_left
from typing import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)
ACK_BUCKETS = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)

EVENTS_CONSUMED = Counter(
    "monitor_events_consumed_total", "Input events consumed, by topic and wire format",
    ["topic", "format"], registry=REGISTRY)
DEAD_LETTERS = Counter(
    "monitor_dead_letters_total", "Inputs sent to the dead-letter topic, by source topic and reason code",
    ["topic", "reason"], registry=REGISTRY)
OBSERVATIONS = Counter(
    "monitor_observations_total", "Canonical observations produced, by analyte",
    ["analyte", "monitored"], registry=REGISTRY)
FINDINGS = Counter(
    "monitor_findings_total", "Findings from the rule engine, by rule, severity and state",
    ["rule_id", "severity", "state"], registry=REGISTRY)
ALERTS_OPENED = Counter(
    "monitor_alerts_opened_total", "Alerts opened (new episodes), by rule and severity",
    ["rule_id", "severity"], registry=REGISTRY)
ALERT_TRANSITIONS = Counter(
    "monitor_alert_transitions_total", "Alert status transitions",
    ["rule_id", "from_status", "to_status"], registry=REGISTRY)
ALERT_ESCALATIONS = Counter(
    "monitor_alert_escalations_total", "Escalations to the next tier (or the failsafe)",
    ["rule_id", "severity"], registry=REGISTRY)
ACTIONS_REFUSED = Counter(
    "monitor_actions_refused_total",
    "Alert actions refused by the worker (dead-lettered), by reason code (action_unknown_user, action_forbidden, ...)",
    ["reason"], registry=REGISTRY)
TIME_TO_ACK = Histogram(
    "monitor_time_to_acknowledge_seconds", "From alert opened to acknowledged",
    ["severity"], buckets=ACK_BUCKETS, registry=REGISTRY)
EFFECTIVE_TO_ALERT = Histogram(
    "monitor_effective_to_alert_seconds", "From the observation's effective time to the alert",
    ["severity"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
RECEIPT_TO_ALERT = Histogram(
    "monitor_receipt_to_alert_seconds", "From receipt of the observation by the service to the alert",
    ["severity"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
SINK_ATTEMPTS = Counter(
    "monitor_sink_attempts_total", "Delivery attempts per sink and outcome",
    ["sink", "outcome"], registry=REGISTRY)
SINK_FAILURES = Counter(
    "monitor_sink_failures_total", "Failed delivery attempts per sink",
    ["sink"], registry=REGISTRY)
SINK_PENDING = Gauge(
    "monitor_sink_pending", "Alert versions waiting for delivery per sink",
    ["sink"], registry=REGISTRY)
OPEN_ALERTS_REBUILDS = Counter(
    "monitor_delivery_open_alerts_rebuilds_total", "Outbox partitions taken over whose open alerts (re-pushed to "
    "Alertmanager) were learnt, by source: index (the open-alerts topic), history (the partition read from its "
    "beginning: no valid index) or outbox (no commit yet: the outbox reads it from its beginning anyway)",
    ["source"], registry=REGISTRY)
OPEN_ALERTS_REBUILD_SECONDS = Histogram(
    "monitor_delivery_open_alerts_rebuild_seconds", "Time to learn a taken-over outbox partition's open alerts, by "
    "source", ["source"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
OPEN_ALERTS_INDEX_UNUSABLE = Gauge(
    "monitor_delivery_open_alerts_index_unusable", "1 when this worker has an Alertmanager sink and the open-alerts "
    "index topic is missing or has fewer partitions than the outbox, so it is not used; else 0", registry=REGISTRY)
OPEN_ALERTS_INDEX_WRITE_FAILURES = Counter(
    "monitor_delivery_open_alerts_index_write_failures_total", "Writes of the open-alerts index that failed (the "
    "next owner of the partition then reads its whole history)", registry=REGISTRY)
MLLP_CONNECTIONS = Gauge(
    "monitor_mllp_connections", "Open MLLP connections (this listener)",
    registry=REGISTRY)
MLLP_REFUSED = Counter(
    "monitor_mllp_connections_refused_total",
    "MLLP connections closed at accept: over the connection cap, over the per-peer cap, or not on the allow-list",
    ["reason"], registry=REGISTRY)
MLLP_CLOSED = Counter(
    "monitor_mllp_connections_closed_total",
    "MLLP connections closed by the listener or the peer, by why (eof, idle_timeout, frame_timeout, error)",
    ["reason"], registry=REGISTRY)
MLLP_MESSAGES = Counter(
    "monitor_mllp_messages_total",
    "MLLP frames answered, by acknowledgement code (AA, AE, AR) and message type (ORU^R01, ADT, other, none)",
    ["ack", "type"], registry=REGISTRY)
CLINICAL_RECORDS = Counter(
    "monitor_clinical_records_total", "Records of the patient stream the clinical stage processed, by how they "
    "reached it: own_writes (its own ingest's acknowledged writes, not read back) or fetched (from the broker)",
    ["path"], registry=REGISTRY)
CLINICAL_REPLAYED = Counter(
    "monitor_clinical_replayed_records_total", "Records of the patient stream skipped because the patient's state "
    "already holds them (their offset is at or below the last one applied to it): replays after a crash between a "
    "checkpoint and its commit, or after a rollback; by kind (observation, treatment, action). A count that grows "
    "without crashes or rollbacks means the stream was recreated under a state that outlived it "
    "(README, \"Replays and the patient stream's offsets\")",
    ["kind"], registry=REGISTRY)
CLINICAL_PROCESSOR_CPU = Counter(
    "monitor_clinical_processor_cpu_seconds", "CPU time the clinical processor (engine and lifecycle) took over "
    "the batches of the patient stream, on the worker's event-loop thread; divided by "
    "monitor_clinical_records_total, its CPU per record, whether or not the stage waits for anything",
    registry=REGISTRY)
ROLLBACKS = Counter(
    "monitor_rollbacks", "Times a stage went back to its last durable point and processed its input again, by "
    "stage (ingest, clinical) and reason: write_refused (the broker did not acknowledge a batch's outputs), "
    "changelog_refused (the clinical state's changelog was not acknowledged), state_lost (a patient's state "
    "could not be rebuilt in place after an internal error). Alerts are repeated, never lost; nothing after "
    "the rollback point is committed until it succeeds",
    ["stage", "reason"], registry=REGISTRY)
#: ``monitor_rollbacks_total``'s reasons (ingest has only the first)
WRITE_REFUSED, CHANGELOG_REFUSED, STATE_LOST = "write_refused", "changelog_refused", "state_lost"
COMMIT_FAILURES = Counter(
    "monitor_commit_failures", "Offset commits that failed, by stage (a later commit covers them; a crash or "
    "rebalance meanwhile processes the uncommitted records again)",
    ["stage"], registry=REGISTRY)
CLINICAL_CHECKPOINTS = Counter(
    "monitor_clinical_checkpoints", "Checkpoints of the clinical stage (its changed patients to the changelog, "
    "then its offsets committed), by outcome: written (the changelog acknowledged) or refused",
    ["outcome"], registry=REGISTRY)
CLINICAL_UNCHECKPOINTED = Gauge(
    "monitor_clinical_uncheckpointed_records", "Records the clinical stage processed (outputs acknowledged) "
    "whose patients are not on the changelog yet: what a crash now would process again. Bounded by the "
    "runner's replay cap; above 0 for minutes without a written checkpoint, the changelog is stuck",
    registry=REGISTRY)
CLINICAL_RESTORE_SECONDS = Histogram(
    "monitor_clinical_restore_seconds", "Time to restore partitions' patient state from the changelog, by "
    "cause: assigned (partitions this worker was given) or rollback",
    ["cause"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=REGISTRY)
CLINICAL_PARTITIONS_OWNED = Gauge(
    "monitor_clinical_partitions_owned", "Partitions of the patient stream this worker's clinical stage owns",
    registry=REGISTRY)
CLINICAL_CLOCK_LAST_RUN = Gauge(
    "monitor_clinical_clock_last_run_timestamp_seconds", "Unix time the clinical clock (overdue samples, "
    "escalation, silence expiry) last completed a pass over every patient this worker owns; the worker's "
    "start until the first pass",
    registry=REGISTRY)
CLINICAL_CLOCK_INTERVAL = Gauge(
    "monitor_clinical_clock_interval_seconds", "How often the clinical clock runs (TICK_INTERVAL_SECONDS)",
    registry=REGISTRY)
CLINICAL_CLOCK_FAILURES = Counter(
    "monitor_clinical_clock_failures", "Clinical clock work that failed, by scope: pass (a whole pass raised) or "
    "patient (one patient's overdue samples, escalations and silences could not be judged; the others were)",
    ["scope"], registry=REGISTRY)
LOOP_RESTARTS = Counter(
    "monitor_loop_restarts", "Times one of the worker's loops (ingest or ingest-N, clinical, delivery) stopped "
    "with an error and was started again (the worker log has the error)",
    ["loop"], registry=REGISTRY)
# every series the rules read exists at 0 from the start: Prometheus's increase() does not
# count a counter's first sample, so a series born at 1 would hide the first failure
for _outcome in ("written", "refused"):
    CLINICAL_CHECKPOINTS.labels(outcome=_outcome)
for _stage, _reason in (("ingest", WRITE_REFUSED), ("clinical", WRITE_REFUSED), ("clinical", CHANGELOG_REFUSED),
                        ("clinical", STATE_LOST)):
    ROLLBACKS.labels(stage=_stage, reason=_reason)
for _stage in ("ingest", "clinical"):
    COMMIT_FAILURES.labels(stage=_stage)
for _scope in ("pass", "patient"):
    CLINICAL_CLOCK_FAILURES.labels(scope=_scope)
PATIENTS_OVERDUE = Gauge(
    "monitor_patients_overdue", "Monitored patients with at least one overdue lab (this worker)",
    registry=REGISTRY)
PATIENTS_MONITORED = Gauge(
    "monitor_patients_monitored", "Patients with state on this worker",
    registry=REGISTRY)
CLINICAL_PATIENTS_UNREADABLE = Gauge(
    "monitor_clinical_patients_unreadable", "Patients of this worker's partitions whose stored state (changelog "
    "value) this release cannot read: their records are dead-lettered (patient_state_unreadable), their clock "
    "does not run. Above 0, those patients are not monitored",
    registry=REGISTRY)
CONSUMER_LAG = Gauge(
    "monitor_consumer_lag_messages", "End offset minus committed offset per input partition",
    ["topic", "partition"], registry=REGISTRY)
SOURCE_LAST_EVENT = Gauge(
    "monitor_source_last_event_timestamp_seconds", "Unix time of the last event received from a lab source",
    ["source"], registry=REGISTRY)


class LoopHistogram:
    """A labelled histogram observed from one thread, without locks: the exposition of a
    ``prometheus_client.Histogram`` (``_bucket``, ``_count``, ``_sum``, ``_created``).

    The clinical processor times every record (tens of microseconds each); the library's
    ``Histogram.observe`` takes a lock for the sum and one for the bucket and walks the
    bounds in Python, a tenth of a record's CPU in the throughput benchmark. Here an
    observation is a ``bisect`` and two additions. Every observer runs on the worker's
    event loop thread (ingest's batch timings, the clinical runner and processor), as
    does the ``/metrics`` scrape that reads it: an observation from another thread at
    the same instant could be lost, never corrupt the others."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        self._children: dict[tuple[str, ...], _LoopHistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str, **by_name: str) -> "_LoopHistogramChild":
        key = tuple(str(v) for v in values) if values else tuple(str(by_name[n]) for n in self.labelnames)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _LoopHistogramChild(self.bounds)
        return child

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.documentation, "histogram")]

    def collect(self) -> list[Metric]:
        m = Metric(self.name, self.documentation, "histogram")
        for key, child in list(self._children.items()):
            labels = dict(zip(self.labelnames, key))
            acc = 0
            for le, n in zip(self._le, list(child.counts)):
                acc += n
                m.add_sample(self.name + "_bucket", {**labels, "le": le}, float(acc))
            m.add_sample(self.name + "_count", labels, float(acc))
            m.add_sample(self.name + "_sum", labels, child.sum)
            if _CREATED_SERIES:
                m.add_sample(self.name + "_created", labels, child.created)
        return [m]


class _LoopHistogramChild:
    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # le: the first bound >= amount
        self.sum += amount


def _library_writes_created() -> bool:
    """Whether prometheus_client's own histograms write ``_created`` (it can be switched off)."""
    probe = Histogram("probe_seconds", "probe", registry=None)
    return any(s.name.endswith("_created") for m in probe.collect() for s in m.samples)


_CREATED_SERIES = _library_writes_created()

PROCESSING_SECONDS = LoopHistogram(
    "monitor_processing_seconds", "Time to process one event, by stage",
    ["stage"], buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1),
    registry=REGISTRY)
GC_PAUSE_SECONDS = Histogram(
    "monitor_gc_pause_seconds",
    "Time each collection of Python's cyclic garbage collector held the process, by generation "
    "(a collection holds every stage of the worker)",
    ["generation"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
    registry=REGISTRY)
GC_COLLECTED_OBJECTS = Counter(
    "monitor_gc_collected_objects",
    "Objects Python's cyclic garbage collector found unreachable and freed, by generation: "
    "garbage in reference cycles, which only a collection frees (0 in the steady state of the "
    "clinical stage; a rise means code that builds cycles)",
    ["generation"], registry=REGISTRY)
READY = Gauge("monitor_ready", "1 when the worker's ingest runs and its clinical stage has restored the patient "
              "state of every partition assigned to it", registry=REGISTRY)
BUILD_INFO = Info("monitor_build", "Build version", registry=REGISTRY)
PROTOCOL_INFO = Gauge(
    "monitor_protocol_info", "Protocols loaded (value 1)", ["protocol_id", "version"], registry=REGISTRY)

#: source label cardinality guard: lab source names beyond this many share "other"
MAX_SOURCES = 200
_sources: set[str] = set()
#: configured allow-list (``METRICS_SOURCES``); None: first come, up to MAX_SOURCES
_allowed: frozenset[str] | None = None


def configure_sources(names: str | None) -> None:
    """Keep only these lab source names as label values (review L2: the names are chosen by
    the sender, and FHIR servers often put a per-request id in ``meta.source``)."""
    global _allowed
    listed = frozenset(n.strip() for n in (names or "").split(",") if n.strip())
    _allowed = listed or None


def source_label(source: str) -> str:
    if _allowed is not None:
        return source if source in _allowed else "other"
    if source in _sources:
        return source
    if len(_sources) < MAX_SOURCES:
        _sources.add(source)
        return source
    return "other"


class LabelCache:
    """Metric children cached by label values: ``labels()`` costs more than the increment
    (ingest and the clinical processor count per record). Bounded: cleared when it holds
    ``limit`` children (label values are bounded enums, so it never is in practice)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self._c: dict[tuple, object] = {}

    def get(self, metric, *values):
        k = (id(metric), *values)
        c = self._c.get(k)
        if c is None:
            if len(self._c) >= self.limit:
                self._c.clear()
            c = self._c[k] = metric.labels(*values)
        return c


# ---- the MLLP listener's own families (its scrape shows only these: component_registry)

MLLP_PARSE_ERRORS = Counter(
    "monitor_mllp_parse_errors_total",
    "MLLP messages that could not be decoded (dead-lettered, answered AE), by reason code",
    ["reason"], registry=REGISTRY)
MLLP_MAX_CONNECTIONS = Gauge(
    "monitor_mllp_max_connections", "Connection cap of this MLLP listener (MLLP_MAX_CONNECTIONS)",
    registry=REGISTRY)


class _Only:
    """A collector yielding ``registry``'s families whose names start with ``prefixes``."""

    def __init__(self, registry: CollectorRegistry, prefixes: tuple[str, ...]):
        self.registry, self.prefixes = registry, prefixes

    def collect(self):
        for family in self.registry.collect():
            if family.name.startswith(self.prefixes):
                yield family


def component_registry(*prefixes: str) -> CollectorRegistry:
    """A view of the shared registry for a process that is not a worker (the MLLP listener): only
    its own families, so its scrape carries no worker gauge at zero (``monitor_ready 0`` would
    read as a worker that is not ready)."""
    view = CollectorRegistry(auto_describe=False)
    view.register(_Only(REGISTRY, tuple(prefixes)))
    return view


_gc_started = [0.0]


def _time_collection(phase: str, info: dict) -> None:
    # runs inside the collection, in the thread that triggered it (no collection nests in it)
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        generation = str(info["generation"])
        GC_PAUSE_SECONDS.labels(generation).observe(time.perf_counter() - _gc_started[0])
        if info["collected"]:
            GC_COLLECTED_OBJECTS.labels(generation).inc(info["collected"])


def time_garbage_collections() -> None:
    """Observe every collection's duration in ``monitor_gc_pause_seconds`` and the objects it
    freed in ``monitor_gc_collected_objects_total`` (once per process).

    A full collection walks every object the process holds, the decoded patients included;
    its pause holds every record in the worker, so the tail of the alert latency can be read
    against it."""
    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)
