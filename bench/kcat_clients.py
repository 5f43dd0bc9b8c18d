"""The latency test's alert reader on kcat (librdkafka, C), so that the tool watching the
service takes little of the 2-core machine it measures the service on.

With aiokafka (pure-Python protocol code) the alert reader took 0.20-0.22 of the 2 cores at
500 alert-changing events/s on a slow host (2026-11-30), the publisher as much again, beside
the worker at 0.81 and the broker at 0.62: they competed with the service for the CPU whose
shortage makes its tail. Reading through one kcat consumer took 0.07-0.08 cores in the same
runs, the broker about the same (0.62-0.68 against 0.61-0.64 of a core) and the whole machine
1.73-1.77 against 1.84-1.87 of its 2 cores (six alternated pairs; docs/measurements.md,
nineteenth pass). In a deployment the alert consumers do not run on the worker's machine at all.

What stays the same as with aiokafka (``alert_reader.main``): every partition of the alerts
topic and of the patient stream is read from the start, without committing anything; the
receive time is taken when a record's line arrives from kcat (``-u``: kcat writes each
record as it is consumed); the record's timestamp and value are those of the broker.

The publisher stays on aiokafka (``run_all.PacedProducer``). librdkafka was tried for it and
costs more than it saves here:

- librdkafka sends one partition per produce request (librdkafka issue #1700): at 500/s over
  the six partitions of ``lab-results`` it sent 425 requests/s, one per 1.2 events, where
  aiokafka sends one request per broker for every partition ready; the broker used 0.04-0.24
  of a core more than with aiokafka, about what the publisher saved (0.08 against 0.21-0.27);
- ``kcat -P`` reads its input in ``fread`` calls of 128 bytes, which wait until 128 bytes
  have arrived: the last event of each 5-ms tick waited for the next tick's bytes (publish
  to receive p50 15-17 ms at 500/s and 59 ms at 100/s, against 4 ms with aiokafka).
"""
from __future__ import annotations

import os
import shutil
import time

#: the fetch wait only bounds an idle poll (the broker answers a waiting fetch as soon as a
#: record arrives, fetch.min.bytes being 1): at 5 ms an idle consumer cost the broker 0.2
#: cores. librdkafka leaves Nagle's algorithm on by default, which holds small requests back.
CONSUMER_CONF = ("fetch.wait.max.ms=100", "enable.auto.commit=false", "socket.nagle.disable=true")


def kcat() -> str:
    """The kcat executable; ``make bench`` (and ``make test``) install the Debian package."""
    path = shutil.which("kcat")
    if path is None:
        raise RuntimeError("kcat is not installed: run `make bench` (or deploy/local/install-debs.sh kcat)")
    return path


def consumer_argv(bootstrap: str, topics: list[str], client_id: str) -> list[str]:
    """One ``kcat`` consumer over every partition of ``topics`` from their start, printing
    for each record ``<topic> <record timestamp ms> <value>`` on one line as it arrives
    (``-u``). One consumer for all topics, as the aiokafka reader was: each consumer's fetch
    loop costs the broker CPU of its own. A group of its own (``-G``: kcat's simple consumer
    takes one topic) that commits nothing, so no offsets outlive the run."""
    argv = [kcat(), "-b", bootstrap, "-G", f"{client_id}-{os.getpid()}-{time.time_ns()}", "-o", "beginning",
            "-q", "-u", "-f", "%t %T %s\\n", "-X", f"client.id={client_id}"]
    for c in CONSUMER_CONF:
        argv += ["-X", c]
    return argv + list(topics)
