"""The benchmark: the full service side by side with the bare stack, through the real broker.

One command (``make bench`` after ``make kafka``):

    python bench/run_all.py [--bootstrap 127.0.0.1:9092] [--events 100000] [--rate 2000] [--quick]
                            [--latency-runs N] [--throughput-runs N] [--stages a,c1p,...]

On the SAME pre-published input events (a realistic post-dose cohort from
``monitor.simulate``: ~1000 patients, treatments first, then lab results, liver panels and
vital signs in effective-time order) it measures

  (a) a raw aiokafka consume -> json decode -> produce -> commit loop (bench/raw_aiokafka.py),
  (a2) two such loops in one process, the first writing a keyed intermediate topic that the
      second reads (the shape of the service: ingest -> patient stream -> clinical stage),
  (b) a bare faust passthrough with the service's faust settings (bench/bare_faust.py),
  (c) the full service (``python -m monitor.cli worker``) with one and with two workers:
      observations/s on ``observations`` until all are produced, and the time until the
      clinical stage has consumed them all (its consumer group's lag on ``observations`` = 0),

then the publish -> alert latency of the service at a fixed offered rate (--rate) with
events that each raise or change an alert. It prints one markdown table and the machine.
Every topic and consumer group it creates carries one run prefix and is deleted at the end,
also on failure or Ctrl-C; every process it starts is stopped. See bench/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    INPUT_SHORT,
    ROOT,
    SERVICE_TOPICS,
    TREAT_SHORT,
    Child,
    CpuMeter,
    Kafka,
    build_events,
    cpu_seconds,
    free_port,
    http_ok,
    listening_pids,
    machine,
    percentile,
    proc_tree,
    publish,
)

PY = sys.executable
POLL = 0.1


def log(msg: str) -> None:
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Run:
    """Everything one benchmark run creates, so that ``cleanup`` can remove it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.prefix = f"bench-{stamp}-{uuid.uuid4().hex[:4]}"
        self.tmp_root = self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        #: the round of ``--throughput-runs`` (0: the first): later rounds name their topics,
        #: groups and files apart, so a stage runs again from scratch on the same inputs
        self.round = 0
        self.kafka: Kafka | None = None
        self.children: list[Child] = []
        self.results: dict = {"stages": {}, "errors": {}, "rounds": []}

    def topic(self, *parts: str) -> str:
        return ".".join((self.prefix,) + ((f"r{self.round}",) if self.round else ()) + parts)

    def app_id(self, name: str) -> str:
        return f"{self.prefix}-{name}" + (f"-r{self.round}" if self.round else "")

    def start_round(self, k: int) -> None:
        self.round = k
        self.tmp = self.tmp_root / f"r{k}" if k else self.tmp_root
        self.tmp.mkdir(exist_ok=True)

    def end_round(self) -> None:
        """Delete this (later) round's topics and consumer groups once its stages are done, so
        that the broker holds the inputs, the first round's topics and at most one later
        round's (the first round's stay to the end: they carry the run's prefix alone, as the
        shared inputs do)."""
        if not self.round or self.kafka is None:
            return
        try:
            self.kafka.delete_prefix(f"{self.prefix}.r{self.round}")
            suffix = f"-r{self.round}"
            self.kafka.delete_groups([g for g in self.kafka.list_groups()
                                      if g.startswith(self.prefix) and (g.endswith(suffix) or f"{suffix}-" in g)])
        except Exception as exc:  # the final cleanup deletes them with the rest
            log(f"round {self.round}'s topics not deleted yet: {type(exc).__name__}: {exc}")

    def broker_pids(self) -> list[int]:
        """The broker's process (the one listening on the bootstrap port), for ``CpuMeter``."""
        return listening_pids(int(self.args.bootstrap.rsplit(":", 1)[1]))

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, env, self.tmp / f"{name}.log")
        self.children.append(child)
        return child

    def stop(self, *children: Child) -> None:
        for c in children:
            c.stop()

    def cleanup(self) -> None:
        for c in self.children:
            try:
                c.stop()
            except Exception as exc:
                log(f"stopping {c.name}: {exc}")
        if self.kafka is not None:
            try:
                deleted = self.kafka.delete_prefix(self.prefix)
                groups = [g for g in self.kafka.list_groups() if g.startswith(self.prefix)]
                self.kafka.delete_groups(groups)
                left = self.kafka.list_prefix(self.prefix)
                log(f"cleanup: deleted {len(deleted)} topics and {len(groups)} consumer groups with prefix {self.prefix}"
                    + (f"; STILL PRESENT: {left}" if left else ""))
            except Exception as exc:
                log(f"cleanup failed: {type(exc).__name__}: {exc} -- delete topics '{self.prefix}*' by hand")
            self.kafka.close()
        if self.args.keep_logs:
            log(f"logs kept in {self.tmp_root}")
        else:
            shutil.rmtree(self.tmp_root, ignore_errors=True)


# ------------------------------------------------------------------ measuring helpers
class Progress:
    """Polls a topic's end offsets until ``expected`` records: first/last visible times."""

    def __init__(self, kafka: Kafka, topic: str, expected: int) -> None:
        self.kafka, self.topic, self.expected = kafka, topic, expected
        self.t_first = self.n_first = None
        self.t_done = None
        self.t_last = self.n_last = None

    def poll(self) -> int:
        n = self.kafka.end_total(self.topic)
        now = time.monotonic()
        if n > 0 and self.t_first is None:
            self.t_first, self.n_first = now, n
        if n != self.n_last:
            self.t_last, self.n_last = now, n
        if n >= self.expected and self.t_done is None:
            self.t_done = now
        return n

    @property
    def done(self) -> bool:
        return self.t_done is not None

    def rate(self) -> float | None:
        """records/s between the first poll that saw output and the poll that saw the last of it."""
        if self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            return None
        return (self.n_last - self.n_first) / (self.t_last - self.t_first)


def check_alive(children: list[Child]) -> None:
    for c in children:
        if not c.alive():
            raise RuntimeError(f"{c.name} exited with {c.proc.returncode}:\n{c.tail()}")


def measure_output(run: Run, children: list[Child], topic: str, expected: int, cap: float) -> dict:
    """Wait until ``topic`` holds ``expected`` records or ``cap`` seconds after start."""
    prog = Progress(run.kafka, topic, expected)
    t0 = time.monotonic()
    deadline = t0 + cap
    cpu0 = {c.pid: 0.0 for c in children}
    # the CPU of the window the rate is measured over: first output seen to the last
    meter = CpuMeter({"process": [c.pid for c in children], "broker": run.broker_pids()})
    while time.monotonic() < deadline:
        check_alive(children)
        first = prog.t_first
        prog.poll()
        if first is None and prog.t_first is not None:
            meter.start()
        if prog.done:
            break
        time.sleep(POLL)
    used = meter.stop()["used"] if prog.t_first is not None else None
    return {
        "expected": expected, "produced": prog.n_last or 0, "complete": prog.done, "rate": prog.rate(),
        "cpu_per_event": cpu_per_event(used, (prog.n_last or 0) - (prog.n_first or 0)),
        "startup_s": (prog.t_first - t0) if prog.t_first else None,
        "elapsed_s": (prog.t_last - prog.t_first) if prog.t_first and prog.t_last else None,
        "peak_rss_mb": [round(c.peak_rss_mb(), 1) for c in children],
        "cpu_s": [round(sum(cpu_seconds(p) for p in proc_tree(c.pid)) - cpu0[c.pid], 2) for c in children],
    }


def cpu_per_event(used: dict[str, float] | None, events: int) -> dict[str, float] | None:
    """Microseconds of CPU per event for each metered name (``CpuMeter.stop()["used"]``)
    over the ``events`` the window covered. Where both the workers' trees (``workers``) and
    their own processes (``worker_process``) were metered, the difference is given as
    ``ingest_process``: what their children (the ingest process) used."""
    if not used or events <= 0:
        return None
    us = {name: 1e6 * seconds / events for name, seconds in used.items()}
    if "workers" in us and "worker_process" in us:
        us["ingest_process"] = max(0.0, us["workers"] - us["worker_process"])
    return {k: round(v, 1) for k, v in us.items()}


def wait_ready(children: list[Child], urls: list[str], timeout: float) -> float:
    t0 = time.monotonic()
    pending = list(zip(children, urls))
    while pending and time.monotonic() - t0 < timeout:
        check_alive(children)
        pending = [(c, u) for c, u in pending if not http_ok(u)]
        if pending:
            time.sleep(0.3)
    if pending:
        raise TimeoutError(f"not ready after {timeout:.0f}s: {[c.name for c, _ in pending]}\n{pending[0][0].tail()}")
    return time.monotonic() - t0


BENCH_PSEUDONYM_SECRET = "bench-pseudonym-" + "0123456789abcdef" * 2


def service_env(run: Run, app_id: str, topics: dict[str, str], workdir: Path) -> dict[str, str]:
    env = {var: topics[short] for var, short in SERVICE_TOPICS.items()}
    env.update({
        "KAFKA_BOOTSTRAP_SERVERS": run.args.bootstrap, "MONITOR_APP_ID": app_id,
        "TOPIC_PARTITIONS": str(run.args.partitions), "WEB_HOST": "127.0.0.1", "WEB_PORT": str(free_port()),
        "DATA_DIR": str(workdir), "LOG_LEVEL": "WARNING",
        # no delivery sinks: alerts end on the alerts topic
        "ALERTMANAGER_URL": "", "WEBHOOK_URL": "",
        # the worker refuses to start without its secret (README "Security")
        "PSEUDONYM_SECRET": BENCH_PSEUDONYM_SECRET,
    })
    return env


# ------------------------------------------------------------------ stages
def stage_raw(run: Run, inputs: list[str], n: int, cap: float, hops: int = 1) -> dict:
    """(a): one raw loop; ``hops`` 2 = (a2): two loops in one process through a keyed
    intermediate topic, the shape of the service's ingest -> patient stream -> clinical."""
    name = "raw" if hops == 1 else "raw2"
    out = run.topic(name, "out")
    via = [run.topic(name, "via")] if hops == 2 else []
    run.kafka.create_topics([out, *via], run.args.partitions)
    child = run.start(f"{name}-aiokafka", [PY, str(ROOT / "bench" / "raw_aiokafka.py"), "--bootstrap", run.args.bootstrap,
                                           "--group", run.app_id(name), "--out", out,
                                           *(["--via", via[0]] if via else []), *inputs], {})
    try:
        res = measure_output(run, [child], out, n, cap)
    finally:
        run.stop(child)
    return res


def stage_bare_faust(run: Run, inputs: list[str], n: int, cap: float) -> dict:
    out = run.topic("faust", "out")
    run.kafka.create_topics([out], run.args.partitions)
    env = {"KAFKA_BOOTSTRAP_SERVERS": run.args.bootstrap, "MONITOR_APP_ID": run.app_id("faust"),
           "TOPIC_PARTITIONS": str(run.args.partitions), "WEB_HOST": "127.0.0.1", "WEB_PORT": str(free_port()),
           "DATA_DIR": str(run.tmp / "faust-data"), "BENCH_IN_TOPICS": ",".join(inputs), "BENCH_OUT_TOPIC": out}
    child = run.start("bare-faust", [PY, str(ROOT / "bench" / "bare_faust.py"), "worker", "-l", "warn"], env)
    try:
        res = measure_output(run, [child], out, n, cap)
    finally:
        run.stop(child)
    return res


def stage_service(run: Run, shared: dict[str, str], n: int, expected_obs: int, workers: int, cap: float,
                  routed: int = 0, extra_env: dict[str, str] | None = None, name: str = "") -> dict:
    """``routed``: treatment records ingest routes into the patient stream ``observations``
    besides the observations (counted on the topic, left out of the observation rates);
    ``extra_env``: settings of this stage's workers (e.g. ``INGEST_PROCESSES``)."""
    name = name or f"svc{workers}"
    app_id = run.app_id(name)
    topics = {short: run.topic(name, short) for short in SERVICE_TOPICS.values()}
    topics.update(shared)  # the same pre-published input topics as (a) and (b)
    own = [t for s, t in topics.items() if s not in shared]
    run.kafka.create_topics(own, run.args.partitions, compacted=[topics["alert-deliveries"]])
    children, urls, envs = [], [], []
    for i in range(workers):
        env = {**service_env(run, app_id, topics, run.tmp / f"{name}-w{i}"), **(extra_env or {})}
        children.append(run.start(f"{name}-worker{i}", [PY, "-m", "monitor.cli", "worker"], env))
        urls.append(f"http://127.0.0.1:{env['WEB_PORT']}/readyz")
        envs.append(env)
    obs_topic = topics["observations"]
    t0 = time.monotonic()
    deadline = t0 + cap
    prog = Progress(run.kafka, obs_topic, expected_obs + routed)
    ready_at = None
    t_clin = None
    lag = None
    committed_first = None  # (t, committed) when observations first appeared
    last_commit = (None, 0)
    meter = CpuMeter({"workers": [c.pid for c in children], "broker": run.broker_pids()},
                     alone={"worker_process": [c.pid for c in children]})
    cores = processor = None
    try:
        while time.monotonic() < deadline:
            check_alive(children)
            first = prog.t_first
            prog.poll()
            if first is None and prog.t_first is not None:
                meter.start()  # from the first observation: the cores the pipeline's work used
            if ready_at is None and all(http_ok(u, 0.5) for u in urls):
                ready_at = time.monotonic() - t0
            if prog.t_first is not None:
                lag, committed = run.kafka.group_lag(f"{app_id}-clinical", obs_topic)
                now = time.monotonic()
                if committed_first is None:
                    committed_first = (now, committed)
                if committed != last_commit[1]:
                    last_commit = (now, committed)
                if prog.done and lag == 0:
                    t_clin = now
                    break
            time.sleep(POLL)
        if prog.t_first is not None:
            cores = meter.stop()
        processor = processor_us((0.0, 0.0), workers_processor(envs))
        dead = run.kafka.end_total(topics["dead-letter"])
        alerts = run.kafka.end_total(topics["alerts"])
        findings = run.kafka.end_total(topics["findings"])
        rss = [round(c.peak_rss_mb(), 1) for c in children]
        cpu = [round(sum(cpu_seconds(p) for p in proc_tree(c.pid)), 2) for c in children]
    finally:
        run.stop(*children)
    obs_rate = prog.rate()
    if obs_rate:
        obs_rate *= expected_obs / (expected_obs + routed)
    per_obs = n / expected_obs if expected_obs else 1.0
    clin_rate = None
    clin_note = ""
    if t_clin is not None and prog.t_first is not None:
        clin_rate = expected_obs / (t_clin - prog.t_first)
    elif committed_first and last_commit[0] and last_commit[0] > committed_first[0]:
        clin_rate = (last_commit[1] - committed_first[1]) / (last_commit[0] - committed_first[0])
        clin_note = f"partial: lag {lag} at the cap"
    return {
        "workers": workers, "expected_observations": expected_obs,
        "observations": max(0, (prog.n_last or 0) - routed),
        "complete": prog.done, "clinical_complete": t_clin is not None, "clinical_note": clin_note,
        "obs_rate": obs_rate, "event_rate": obs_rate * per_obs if obs_rate else None,
        "clinical_obs_rate": clin_rate, "clinical_event_rate": clin_rate * per_obs if clin_rate else None,
        "startup_s": (prog.t_first - t0) if prog.t_first else None, "ready_s": ready_at,
        "obs_elapsed_s": (prog.t_last - prog.t_first) if prog.t_first and prog.t_last else None,
        "clinical_elapsed_s": (t_clin - prog.t_first) if t_clin and prog.t_first else None,
        "dead_letters": dead, "findings": findings, "alerts": alerts,
        "peak_rss_mb": rss, "cpu_s": cpu, "cores": cores,
        # from the first observation to the end, over every input event (the treatments
        # routed before them add to the CPU, not to the events)
        "cpu_per_event": cpu_per_event(cores["used"], n) if cores and t_clin is not None else None,
        # the clinical processor's own CPU per record of the patient stream (the workers' metric)
        "processor_us_per_record": processor,
    }


# ------------------------------------------------------------------ latency
ULN = 40.0


def _lat_event(i: int, pid: str, value: float, pub_ns: int, effective_at: datetime) -> bytes:
    return json.dumps({
        "event_id": f"lat-{i}-{pub_ns}", "patient_id": pid, "loinc": "1742-6", "value": value, "unit": "U/L",
        "reference_range": {"low": 0, "high": ULN}, "status": "final", "source": "bench",
        "effective_at": effective_at.isoformat(),
    }, separators=(",", ":")).encode()


class PacedProducer:
    """The latency test's publisher: aiokafka (``acks=all``, ``linger_ms=1``) on an event loop
    of its own in this process, sending a phase's events in ticks of ``TICK`` seconds (all the
    events due by then), each stamped with the time it was handed to the client.

    It replaced kafka-python with a sleep before every event, which on this 2-core machine
    took 0.72 CPU cores at 2,000 events/s (359 us per event, measured with
    ``time.process_time``) away from the worker and the broker it was measuring; this one
    takes 0.16 (79 us per event). The stamp is taken when each event is sent, so an event
    sent up to one tick after its schedule is timed from its send, not from its schedule."""

    TICK = 0.005

    def __init__(self, bootstrap: str, client_id: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.producer = self.loop.run_until_complete(self._start(bootstrap, client_id))
        self.pending: list = []

    @staticmethod
    async def _start(bootstrap: str, client_id: str):
        """Started producer (aiokafka clients are made inside their event loop)."""
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1, client_id=client_id)
        await producer.start()
        return producer

    async def _send_all(self, items) -> None:
        for topic, key, value in items:
            self.pending.append(await self.producer.send(topic, key=key, value=value))

    def send_all(self, items) -> None:
        """Send (topic, key, value) items as fast as the client takes them (no pacing)."""
        self.loop.run_until_complete(self._send_all(items))

    async def _paced(self, total: int, rate: float, make) -> None:
        sleep, send = asyncio.sleep, self.producer.send
        t0 = time.monotonic()
        i = 0
        while i < total:
            due = min(total, int((time.monotonic() - t0) * rate) + 1)
            while i < due:
                topic, key, value = make(i)
                self.pending.append(await send(topic, key=key, value=value))
                i += 1
            if i < total:
                await sleep(max(t0 + i / rate - time.monotonic(), self.TICK))

    def paced(self, total: int, rate: float, make) -> None:
        """Send ``make(i)`` for i in range(total) at ``rate`` per second, in ticks of ``TICK``."""
        self.loop.run_until_complete(self._paced(total, rate, make))

    def flush(self) -> None:
        """Wait for the broker's acknowledgement of everything sent."""
        pending, self.pending = self.pending, []
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending))

    def close(self) -> None:
        try:
            self.flush()
            self.loop.run_until_complete(self.producer.stop())
        finally:
            self.loop.close()


class AlertReader(threading.Thread):
    """Reads the alerts topic; per latency event id, the first alert whose evidence names it.

    The reading runs in a process of its own (``bench/alert_reader.py``, on kcat or aiokafka:
    ``--alert-reader``); this thread only collects its lines. A kafka-python reader thread in
    this process shared the interpreter lock with the publisher and fell behind at 2,000
    alerts/s (see there)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int, observations: str = "",
                 client: str = "kcat") -> None:
        super().__init__(daemon=True)
        import subprocess

        self.proc = subprocess.Popen([PY, str(ROOT / "bench" / "alert_reader.py"), "--client", client, bootstrap,
                                      topic, str(partitions), *([observations] if observations else [])],
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        first = self.proc.stdout.readline()
        if first.strip() != "READY":
            self.proc.kill()
            raise RuntimeError(f"alert reader did not start: {first!r}")
        self.seen: dict[int, tuple[float, float]] = {}  # seq -> (receive latency s, record-timestamp latency s)
        self.ingested: dict[int, float] = {}  # seq -> publish -> observation record timestamp, s
        self.alerts = 0
        self.last_new = time.monotonic()
        self.stopping = threading.Event()

    def run(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("A "):
                self.alerts = int(line[2:])
                continue
            if line.startswith("O "):
                _, seq, ts = line.split()
                self.ingested[int(seq)] = float(ts)
                continue
            seq, recv, ts = line.split()
            self.seen[int(seq)] = (float(recv), float(ts))
            self.last_new = time.monotonic()

    def join(self, timeout: float | None = None) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:
                self.proc.kill()
        super().join(timeout)

    def count(self, lo: int, hi: int) -> int:
        return sum(1 for s in list(self.seen) if lo <= s < hi)


def worker_samples(port: str) -> list:
    """Every sample of a worker's ``/metrics`` (``prometheus_client`` parser); [] if unreadable."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return []
    return [smp for fam in text_string_to_metric_families(text) for smp in fam.samples]


def worker_gc(port: str) -> dict:
    """The worker's garbage-collection figures from its ``/metrics``: per generation, the
    collections, their total and the objects they freed (``monitor_gc_*``); {} if unreadable."""
    out: dict = {}
    for smp in worker_samples(port):
        gen = smp.labels.get("generation")
        key = {"monitor_gc_pause_seconds_count": "n", "monitor_gc_pause_seconds_sum": "s",
               "monitor_gc_collected_objects_total": "freed"}.get(smp.name)
        if gen is not None and key:
            out.setdefault(gen, {"n": 0.0, "s": 0.0, "freed": 0.0})[key] = smp.value
    return out


def workers_clinical_paths(envs: list[dict]) -> dict:
    """Records the workers' clinical stages processed so far, by path (``own_writes``: taken
    from their own ingest's acknowledged writes; ``fetched``: read from the broker)."""
    out = {"own_writes": 0.0, "fetched": 0.0}
    for env in envs:
        for smp in worker_samples(env["WEB_PORT"]):
            if smp.name == "monitor_clinical_records_total" and smp.labels.get("path") in out:
                out[smp.labels["path"]] += smp.value
    return out


def workers_processor(envs: list[dict]) -> tuple[float, float]:
    """The workers' (by their env's ``WEB_PORT``) clinical processor CPU seconds and records
    of the patient stream so far (``monitor_clinical_processor_cpu_seconds_total``,
    ``monitor_clinical_records_total``)."""
    cpu = records = 0.0
    for env in envs:
        for smp in worker_samples(env["WEB_PORT"]):
            if smp.name == "monitor_clinical_processor_cpu_seconds_total":
                cpu += smp.value
            elif smp.name == "monitor_clinical_records_total":
                records += smp.value
    return cpu, records


def processor_us(before: tuple[float, float], after: tuple[float, float]) -> float | None:
    """The clinical processor's CPU per record between two ``workers_processor`` readings, in
    microseconds: what the processor itself costs, apart from anything the stage waits for;
    None without a record in between."""
    records = after[1] - before[1]
    return (after[0] - before[0]) / records * 1e6 if records > 0 else None


def workers_gc(envs: list[dict]) -> dict:
    """``worker_gc`` of every worker (by its env's ``WEB_PORT``), summed per generation."""
    return sum_gc([worker_gc(env["WEB_PORT"]) for env in envs])


def sum_gc(per_worker: list[dict]) -> dict:
    """Several workers' ``worker_gc`` figures summed per generation."""
    out: dict = {}
    for figures in per_worker:
        for gen, v in figures.items():
            acc = out.setdefault(gen, {"n": 0.0, "s": 0.0, "freed": 0.0})
            for k in acc:
                acc[k] += v.get(k, 0.0)
    return out


def worker_evaluated(port: str) -> float:
    """Observations a worker's clinical stage evaluated so far (``monitor_processing_seconds_count``
    of stage ``evaluate``; 0 if unreadable): above 0 once it holds partitions of the patient stream
    that had input (``monitor_patients_monitored`` waits for the clock)."""
    return next((smp.value for smp in worker_samples(port)
                 if smp.name == "monitor_processing_seconds_count" and smp.labels.get("stage") == "evaluate"), 0.0)


def gc_during(before: dict, after: dict) -> dict:
    """Per generation: collections, milliseconds paused and objects freed between two scrapes."""
    return {g: {"n": int(v["n"] - before.get(g, {}).get("n", 0)),
                "ms": round((v["s"] - before.get(g, {}).get("s", 0)) * 1000, 1),
                "freed": int(v["freed"] - before.get(g, {}).get("freed", 0))} for g, v in sorted(after.items())}


def gc_text(gcs: dict | None) -> str:
    if not gcs:
        return "—"
    return "; ".join(f"gen{g}: {v['n']} ({v['ms']:,.0f} ms, {v['freed']:,} freed)" for g, v in gcs.items() if v["n"])


def stage_latency(run: Run, phases: list[tuple[float, float]], patients: int, warmup: float, drain: float,
                  name: str = "lat") -> dict:
    """One worker; doses, a warm-up ALT per patient, then per (rate, seconds) phase: ALT events at
    that rate, each of which changes the patient's ALT alert; then wait for their alerts.
    ``name``: of its app id, topics and log (one per run when the stage is repeated)."""
    app_id = run.app_id(name)
    topics = {short: run.topic(name, short) for short in SERVICE_TOPICS.values()}
    run.kafka.create_topics(list(topics.values()), run.args.partitions, compacted=[topics["alert-deliveries"]])
    workers = max(1, run.args.latency_workers)
    envs = [service_env(run, app_id, topics, run.tmp / f"{name}-w{i}") for i in range(workers)]
    label = "latency-worker" if name == "lat" else f"latency-worker-{name}"
    children = [run.start(label if workers == 1 else f"{label}-{i}", [PY, "-m", "monitor.cli", "worker"], env)
                for i, env in enumerate(envs)]
    reader = None
    producer = PacedProducer(run.args.bootstrap, client_id="bench-lat")
    out: dict = {"patients": patients, "workers": workers, "alert_reader": run.args.alert_reader, "phases": []}
    try:
        out["ready_s"] = wait_ready(children, [f"http://127.0.0.1:{env['WEB_PORT']}/readyz"
                                               for env in envs], 120)
        reader = AlertReader(run.args.bootstrap, topics["alerts"], run.args.partitions, topics["observations"],
                             client=run.args.alert_reader)
        reader.start()
        now = datetime.now(timezone.utc)
        pids = [f"LAT-{i:04d}" for i in range(patients)]
        # the dose first: IV product, ~10 months old, dosed 10 days ago
        producer.send_all((topics[TREAT_SHORT], pid.encode(), json.dumps({
            "type": "dose", "event_id": f"{pid}-dose", "patient_id": pid,
            "product": "onasemnogene-abeparvovec-iv", "administered_at": (now - timedelta(days=10)).isoformat(),
            "birth_date": (now - timedelta(days=300)).date().isoformat(), "weight_kg": 8.2,
            "ward": "paediatric-neurology", "care_team": "sma-gene-therapy", "source": "bench"}).encode())
            for pid in pids)
        producer.flush()
        time.sleep(0.5)
        # ALT per patient alternates grade 2 (4x ULN) and grade 3 (8x ULN): every event changes the
        # patient's ALT alert (new evidence; severity raised or lowered) -> one alert version per event
        grade3 = dict.fromkeys(pids, False)

        # each patient's results one second apart from the day after the dose: the engine keeps
        # times in whole seconds and orders results of one second by observation id, so with
        # the publish time as effective time (two events per patient per second at 2,000/s)
        # ~1.6 % of the events were judged older than their predecessor and changed no alert
        t_first = now - timedelta(days=9)
        n_sent = dict.fromkeys(pids, 0)

        def event(seq: int, pid: str) -> tuple[str, bytes, bytes]:
            grade3[pid] = not grade3[pid]
            n_sent[pid] += 1
            value = (8 if grade3[pid] else 4) * ULN
            return topics["lab-results"], pid.encode(), _lat_event(seq, pid, value, time.time_ns(),
                                                                   t_first + timedelta(seconds=n_sent[pid]))

        seq = 10_000_000  # warm-up ids: not counted
        producer.send_all(event(seq + i, pid) for i, pid in enumerate(pids))
        producer.flush()
        t_w = time.monotonic()
        while reader.count(seq, seq + patients) < patients * 0.95 and time.monotonic() - t_w < warmup:
            check_alive(children)
            time.sleep(0.2)
        out["warmup_alerts"] = f"{reader.count(seq, seq + patients)}/{patients}"
        if workers > 1:  # every worker evaluates its share of the partitions before the phases
            held = [worker_evaluated(env["WEB_PORT"]) for env in envs]
            while not all(held) and time.monotonic() - t_w < warmup:
                check_alive(children)
                time.sleep(0.2)
                held = [worker_evaluated(env["WEB_PORT"]) for env in envs]
            out["warmup_per_worker"] = held
        base = 0
        meter = CpuMeter({"worker": [c.pid for c in children], "broker": run.broker_pids(), "alert_reader": [reader.proc.pid]},
                         alone={"publisher": [os.getpid()]})
        for rate, seconds in phases:
            total = int(rate * seconds)
            gc0 = workers_gc(envs)
            paths0 = workers_clinical_paths(envs)
            proc0 = workers_processor(envs)
            meter.start()
            t0 = time.monotonic()
            producer.paced(total, rate, lambda i: event(base + i, pids[i % patients]))
            producer.flush()
            pub_s = time.monotonic() - t0
            cpu = meter.stop()  # while publishing: the offered load's steady state
            t_d = time.monotonic()
            while reader.count(base, base + total) < total and time.monotonic() - t_d < drain:
                check_alive(children)
                if time.monotonic() - reader.last_new > 8 and time.monotonic() - t_d > 8:
                    break
                time.sleep(0.1)
            waited = time.monotonic() - t0
            gcs = gc_during(gc0, workers_gc(envs))  # from publishing to the last alert
            paths = {k: int(v - paths0[k]) for k, v in workers_clinical_paths(envs).items()}
            proc_us = processor_us(proc0, workers_processor(envs))
            seen = [v for s, v in list(reader.seen.items()) if base <= s < base + total]
            # an event whose alert was not seen by the end counts as slower than every seen one (censored)
            lat = sorted(v[0] for v in seen) + [float("inf")] * (total - len(seen))
            lat_ts = sorted(v[1] for v in seen) + [float("inf")] * (total - len(seen))
            seen_sorted = sorted(v[0] for v in seen)
            if run.args.latency_timeline:  # every event of the phase in publish order: (seq, latency ms)
                with open(run.args.latency_timeline, "a") as tl:
                    tl.write(json.dumps({"stage": name, "rate": rate, "events": [
                        [s - base, round(v[0] * 1000, 1)] for s, v in sorted(reader.seen.items())
                        if base <= s < base + total]}) + "\n")
            ingested = sorted(v for s, v in list(reader.ingested.items()) if base <= s < base + total)
            pct = lambda xs, q: round(percentile(xs, q) * 1000, 1) if xs else None  # noqa: E731
            out["phases"].append({
                "offered_rate": rate, "seconds": seconds, "published": total, "publish_s": round(pub_s, 2),
                "achieved_rate": total / pub_s, "matched": len(seen), "waited_s": round(waited, 1),
                "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99), "max_ms": pct(lat, 100),
                "ts_p50_ms": pct(lat_ts, 50), "ts_p99_ms": pct(lat_ts, 99),
                "seen_p50_ms": pct(seen_sorted, 50), "seen_p99_ms": pct(seen_sorted, 99),
                "ingest_p50_ms": pct(ingested, 50), "ingest_p99_ms": pct(ingested, 99),
                "alert_rate": len(seen) / waited if waited else None,
                "cpu_cores": cpu, "gc": gcs, "clinical_records": paths, "processor_us_per_record": proc_us,
            })
            base += total
        out["peak_rss_mb"] = [round(c.peak_rss_mb(), 1) for c in children]
        out["dead_letters"] = run.kafka.end_total(topics["dead-letter"])
        out["alerts_read"] = reader.alerts
    finally:
        if reader is not None:
            reader.stopping.set()
            reader.join(5)
        producer.close()
        for c in children:
            run.stop(c)
    return out


# ------------------------------------------------------------------ report
def fmt(x, nd=0, unit=""):
    if x is None:
        return "—"
    if x == float("inf"):
        return "not seen"
    if isinstance(x, float):
        return f"{x:,.{nd}f}{unit}"
    return f"{x:,}{unit}"


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "—"


def repeated_latency(run: Run, phases: list[tuple[float, float]], patients: int, warmup: float, drain: float,
                     runs: int) -> dict:
    """``stage_latency`` ``runs`` times (a fresh worker and topics each): the first run's
    result, with ``runs``: every run's phase at the main rate (None for a run that failed)."""
    first = stage_latency(run, phases, patients, warmup, drain)
    if runs <= 1:
        return first
    rate = phases[-1][0]
    main = lambda res: next((ph for ph in res["phases"] if ph["offered_rate"] == rate), None)  # noqa: E731
    every = [main(first)]
    for i in range(1, runs):
        log(f"latency run {i + 1} of {runs} ...")
        try:
            every.append(main(stage_latency(run, phases, patients, warmup, drain, name=f"lat{i + 1}")))
        except Exception as exc:  # one failed run is reported, the others still count
            log(f"latency run {i + 1} FAILED: {type(exc).__name__}: {exc}")
            every.append(None)
    first["runs"] = every
    return first


def latency_phases(low_rate: float, rate: float, seconds: float, sweep: str = "") -> list[tuple[float, float]]:
    """The latency stage's phases: the low rate (10 s; none if 0), then --rate, or the rates
    of --latency-sweep in rising order (each once, each ``seconds`` long)."""
    rates = sorted({float(x) for x in sweep.replace(" ", "").split(",") if x}) if sweep else [rate]
    if any(r <= 0 for r in rates):
        raise SystemExit("--latency-sweep: every rate must be above 0")
    return ([(low_rate, 10.0)] if low_rate else []) + [(r, seconds) for r in rates if r != low_rate]


#: the tail target of issue 13: p99 publish -> alert within this many milliseconds
P99_TARGET_MS = 100.0


def sweep_lines(phases: list[dict], raw_rate: float | None, target_ms: float = P99_TARGET_MS) -> list[str]:
    """With more than one loaded phase: the highest offered rate whose every event was seen
    with p99 within ``target_ms``, and that rate as a share of (a)'s events/s in the same run."""
    loaded = sorted((ph for ph in phases if ph.get("offered_rate")), key=lambda ph: ph["offered_rate"])
    if len(loaded) < 2:
        return []
    within = [ph for ph in loaded if ph["matched"] >= ph["published"] and ph.get("p99_ms") is not None
              and ph["p99_ms"] <= target_ms]
    tried = ", ".join(f"{fmt(ph['offered_rate'])}/s: {fmt(ph.get('p99_ms'), 1)} ms" for ph in loaded)
    if not within:
        return ["", f"Latency capacity: p99 above {target_ms:g} ms at every rate tried (p99 {tried})."]
    best = within[-1]
    share = (f"; {best['offered_rate'] / raw_rate * 100:.1f} % of (a)'s {fmt(raw_rate)} events/s in this run"
             if raw_rate else "")
    note = ""
    if any(ph not in within for ph in loaded if ph["offered_rate"] < best["offered_rate"]):
        note = " (not monotonic: a lower rate missed the target; the tail moves from phase to phase)"
    return ["", f"Latency capacity: p99 <= {target_ms:g} ms up to {fmt(best['offered_rate'])}/s of the rates tried"
                f"{share}{note} (p99 {tried})."]


def latency_runs_lines(lat: dict, rate: float) -> list[str]:
    """Every run at the main rate, with the median p99 and how many met the 100 ms target."""
    runs = lat.get("runs") or []
    done = [ph for ph in runs if ph is not None]
    if not done:
        return []
    p99 = [ph["p99_ms"] if ph["p99_ms"] is not None else float("inf") for ph in done]
    median = statistics.median(p99)
    met = sum(1 for x in p99 if x <= P99_TARGET_MS)
    out = ["", f"Every run at {fmt(rate)}/s ({len(runs)} runs, each with a fresh worker and topics; "
               f"{len(runs) - len(done)} failed): p99 <= {P99_TARGET_MS:g} ms in {met} of {len(done)}, median p99 {fmt(median, 1)} ms.",
           "", "| run | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) | alerts seen | worker cores | whole machine "
               "| clinical processor, us per record | worker's garbage collections (paused, freed) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for i, ph in enumerate(runs, 1):
        if ph is None:
            out.append(f"| {i} | failed | | | | | | | | |")
            continue
        c = ph.get("cpu_cores") or {}
        out.append(f"| {i} | {fmt(ph['p50_ms'], 1)} | {fmt(ph['p95_ms'], 1)} | {fmt(ph['p99_ms'], 1)} "
                   f"| {fmt(ph['max_ms'], 1)} | {ph['matched']:,} of {ph['published']:,} | {fmt(c.get('worker'), 2)} "
                   f"| {fmt(c.get('machine'), 2)} | {fmt(ph.get('processor_us_per_record'), 1)} | {gc_text(ph.get('gc'))} |")
    return out


def report(run: Run, meta: dict) -> str:
    st = run.results["stages"]
    errs = run.results["errors"]
    a = (st.get("a") or {}).get("rate")
    b = (st.get("b") or {}).get("rate")
    lines = []
    lines.append(f"## Benchmark {meta['started']} ({meta['command']})")
    lines.append("")
    lines.append(f"Input ({meta['generator']}): {meta['events']:,} events ({meta['by_topic']}) for {meta['patients']} patients, "
                 f"preceded by {meta['treatments']:,} treatment events; the service's decoder makes "
                 f"{meta['expected_obs']:,} observations of them. {run.args.partitions} partitions per topic, "
                 f"broker {run.args.bootstrap}.")
    lines.append("")
    lines.append("| what | events/s | observations/s | c/a | c/b | time (s) | peak RSS (MiB) | CPU (s) | notes |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")

    def row(label, r, key_ev, key_obs, el, rss, cpu, note, cmp=True):
        ev = r.get(key_ev) if r else None
        ob = r.get(key_obs) if (r and key_obs) else None
        lines.append(f"| {label} | {fmt(ev)} | {fmt(ob)} | {ratio(ev, a) if cmp else ''} | {ratio(ev, b) if cmp else ''} "
                     f"| {fmt(el, 1)} | {' + '.join(fmt(x, 0) for x in rss) if rss else '—'} "
                     f"| {' + '.join(fmt(x, 1) for x in cpu) if cpu else '—'} | {note} |")

    for key, label in (("a", "(a) raw aiokafka loop"), ("a2", "(a2) two raw loops in one process, through a keyed topic"),
                       ("b", "(b) bare faust passthrough")):
        r = st.get(key)
        if r:
            note = "" if r["complete"] else f"partial: {r['produced']:,}/{r['expected']:,} at the cap"
            if key == "a2" and a and r.get("rate"):
                note = (note + "; " if note else "") + f"{r['rate'] / a:.2f}x (a): the ceiling of two hops, no work"
            row(label, r, "rate", None, r["elapsed_s"], r["peak_rss_mb"], r["cpu_s"], note, cmp=False)
        elif key in errs:  # a stage not selected (--stages) has no row
            lines.append(f"| {label} | failed | | | | | | | {errs.get(key, '')[:80]} |")
    for key, w in (("c1", 1), ("c1p", 1), ("c2", 2)):
        r = st.get(key)
        label = f"(c) service, {w} worker{'s' if w > 1 else ''}"
        if key == "c1p":
            label += " with an ingest process (`INGEST_PROCESSES=1`)"
        if not r and key not in errs:
            continue  # not selected (--stages)
        if not r:
            lines.append(f"| {label} | failed | | | | | | | {errs.get(key, '')[:80]} |")
            continue
        note = "ingest: until all observations are on `observations`"
        if not r["complete"]:
            note = f"partial: {r['observations']:,}/{r['expected_observations']:,} observations at the cap"
        extra = r["observations"] - r["expected_observations"]
        if extra > 0:
            note += (f"; {extra:,} observations more than expected (inputs processed again after a rebalance: "
                     "at-least-once), counted in the rate")
        if w > 1 and r.get("event_rate"):
            note += f"; {r['event_rate'] / w:,.0f} events/s per worker"
        row(f"{label}: ingest", r, "event_rate", "obs_rate", r["obs_elapsed_s"], r["peak_rss_mb"], r["cpu_s"], note)
        cnote = ("pipeline: until the clinical stage's group lag on `observations` is 0 (it commits at each "
                 "changelog checkpoint and when its input goes quiet); "
                 f"{r['findings']:,} findings, {r['alerts']:,} alert versions"
                 + (f", {r['dead_letters']:,} dead letters" if r["dead_letters"] else ""))
        c = r.get("cores")
        if c:
            cnote += (f"; cores in use from the first observation to the end: worker{'s' if w > 1 else ''} "
                      f"{c['workers']:.2f}, broker {c['broker']:.2f}, whole machine {c['machine']:.2f} of {c['cores']}")
        if r["clinical_note"]:
            cnote = r["clinical_note"] + "; " + cnote
        row(f"{label}: ingest → evaluate → lifecycle", r, "clinical_event_rate", "clinical_obs_rate",
            r["clinical_elapsed_s"], None, None, cnote)
    lines.extend(rounds_lines(run.results.get("rounds") or []))
    lines.extend(cpu_lines(run.results.get("rounds") or []))
    lat = st.get("lat")
    lines.append("")
    main_phase = None
    if lat and lat["phases"]:
        nw = lat.get("workers", 1)
        lines.append(f"Latency, publish → alert on `alerts` (service, {nw} worker{'s' if nw > 1 else ''}"
                     + (f" on {run.args.partitions} partitions, warm-up results evaluated per worker "
                        f"{' / '.join(fmt(int(x)) for x in lat.get('warmup_per_worker') or [])}" if nw > 1 else "")
                     + "): lab results whose ALT alternates "
                     f"CTCAE grade 2 / 3 for {lat['patients']} dosed patients, so that every event changes an alert "
                     f"(warm-up alerts {lat['warmup_alerts']}):")
        lines.append("")
        lines.append("| offered rate | achieved | events | alerts seen | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) "
                     "| p50 / p99 by alert record time (ms) | p50 / p99 of alerts seen (ms) "
                     "| of which ingest, p50 / p99 (ms) | peak RSS (MiB) |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for ph in lat["phases"]:
            if ph["offered_rate"] == run.args.rate:
                main_phase = ph
            lines.append(
                f"| {fmt(ph['offered_rate'])}/s for {ph['seconds']:g} s | {fmt(ph['achieved_rate'])}/s "
                f"| {ph['published']:,} | {ph['matched']:,} | {fmt(ph['p50_ms'], 1)} | {fmt(ph['p95_ms'], 1)} "
                f"| {fmt(ph['p99_ms'], 1)} | {fmt(ph['max_ms'], 1)} | {fmt(ph['ts_p50_ms'], 1)} / {fmt(ph['ts_p99_ms'], 1)} "
                f"| {fmt(ph['seen_p50_ms'], 1)} / {fmt(ph['seen_p99_ms'], 1)} "
                f"| {fmt(ph.get('ingest_p50_ms'), 1)} / {fmt(ph.get('ingest_p99_ms'), 1)} | {' + '.join(fmt(x, 0) for x in lat['peak_rss_mb'])} |")
        lines.append("")
        lines.append("Cores in use while each phase published (CPU seconds per second; the machine has "
                     f"{lat['phases'][0].get('cpu_cores', {}).get('cores', '?')}; the publisher on aiokafka, the "
                     f"alert reader on {lat.get('alert_reader', 'aiokafka')}):")
        lines.append("")
        lines.append("| offered rate | worker | broker | publisher | alert reader | anything else | whole machine "
                     "| clinical processor, us per record | worker's garbage collections, phase to last alert "
                     "(paused, freed) |")
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for ph in lat["phases"]:
            c = ph.get("cpu_cores") or {}
            named = ("worker", "broker", "publisher", "alert_reader")
            other = round(c["machine"] - sum(c[k] for k in named), 2) if c and all(k in c for k in named) else None
            lines.append(f"| {fmt(ph['offered_rate'])}/s | {fmt(c.get('worker'), 2)} | {fmt(c.get('broker'), 2)} "
                         f"| {fmt(c.get('publisher'), 2)} | {fmt(c.get('alert_reader'), 2)} | {fmt(other, 2)} "
                         f"| {fmt(c.get('machine'), 2)} | {fmt(ph.get('processor_us_per_record'), 1)} "
                         f"| {gc_text(ph.get('gc'))} |")
        for ph in lat["phases"]:
            if ph["matched"] < ph["published"]:
                lines.append("")
                lines.append(f"At {fmt(ph['offered_rate'])}/s, {ph['published'] - ph['matched']:,} events had no alert on "
                             f"`alerts` {ph['waited_s']:.0f} s after their phase began (the service turned "
                             f"{fmt(ph['alert_rate'])} events/s into alerts); they count as slower than every alert "
                             "seen (\"not seen\"), so the percentiles over all events can be \"not seen\".")
        lines.extend(sweep_lines(lat["phases"], a))
        lines.extend(latency_runs_lines(lat, run.args.rate))
    elif "lat" in errs:  # a latency stage not selected (--stages) has no line
        lines.append(f"Latency: failed: {errs['lat'][:200]}")
    lines.append("")
    c1 = st.get("c1") or {}
    c1p = st.get("c1p") or {}
    with_process = (f" (with an ingest process: {fmt(c1p.get('clinical_obs_rate'))}, "
                    f"{ratio(c1p.get('clinical_event_rate'), a)})" if c1p else "")
    lines.append("Targets (issue 13), service with 1 worker: "
                 f">= 20,000 observations/s per worker: {fmt(c1.get('obs_rate'))} ingest, "
                 f"{fmt(c1.get('clinical_obs_rate'))} through evaluate + lifecycle; "
                 f">= 0.5x of (a): {ratio(c1.get('event_rate'), a)} ingest, "
                 f"{ratio(c1.get('clinical_event_rate'), a)} through evaluate + lifecycle{with_process}; "
                 f"p99 <= 100 ms at 2,000 events/s"
                 + (f" ({lat.get('workers', 1)} workers)" if lat and lat.get("workers", 1) > 1 else "")
                 + f": {fmt(main_phase.get('p99_ms'), 1) if main_phase else '—'} ms"
                 + (f" (first run; every run: {', '.join(fmt(ph['p99_ms'], 1) if ph else 'failed' for ph in lat['runs'])} ms)"
                    if lat and lat.get("runs") else ""))
    lines.append("")
    m = meta["machine"]
    lines.append(f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram']} RAM, Linux {m['kernel']}; Python {m['python']}, "
                 f"faust-streaming {m['faust-streaming']}, aiokafka {m['aiokafka']}, kafka-python {m['kafka-python']}, "
                 f"Apache Kafka {m['kafka broker']} (single local broker); clinical core: {m.get('clinical core', '?')}. "
                 f"Total run time {meta['total_s']:.0f} s.")
    return "\n".join(lines)


# ------------------------------------------------------------------ main
#: the stages ``--throughput-runs`` repeats, and the rate each is compared by
THROUGHPUT_STAGES = {"a": "rate", "a2": "rate", "b": "rate", "c1": "clinical_event_rate",
                     "c1p": "clinical_event_rate", "c2": "clinical_event_rate"}


def run_stage(run: Run, key: str, label: str, fn, first: bool) -> dict | None:
    """One stage; its result (None if it failed). ``first``: the result of the main table."""
    t = time.monotonic()
    log(f"{label} ...")
    try:
        res = fn()
    except Exception as exc:
        if first:
            run.results["errors"][key] = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
        log(f"{label} FAILED: {type(exc).__name__}: {exc}")
        traceback.print_exc(file=sys.stderr)
        return None
    if first:
        run.results["stages"][key] = res
    short = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in res.items()}
    log(f"{label}: {short} ({time.monotonic() - t:.0f}s)")
    return res


#: the throughput stages' names in the per-round tables
STAGE_LABELS = {"a": "(a)", "a2": "(a2)", "b": "(b)", "c1": "(c) 1 worker", "c1p": "(c) 1 worker + ingest process",
                "c2": "(c) 2 workers"}


def _rate_vs(rate: float | None, a: float | None) -> str:
    """``rate`` events/s, with its ratio to (a)'s ``a`` when both are known."""
    return fmt(rate) + (f" ({rate / a:.2f}x)" if rate is not None and a else "")


def rounds_lines(rounds: list[dict]) -> list[str]:
    """Every throughput round: each stage's events/s and ratio to that round's (a), with medians."""
    if len(rounds) < 2:
        return []
    keys = [k for k in THROUGHPUT_STAGES if any(k in r for r in rounds)]
    out = ["", f"Every throughput round ({len(rounds)}, each from scratch on the same inputs, every second one in "
               "reverse order; events/s, through evaluate + lifecycle for (c), and the ratio to the same round's (a)):",
           "", "| round | " + " | ".join(STAGE_LABELS[k] for k in keys) + " |", "|---:|" + "---:|" * len(keys)]
    per_key: dict[str, list] = {k: [] for k in keys}
    per_ratio: dict[str, list] = {k: [] for k in keys}
    for i, r in enumerate(rounds, 1):
        a = (r.get("a") or {}).get("rate")
        cells = []
        for k in keys:
            v = (r.get(k) or {}).get(THROUGHPUT_STAGES[k])
            if v is None:
                cells.append("failed" if k in r else "")
                continue
            per_key[k].append(v)
            if k != "a" and a:
                per_ratio[k].append(v / a)
            cells.append(_rate_vs(v, a if k != "a" else None))
        out.append(f"| {i} | " + " | ".join(cells) + " |")
    med = []
    for k in keys:
        if not per_key[k]:
            med.append("")
            continue
        m = fmt(statistics.median(per_key[k]))
        if per_ratio[k]:
            m += f" ({statistics.median(per_ratio[k]):.2f}x; {min(per_ratio[k]):.2f}-{max(per_ratio[k]):.2f}x)"
        med.append(m)
    out.append("| median | " + " | ".join(med) + " |")
    return out


#: the stages whose CPU per event is reported, the rate each is measured by, and the key of
#: the one process that does the stage's serial work (None: more than one)
CPU_STAGES = (("a", "rate", "process"), ("a2", "rate", "process"), ("b", "rate", "process"),
              ("c1", "clinical_event_rate", "worker_process"), ("c1p", "clinical_event_rate", "worker_process"),
              ("c2", "clinical_event_rate", None))


def cpu_lines(rounds: list[dict], cores: int | None = None) -> list[str]:
    """CPU per event of every stage in every round, split by process, with the rate one core
    allows the process that does the stage's serial work and the rate the machine's cores
    allow all of the stage's processes with the broker, each against that round's (a)."""
    cores = cores or os.cpu_count() or 1
    rows = []
    for i, r in enumerate(rounds, 1):
        a = (r.get("a") or {}).get("rate")
        for key, rate_key, serial in CPU_STAGES:
            res = r.get(key) or {}
            us = res.get("cpu_per_event")
            if not us:
                continue
            own = us.get("process", us.get("workers"))
            total = own + us.get("broker", 0.0)
            one = us.get(serial) if serial else None
            rate = res.get(rate_key)
            rows.append(f"| {i} | {STAGE_LABELS[key]} | {_rate_vs(rate, a if key != 'a' else None)} | {fmt(own, 1)} "
                        f"| {fmt(us.get('worker_process'), 1) if key.startswith('c') else '—'} "
                        f"| {fmt(us.get('ingest_process'), 1) if key == 'c1p' else '—'} | {fmt(us.get('broker'), 1)} "
                        f"| {fmt(total, 1)} | {_rate_vs(1e6 / one, a) if one else '—'} "
                        f"| {_rate_vs(cores * 1e6 / total, a) if total else '—'} "
                        f"| {fmt(res.get('processor_us_per_record'), 1)} |")
    if not rows:
        return []
    return ["", "CPU per event (user + system, in microseconds, over each stage's measured window: (a) from its first "
                "output to its last, (c) from the first observation to the clinical stage's lag 0, over every input "
                "event), and the rates it allows: one core for the process that does the stage's serial work (the "
                f"loop; the worker's own process, where the clinical stage runs), and the machine's {cores} cores for "
                "all of the stage's processes and the broker, each against the same round's (a); and the clinical "
                "processor's own CPU per record of the patient stream (the workers' "
                "`monitor_clinical_processor_cpu_seconds_total`: the processor alone, whatever the stage waits for):",
            "",
            "| round | stage | events/s | stage's processes | worker's own process | ingest process | broker | all "
            "| one core for the serial process | all cores | clinical processor, per record |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Benchmark the service against a raw aiokafka loop and bare faust.")
    ap.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    ap.add_argument("--events", type=int, default=None, help="input events (default 100,000; --quick 20,000)")
    ap.add_argument("--rate", type=float, default=2000.0, help="offered rate of the latency test, events/s")
    ap.add_argument("--quick", action="store_true", help="smaller run, under ~2 minutes")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--latency-seconds", type=float, default=None, help="default 20 (--quick 8)")
    ap.add_argument("--latency-patients", type=int, default=1000)
    ap.add_argument("--latency-workers", type=int, default=1,
                    help="workers of the latency stage (default 1; more share the partitions, as two workers "
                         "of one deployment do; the report says how many)")
    ap.add_argument("--low-rate", type=float, default=None,
                    help="an unloaded latency point measured before --rate (default 200 events/s for 10 s; "
                         "--quick: none; 0 = none)")
    ap.add_argument("--latency-sweep", default="",
                    help="comma-separated offered rates (events/s), each a phase of --latency-seconds after the "
                         "low rate, in rising order, each drained before the next: the report adds the highest "
                         "rate whose p99 stays within 100 ms, and its share of (a)'s rate when (a) ran (how much "
                         "of the host's raw Kafka speed the service can take at that tail; a host's speed moves, "
                         "that share less). --rate stays the main rate of the target line")
    ap.add_argument("--latency-runs", type=int, default=1,
                    help="run the latency stage this many times, each with a fresh worker and topics, and report "
                         "every run's percentiles at --rate and their median (the tail varies from run to run)")
    ap.add_argument("--throughput-runs", type=int, default=1,
                    help="run the selected throughput stages (a, a2, b, c1, c1p, c2) this many rounds, each from "
                         "scratch on the same inputs (every second round in reverse order), and report every round's "
                         "rates and ratios to the same round's (a) with their medians (a shared host's speed changes "
                         "from minute to minute); the main table shows the first round")
    ap.add_argument("--alert-reader", choices=("kcat", "aiokafka"), default="kcat",
                    help="the Kafka client of the latency test's alert reader: kcat (librdkafka; default; `make "
                         "bench` installs it) takes a fraction of aiokafka's CPU from the machine the service is "
                         "measured on; aiokafka is the reader of the passes before (bench/kcat_clients.py)")
    ap.add_argument("--json", default="", help="also write the results as JSON to this file")
    ap.add_argument("--latency-timeline", default="",
                    help="append each latency phase's events (publish order, latency in ms) to this file as JSON lines")
    ap.add_argument("--keep-logs", action="store_true", help="keep worker logs (printed path)")
    ap.add_argument("--stages", default="a,a2,b,c1,c1p,c2,lat",
                    help="which stages to run (comma-separated of a, a2, b, c1, c1p, c2, lat; default all; c1p is "
                         "c1 with INGEST_PROCESSES=1); "
                         "a partial run is for A/B comparisons, not for the README table")
    args = ap.parse_args(argv)
    quick = args.quick
    args.events = args.events or (20_000 if quick else 100_000)
    args.latency_seconds = args.latency_seconds or (8.0 if quick else 20.0)
    # per-stage caps (seconds from process start): the run stays within ~2 / ~8 minutes
    caps = ({"a": 20, "a2": 30, "b": 25, "c1": 30, "c2": 30, "warmup": 20, "drain": 10} if quick
            else {"a": 60, "a2": 80, "b": 80, "c1": 150, "c2": 120, "warmup": 60, "drain": 30})

    if args.low_rate is None:
        args.low_rate = 0.0 if quick else 200.0
    phases = latency_phases(args.low_rate, args.rate, args.latency_seconds, args.latency_sweep)
    run = Run(args)

    def _term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)
    t_start = time.monotonic()
    started = datetime.now().astimezone()
    meta = {"started": started.strftime("%Y-%m-%d %H:%M %Z"),
            "command": "python bench/run_all.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine()}
    log(f"run prefix {run.prefix}; broker {args.bootstrap}")
    rc = 0
    try:
        run.kafka = Kafka(args.bootstrap)
        t = time.monotonic()
        ev = build_events(args.events)
        meta.update(events=len(ev.inputs), patients=ev.patients, treatments=len(ev.treatments), generator=ev.generator,
                    expected_obs=ev.expected_observations,
                    by_topic=", ".join(f"{k} {v:,}" for k, v in ev.by_topic.items() if k != TREAT_SHORT))
        log(f"generated {len(ev.inputs):,} input events + {len(ev.treatments):,} treatments for {ev.patients} "
            f"patients ({ev.expected_observations:,} observations, {ev.rejected} rejected) in {time.monotonic() - t:.1f}s")
        shared = {s: run.topic("in", s) for s in (*INPUT_SHORT, TREAT_SHORT)}
        run.kafka.create_topics(shared.values(), args.partitions)
        t = time.monotonic()
        publish(args.bootstrap, ((shared[s], k, v) for s, k, v in ev.treatments))
        publish(args.bootstrap, ((shared[s], k, v) for s, k, v in ev.inputs))
        log(f"published in {time.monotonic() - t:.1f}s")
        inputs = [shared[s] for s in INPUT_SHORT]
        n = len(ev.inputs)
        expected_obs = ev.expected_observations
        n_routed = len(ev.treatments)  # routed into the patient stream by ingest
        ev = None  # free the events before the workers run
        stages = [
            ("a", "(a) raw aiokafka loop", lambda: stage_raw(run, inputs, n, caps["a"])),
            ("a2", "(a2) two raw loops, one process", lambda: stage_raw(run, inputs, n, caps["a2"], hops=2)),
            ("b", "(b) bare faust passthrough", lambda: stage_bare_faust(run, inputs, n, caps["b"])),
            ("c1", "(c) service, 1 worker", lambda: stage_service(run, shared, n, expected_obs, 1, caps["c1"], n_routed)),
            ("c1p", "(c) service, 1 worker with an ingest process",
             lambda: stage_service(run, shared, n, expected_obs, 1, caps["c1"], n_routed,
                                   extra_env={"INGEST_PROCESSES": "1"}, name="svc1p")),
            ("c2", "(c) service, 2 workers", lambda: stage_service(run, shared, n, expected_obs, 2, caps["c2"], n_routed)),
            ("lat", "latency", lambda: repeated_latency(run, phases, args.latency_patients, caps["warmup"],
                                                        caps["drain"], args.latency_runs)),
        ]
        wanted = {x.strip() for x in args.stages.split(",") if x.strip()}
        selected = [st for st in stages if st[0] in wanted]
        throughput = [st for st in selected if st[0] in THROUGHPUT_STAGES]
        for r in range(max(1, args.throughput_runs)):
            run.start_round(r)
            if args.throughput_runs > 1:
                log(f"throughput round {r + 1} of {args.throughput_runs}")
            this_round: dict = {}
            # every second round runs the stages in reverse order: none is always first
            for key, label, fn in (throughput if r % 2 == 0 else throughput[::-1]):
                res = run_stage(run, key, label, fn, first=r == 0)
                rc = rc or (res is None)
                this_round[key] = res
            run.results["rounds"].append(this_round)
            if r:
                run.end_round()
        run.start_round(0)
        for key, label, fn in selected:
            if key not in THROUGHPUT_STAGES:
                rc = rc or (run_stage(run, key, label, fn, first=True) is None)
    except BaseException as exc:
        rc = 1 if not isinstance(exc, SystemExit) else (exc.code or 1)
        log(f"aborted: {type(exc).__name__}: {exc}")
        if not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            traceback.print_exc(file=sys.stderr)
    finally:
        run.cleanup()
    meta["total_s"] = time.monotonic() - t_start
    meta.setdefault("events", 0)
    if "expected_obs" in meta:
        print(report(run, meta), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, **run.results}, indent=1, default=str))
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
