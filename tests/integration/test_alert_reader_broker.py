"""The latency benchmark's alert reader (``bench/alert_reader.py``) on a real broker, with both
of its Kafka clients: kcat (librdkafka, the default of ``bench/run_all.py``) and aiokafka.

Both read the same alerts and patient-stream records, written before and after the reader
started, over several partitions; each must report every latency event once (the first alert
naming it, not the later versions that name it again), each observation once, the number of
alerts read, and, for every event, the same latency by the record's timestamp: the broker's
timestamp minus the publish stamp in the event id, whichever client read it."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from kafka import KafkaProducer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 3


def alert(seqs: list[tuple[int, int]], version: int) -> bytes:
    """An alert version whose evidence names latency observations (seq, publish ns)."""
    return json.dumps({"alert_id": "a-1", "version": version, "evidence": [
        {"observation_id": f"lat-{s}-{ns}", "value": 160.0} for s, ns in seqs]}, separators=(",", ":")).encode()


def observation(seq: int, ns: int) -> bytes:
    return json.dumps({"observation_id": f"lat-{seq}-{ns}", "patient_id": "LAT-0001"},
                      separators=(",", ":")).encode()


class Reader:
    def __init__(self, client: str, bootstrap: str, alerts: str, observations: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "alert_reader.py"), "--client", client,
                                      bootstrap, alerts, str(PARTITIONS), observations],
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "READY"
        self.lines: list[str] = []
        self._t = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._t.start()

    def seen(self) -> dict[int, float]:
        """seq -> latency by record time (s), from the ``seq recv ts`` lines."""
        out = {}
        for line in list(self.lines):
            parts = line.split()
            if len(parts) == 3 and parts[0] != "O":
                assert int(parts[0]) not in out, f"event {parts[0]} reported twice"
                out[int(parts[0])] = float(parts[2])
        return out

    def observations(self) -> dict[int, float]:
        return {int(p[1]): float(p[2]) for p in (line.split() for line in list(self.lines)) if p[0] == "O"}

    def alerts_read(self) -> int:
        counts = [int(line.split()[1]) for line in list(self.lines) if line.startswith("A ")]
        return max(counts, default=0)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._t.join(5)


def kcat_children() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "kcat"], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


@pytest.mark.parametrize("client", ["kcat", "aiokafka"])
def test_every_latency_event_is_reported_once_with_the_record_time_latency(client, kafka_bootstrap,
                                                                             topic_factory):
    t = topic_factory("alerts", "observations", partitions=PARTITIONS)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    sent: dict[int, tuple[int, int]] = {}  # seq -> (publish ns, record timestamp ms)

    def write(first: int, n: int) -> None:
        futures = []
        for seq in range(first, first + n):
            ns = time.time_ns()
            ts = ns // 1_000_000 + 7  # the "alert" 7 ms after the publish stamp
            producer.send(t["observations"], value=observation(seq, ns), partition=seq % PARTITIONS, timestamp_ms=ts)
            # the first version names the event; a later one on the same partition (the same
            # patient's, in the benchmark) names it again
            before = seq - PARTITIONS
            evidence = [(seq, ns)] + ([(before, sent[before][0])] if before in sent else [])
            futures.append(producer.send(t["alerts"], value=alert(evidence, 1), partition=seq % PARTITIONS,
                                         timestamp_ms=ts))
            sent[seq] = (ns, ts)
        for f in futures:
            f.get(timeout=30)

    before = kcat_children()
    write(0, 30)  # before the reader starts: read from the start
    reader = Reader(client, kafka_bootstrap, t["alerts"], t["observations"])
    try:
        write(30, 30)  # while it runs
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(reader.seen()) < 60 or len(reader.observations()) < 60
                                               or reader.alerts_read() < 60):
            time.sleep(0.1)
        seen = reader.seen()
        assert sorted(seen) == list(range(60))
        assert sorted(reader.observations()) == list(range(60))
        assert reader.alerts_read() == 60
        for seq, (ns, ts) in sent.items():  # the broker's record timestamp minus the publish stamp
            assert seen[seq] == pytest.approx(ts / 1000.0 - ns / 1e9, abs=2e-6)
            assert reader.observations()[seq] == pytest.approx(ts / 1000.0 - ns / 1e9, abs=2e-6)
        if client == "kcat":
            assert kcat_children() - before, "the reader's kcat child is running"
    finally:
        reader.stop()
        producer.close()
    if client == "kcat":  # stopped with the reader, as run_all stops it
        deadline = time.monotonic() + 5
        while kcat_children() - before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not kcat_children() - before
