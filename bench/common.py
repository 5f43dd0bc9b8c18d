"""Shared helpers of ``bench/run_all.py``: events, topics, offsets, processes, machine facts.

Nothing here starts a worker; ``run_all.py`` does. All Kafka admin work uses kafka-python
(the same client as ``monitor.topics_admin``); the measured loops use aiokafka or faust.
"""
from __future__ import annotations

import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterable

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

#: the service's topic variables -> short names (same table as tests/workers.py)
from workers import SERVICE_TOPICS  # noqa: E402

from monitor.topics_admin import topic_partitions  # noqa: E402

INPUT_SHORT = ("lab-results", "vital-signs", "liver-function")
TREAT_SHORT = "treatments"


# ------------------------------------------------------------------ events
class EventSet:
    """The pre-published benchmark input: treatments first, then N lab/vital/panel events."""

    def __init__(self) -> None:
        #: (short topic, key bytes, value bytes)
        self.treatments: list[tuple[str, bytes, bytes]] = []
        self.inputs: list[tuple[str, bytes, bytes]] = []
        self.patients = 0
        self.expected_observations = 0
        self.rejected = 0
        self.by_topic: dict[str, int] = {}
        self.generator = ""


def build_events(n_events: int, patients: int | None = None, seed: int = 11) -> EventSet:
    """N input events from ``monitor.simulate.generate_cohort`` (a realistic post-dose cohort:
    pre-dose baselines, the dose, steroid course, liver panels, platelets, troponin, vitals),
    cut at the first N lab/vital/panel events in effective-time order. Every patient's dose
    and steroid events (those up to the cut) go first, on ``treatments``.

    ``expected_observations`` is what the service's ingest must produce from them, counted
    with the service's own decoder (``schemas.ingest.decode``)."""
    from schemas.ingest import decode

    # ~119 input events per patient over the 90-day window
    n_pat = patients or max(100, min(1000, -(-n_events // 100)))
    out = EventSet()
    try:
        from monitor.simulate import generate_cohort, records

        while True:
            cohort = generate_cohort(n_pat, seed, id_prefix=f"BENCH{seed}")
            n_inputs = sum(1 for e in cohort.events if e.topic != TREAT_SHORT)
            if n_inputs >= n_events or patients:
                break
            n_pat = int(n_pat * n_events / max(n_inputs, 1) * 1.05) + 1
        stream = ((e.topic, e.patient_id, e.at, rec["value"]) for e, rec in zip(cohort.events, records(cohort)))
        out.generator = "monitor.simulate.generate_cohort"
    except Exception as exc:  # monitor/simulate.py is being edited: keep benchmarking with the fallback
        print(f"monitor.simulate unusable ({type(exc).__name__}: {exc}); using bench/common.py's fallback "
              "generator", file=sys.stderr)
        n_pat = patients or max(100, min(1000, -(-n_events // 100)))
        stream = _fallback_events(n_events, n_pat, seed)
        out.generator = "bench/common.py fallback (monitor.simulate failed)"
    out.patients = n_pat
    now = datetime.now(timezone.utc)
    cut_at = None
    pending_treat = []
    for topic, patient_id, at, v in stream:
        raw = v.encode() if isinstance(v, str) else json.dumps(v, separators=(",", ":")).encode()
        item = (topic, patient_id.encode(), raw)
        e_topic, e_at = topic, at
        if e_topic == TREAT_SHORT:
            pending_treat.append((e_at, item))
            continue
        if len(out.inputs) >= n_events:
            continue
        out.inputs.append(item)
        cut_at = e_at
        out.by_topic[e_topic] = out.by_topic.get(e_topic, 0) + 1
        try:
            out.expected_observations += len(decode(e_topic, raw, received_at=now + timedelta(hours=1)))
        except Exception:
            out.rejected += 1
    out.treatments = [item for at, item in pending_treat if cut_at is None or at <= cut_at]
    out.by_topic[TREAT_SHORT] = len(out.treatments)
    return out


def _fallback_events(n_events: int, n_patients: int, seed: int):
    """A simpler cohort, used only when monitor.simulate cannot run: per patient a dose, then
    daily vitals (HR, temperature, RR, SBP, SpO2), platelets and a liver panel every 3 days with
    a transaminase rise in weeks 1-6 for half of the patients. Yields (topic, patient, at, value)
    in effective-time order, treatments first."""
    import random

    rng = random.Random(seed)
    start = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) - timedelta(days=80)
    pids = [f"BENCHF{seed}-{i:04d}" for i in range(n_patients)]
    for i, pid in enumerate(pids):
        yield TREAT_SHORT, pid, start, {
            "type": "dose", "event_id": f"{pid}-dose", "patient_id": pid,
            "product": "onasemnogene-abeparvovec-iv" if i % 10 < 7 else "onasemnogene-abeparvovec-it",
            "administered_at": start.isoformat(), "weight_kg": 8.0,
            "birth_date": (start - timedelta(days=300 if i % 10 < 7 else 2000)).date().isoformat(),
            "ward": "paediatric-neurology", "care_team": "sma-gene-therapy", "source": "bench"}
    vitals = (("8867-4", "/min", 120, 8), ("8310-5", "Cel", 36.8, 0.3), ("9279-1", "/min", 30, 3),
              ("8480-6", "mm[Hg]", 95, 4), ("59408-5", "%", 98, 1))
    n, k = 0, 0
    while n < n_events:
        day = 1 + k // 24
        at = start + timedelta(days=day, hours=k % 24)
        for j, pid in enumerate(pids):
            if n >= n_events:
                return
            if (k + j) % 7 == 0:
                alt = 30 * (rng.uniform(2, 6) if (j % 2 and day < 42) else rng.uniform(0.5, 1.2))
                yield "liver-function", pid, at, {
                    "event_id": f"{pid}-lft-{k}", "patient_id": pid, "effective_at": at.isoformat(),
                    "source": "bench", "status": "final", "results": [
                        {"loinc": "1742-6", "value": round(alt, 1), "unit": "U/L", "reference_range": {"low": 0, "high": 40}},
                        {"loinc": "1920-8", "value": round(alt * 1.1, 1), "unit": "U/L", "reference_range": {"low": 0, "high": 60}},
                        {"loinc": "1975-2", "value": 0.5, "unit": "mg/dL", "reference_range": {"low": 0.1, "high": 1.2}},
                        {"loinc": "6301-6", "value": 1.0, "unit": "{INR}", "reference_range": {"low": 0.8, "high": 1.2}},
                        {"loinc": "5902-2", "value": 12.5, "unit": "s", "reference_range": {"low": 10, "high": 13.5}}]}
            elif (k + j) % 7 == 3:
                yield "lab-results", pid, at, {
                    "event_id": f"{pid}-plt-{k}", "patient_id": pid, "loinc": "777-3", "value": round(rng.uniform(120, 400)),
                    "unit": "10*3/uL", "reference_range": {"low": 150, "high": 450}, "effective_at": at.isoformat(),
                    "status": "final", "source": "bench"}
            else:
                loinc, unit, mu, sd = vitals[(k + j) % len(vitals)]
                yield "vital-signs", pid, at, {
                    "event_id": f"{pid}-vit-{k}", "patient_id": pid, "loinc": loinc, "value": round(rng.gauss(mu, sd), 1),
                    "unit": unit, "effective_at": at.isoformat(), "status": "final", "source": "bench"}
            n += 1
        k += 1


# ------------------------------------------------------------------ Kafka admin / offsets
class Kafka:
    """kafka-python admin + an offsets-only consumer (never joins a group)."""

    def __init__(self, bootstrap: str) -> None:
        from kafka import KafkaConsumer
        from kafka.admin import KafkaAdminClient

        self.bootstrap = bootstrap
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
        self.offsets = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                     client_id="bench-offsets")
        self._parts: dict[str, list] = {}

    def close(self) -> None:
        for c in (self.offsets, self.admin):
            try:
                c.close()
            except Exception:
                pass

    def create_topics(self, names: Iterable[str], partitions: int, compacted: Iterable[str] = ()) -> None:
        from kafka.admin import NewTopic

        compacted = set(compacted)
        topics = [NewTopic(n, partitions, 1, topic_configs=({"cleanup.policy": "compact"} if n in compacted else {}))
                  for n in names]
        if topics:
            self.admin.create_topics(topics)
        self.wait_topics(names)

    def wait_topics(self, names: Iterable[str], timeout: float = 30.0) -> None:
        names = set(names)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if names <= set(self.admin.list_topics()):
                return
            time.sleep(0.1)
        raise TimeoutError(f"topics not visible: {sorted(names - set(self.admin.list_topics()))}")

    def list_prefix(self, prefix: str) -> list[str]:
        return sorted(t for t in self.admin.list_topics() if t.startswith(prefix))

    def delete_prefix(self, prefix: str, timeout: float = 60.0) -> list[str]:
        """Delete every topic whose name starts with ``prefix``; wait until they are gone."""
        names = self.list_prefix(prefix)
        if names:
            try:
                self.admin.delete_topics(names, timeout_ms=int(timeout * 1000))
            except Exception as exc:  # some may already be gone; check below
                print(f"  (delete_topics: {type(exc).__name__}: {exc})", file=sys.stderr)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.list_prefix(prefix):
                time.sleep(0.2)
        return names

    def delete_groups(self, groups: Iterable[str]) -> None:
        groups = list(groups)
        if not groups:
            return
        delete = getattr(self.admin, "delete_groups", None) or getattr(self.admin, "delete_consumer_groups")
        try:
            delete(groups)
        except Exception as exc:  # a group that never committed does not exist; groups expire anyway
            print(f"  (delete groups: {type(exc).__name__}: {exc})", file=sys.stderr)

    def list_groups(self) -> list[str]:
        """Consumer group ids (kafka-python 3 ``list_groups`` or 2.x ``list_consumer_groups``)."""
        if hasattr(self.admin, "list_groups"):
            return [g["group_id"] if isinstance(g, dict) else g[0] for g in self.admin.list_groups()]
        return [g[0] for g in self.admin.list_consumer_groups()]

    def committed(self, group: str, tps: list) -> dict:
        """TopicPartition -> committed offset of ``group`` (kafka-python 3 or 2.x admin API)."""
        if hasattr(self.admin, "list_group_offsets"):
            res = self.admin.list_group_offsets({group: tps}).get(group, {})
        else:
            res = self.admin.list_consumer_group_offsets(group, partitions=tps)
        out = {}
        for tp, meta in res.items():
            off = getattr(meta, "offset", meta)
            if isinstance(off, int) and off >= 0:
                out[tp] = off
        return out

    def partitions(self, topic: str) -> list:
        from kafka import TopicPartition

        tps = self._parts.get(topic)
        if tps is None:
            ids = topic_partitions(self.offsets, topic, wait=20)
            if not ids:
                raise RuntimeError(f"no partitions for {topic}")
            tps = self._parts[topic] = [TopicPartition(topic, p) for p in sorted(ids)]
        return tps

    def end_total(self, topic: str) -> int:
        ends = self.offsets.end_offsets(self.partitions(topic))
        return int(sum(ends.values()))

    def group_lag(self, group: str, topic: str) -> tuple[int, int]:
        """(lag, committed) of consumer group ``group`` on ``topic`` (uncommitted = lag of the whole partition)."""
        tps = self.partitions(topic)
        ends = self.offsets.end_offsets(tps)
        committed = self.committed(group, tps)
        lag = done = 0
        for tp in tps:
            off = committed.get(tp, 0)
            lag += max(0, ends[tp] - off)
            done += off
        return lag, done


def publish(bootstrap: str, items: Iterable[tuple[str, bytes, bytes]]) -> int:
    """Publish (topic, key, value) with kafka-python, acks=all, batched; returns the count."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=512 * 1024,
                      max_request_size=16 * 1024 * 1024, client_id="bench-publisher")
    n = 0
    try:
        for topic, key, value in items:
            p.send(topic, key=key, value=value)
            n += 1
        p.flush(timeout=120)
    finally:
        p.close(timeout=10)
    return n


# ------------------------------------------------------------------ processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


def proc_tree(pid: int) -> list[int]:
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(_children(p))
    return seen


def status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of ``pid`` and its descendants, in MiB (psutil not needed)."""
    try:
        import psutil  # noqa: F401  (optional: /proc gives VmHWM, which psutil does not expose)
    except ImportError:
        pass
    return sum(status_kb(p, "VmHWM") for p in proc_tree(pid)) / 1024.0


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of ``pid`` (from /proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        f = stat[stat.rindex(")") + 2:].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (``/proc/stat``)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    idle = f[3] + (f[4] if len(f) > 4 else 0)  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(f[:8]) - idle) / hz, sum(f[:8]) / hz


def listening_pids(port: int) -> list[int]:
    """Pids of the processes listening on TCP ``port`` (``/proc/net/tcp*`` and each process's fds)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                        inodes.add(f"socket:[{f[9]}]")
        except OSError:
            continue
    out = []
    for d in os.listdir("/proc") if inodes else ():
        if not d.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{d}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{d}/fd/{fd}") in inodes:
                    out.append(int(d))
                    break
            except OSError:
                continue
    return out


class CpuMeter:
    """CPU seconds used by named processes (with their children) and by the whole machine
    between ``start()`` and ``stop()``: who used the cores while a phase ran."""

    def __init__(self, trees: dict[str, list[int]], alone: dict[str, list[int]] | None = None) -> None:
        """``trees``: name -> pids counted with their descendants; ``alone``: name -> pids
        counted without them (e.g. the benchmark's own process, whose children are measured
        under their own names)."""
        self.trees = trees
        self.alone = alone or {}
        self.names = [*trees, *self.alone]

    def _read(self) -> dict[str, float]:
        out = {name: sum(cpu_seconds(p) for pid in pids for p in proc_tree(pid)) for name, pids in self.trees.items()}
        out.update({name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self.alone.items()})
        out["machine_busy"], out["machine_total"] = machine_cpu_seconds()
        out["wall"] = time.monotonic()
        return out

    def start(self) -> None:
        self._t0 = self._read()

    def stop(self) -> dict[str, float]:
        """Cores used on average over the interval, per name, plus ``machine`` (busy cores) and
        ``cores`` (the machine's count), and ``seconds``."""
        t1 = self._read()
        wall = t1["wall"] - self._t0["wall"]
        out = {name: round((t1[name] - self._t0[name]) / wall, 2) for name in self.names}
        total = t1["machine_total"] - self._t0["machine_total"]
        out["machine"] = round((t1["machine_busy"] - self._t0["machine_busy"]) / wall, 2)
        out["cores"] = round(total / wall) if wall else os.cpu_count()
        out["seconds"] = round(wall, 1)
        #: CPU seconds each name used over the interval, unrounded (``cpu_per_event``)
        out["used"] = {name: t1[name] - self._t0[name] for name in self.names}
        return out


class Child:
    """A benchmark subprocess in its own session (stopped by process group, which we own)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def peak_rss_mb(self) -> float:
        return peak_rss_mb(self.proc.pid) if self.alive() else 0.0

    def tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        try:
            self._log.close()
        except Exception:
            pass


def http_ok(url: str, timeout: float = 1.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# ------------------------------------------------------------------ statistics / machine
def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-q * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def broker_version() -> str:
    """From the running dev broker's classpath (kafka-<version>/lib), its log, or deploy/local/pom.xml."""
    try:
        pid = int((ROOT / ".kafka" / "kafka.pid").read_text().split()[0])
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        m = re.search(r"kafka[-_](\d+\.\d+\.\d+)/lib", cmd)
        if m:
            return m.group(1)
    except (OSError, ValueError, IndexError):
        pass
    for path in (ROOT / ".kafka" / "broker.log", ROOT / ".kafka" / "broker.stdout"):
        try:
            with open(path, errors="replace") as fh:
                for line in fh:
                    m = re.search(r"Kafka version: (\S+)", line)
                    if m:
                        return m.group(1)
        except OSError:
            continue
    try:
        m = re.search(r"<kafka\.version>(.*?)</kafka\.version>", (ROOT / "deploy/local/pom.xml").read_text())
        if m:
            return m.group(1) + " (pom)"
    except OSError:
        pass
    return "?"


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = status_like_meminfo("MemTotal")
    return {
        "nproc": str(os.cpu_count()),
        "ram": f"{ram / 1024 / 1024:.1f} GiB" if ram else "?",
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "faust-streaming": _version("faust-streaming"),
        "aiokafka": _version("aiokafka"),
        "kafka-python": _version("kafka-python"),
        "kafka broker": broker_version(),
        "clinical core": clinical_core(),
    }


def clinical_core() -> str:
    """What the workers started by the benchmark load (``alerts.compiled_core``): "compiled"
    when every module is built for its current source and ``CLINICAL_CORE`` is not ``python``."""
    from alerts import compiled_core

    if not compiled_core.enabled():
        return "python (CLINICAL_CORE=python)"
    missing = compiled_core.unbuilt()
    return "compiled" if not missing else f"python for {', '.join(missing)} (not built: make core)"


def status_like_meminfo(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
