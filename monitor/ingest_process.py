"""Ingest in a process of its own, supervised by the worker (``INGEST_PROCESSES``).

A worker's stages share one event loop, so they share one core: on the throughput
benchmark ingest (validation, unit conversion, the writes to the patient stream) took
about a third of it, and the clinical stage waited for it. Ingest is stateless (its own
consumer group, at-least-once commits after the broker's acknowledgements), so it can
run as a separate process without any change to its guarantees: the worker starts
``INGEST_PROCESSES`` of them (``python -m monitor.ingest_process``), each the same
batched loop (:class:`monitor.ingest.IngestService`) in the same consumer group, and the
worker's own process keeps the clinical stage, delivery, the clocks and the web
endpoints. ``INGEST_PROCESSES=0`` keeps ingest in the worker's process, as before, with
the in-process hand-off of decoded observations (``monitor.clinical.handoff``).

Between a worker and each of its ingest processes:

- **supervision**: each process is a :class:`~monitor.worker.Hosted` service of the
  worker's faust app, started with it and started again 2 s after it exits; the worker's
  ``/readyz`` waits for every ingest process to report ready;
- **stop**: the worker stops an ingest process with SIGTERM (the batch in progress
  finishes, every batch written is acknowledged and committed, the consumer leaves its
  group) and SIGKILLs it after ``STOP_SECONDS``. An ingest process also stops when its
  worker is gone however it died (SIGKILL included): its stdin, a pipe from the worker,
  reaches end-of-file. So a crashed worker leaves no ingest running on, and the records
  it read and did not commit are read again by the next owner (at least once);
- **metrics**: the process keeps its counts (events, observations, dead letters, the last
  event per source, batch durations) and writes them to the worker, with its consumer lag,
  twice a second and when it stops, as one JSON line on its stdout; the worker adds them
  to its own metrics, so ``/metrics`` is the same whichever process ingests. Anything
  else the process prints goes to stderr (its logs, in the worker's format and level);
  nothing on the relay carries a patient identifier (counts by topic, format, analyte,
  reason and configured source label).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

log = logging.getLogger(__name__)

#: how often an ingest process writes its counts and lag to its worker
RELAY_SECONDS = 0.5
#: how long the worker waits for a stopping ingest process before it kills it (its own
#: stop waits up to 10 s for the batches in flight)
STOP_SECONDS = 15.0
#: one relay line at most (the counts of half a second are a few kilobytes)
MAX_LINE = 4 * 1024 * 1024


class IngestProcess:
    """The worker's side of one ingest process: a loop (``run()`` / ``stop()``) for
    :class:`~monitor.worker.Hosted`, with ``ready`` and ``lag()`` as the in-process
    ingest has them."""

    def __init__(self, index: int, apply_counts: Any) -> None:
        self.index = index
        self.apply_counts = apply_counts
        self.ready = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None
        self._lag: dict[tuple[str, int], int] = {}
        self._stopping = False

    async def run(self) -> None:
        self._stopping = False
        self.proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "monitor.ingest_process", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
            limit=MAX_LINE)
        log.info("ingest process %d started (pid %d)", self.index, proc.pid)
        try:
            assert proc.stdout is not None
            while True:
                line = await proc.stdout.readline()
                if not line:
                    break
                self._receive(line)
            code = await proc.wait()
        finally:
            self.ready.clear()
            self._lag = {}
        if self._stopping:
            return
        if code != 0:
            raise RuntimeError(f"ingest process {self.index} exited with {code}")
        # stopped cleanly without being asked by this worker (a SIGTERM to the process group
        # reaches it first when the whole worker is stopping): started again unless the
        # worker is stopping meanwhile (Hosted)
        log.info("ingest process %d stopped", self.index)

    def _receive(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
            if msg.get("counts"):
                self.apply_counts(msg["counts"])
            if "lag" in msg:
                self._lag = {(t, int(p)): int(n) for t, p, n in msg["lag"]}
            if msg.get("ready") is True:
                self.ready.set()
            elif msg.get("ready") is False:
                self.ready.clear()
        except Exception as exc:  # noqa: BLE001 - a bad line costs its figures, never the worker
            log.warning("ingest process %d: unreadable relay line (%s)", self.index, type(exc).__name__)

    def lag(self) -> dict[tuple[str, int], int]:
        return dict(self._lag)

    async def stop(self) -> None:
        self._stopping = True
        self.ready.clear()
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        try:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), STOP_SECONDS)
        except ProcessLookupError:
            pass
        except asyncio.TimeoutError:
            log.warning("ingest process %d did not stop within %.0f s; killed", self.index, STOP_SECONDS)
            proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------- the process itself
async def _serve(relay) -> int:
    from .gc_tuning import tune_garbage_collector
    from .ingest import COUNTERS, IngestService
    from .settings import get_settings

    s = get_settings()
    COUNTERS.relayed = True
    service = IngestService(s)
    tune_garbage_collector()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # a terminal's Ctrl-C reaches the whole process group: the worker decides when this stops
    loop.add_signal_handler(signal.SIGINT, lambda: None)

    def report(ready: bool | None = None) -> None:
        msg: dict[str, Any] = {"counts": COUNTERS.take(),
                               "lag": [[t, p, n] for (t, p), n in service.lag().items()]}
        if ready is not None:
            msg["ready"] = ready
        relay.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
        relay.flush()

    async def watch_worker() -> None:
        """End-of-file on stdin: the worker is gone (stopped, or killed)."""
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while await reader.read(4096):
            pass
        if not stop.is_set():
            log.warning("ingest process: its worker is gone; stopping")
        stop.set()

    async def relay_counts() -> None:
        announced = False
        while True:
            await asyncio.sleep(RELAY_SECONDS)
            ready = service.ready.is_set()
            try:
                report(ready if ready != announced else None)
            except (BrokenPipeError, ConnectionResetError):
                stop.set()  # the worker is gone
                return
            except Exception as exc:  # noqa: BLE001 - a report lost costs its figures, never the loop
                log.warning("ingest process: report to the worker failed (%s)", type(exc).__name__)
                continue
            announced = ready

    running = asyncio.ensure_future(service.run())
    tasks = [asyncio.ensure_future(watch_worker()), asyncio.ensure_future(relay_counts())]
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([running, stopped], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if running.done() and not stopped.done():
            exc = running.exception()
            log.error("ingest loop stopped: %s", type(exc).__name__ if exc else "returned")
            code = 1
        await service.stop()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        try:
            report(False)
        except (BrokenPipeError, OSError):
            pass  # the worker is gone: its figures go with it
        return code
    finally:
        for t in (*tasks, stopped):
            t.cancel()


def main() -> int:
    from .logs import configure_logging, quiet_client_loggers

    # the relay is this process's stdout; anything printed goes to stderr instead
    relay = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    configure_logging()
    quiet_client_loggers()
    try:
        return asyncio.run(_serve(relay))
    except BrokenPipeError:
        return 0  # the worker is gone


if __name__ == "__main__":
    sys.exit(main())
