"""``monitor.worker.Hosted``: a worker's loop (ingest, clinical, delivery) as a faust service,
started again after it fails, each restart counted (``monitor_loop_restarts_total``, rule
MonitorLoopRestarting: a loop in a crash loop evaluates or delivers nothing)."""
from __future__ import annotations

import asyncio

from monitor.metrics import REGISTRY
from monitor.worker import Hosted


def restarts(loop: str) -> float:
    return REGISTRY.get_sample_value("monitor_loop_restarts_total", {"loop": loop}) or 0.0


class Loop:
    """Fails its first ``failures`` runs, then runs until stopped."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.runs = 0
        self.stops = 0
        self._stopped: asyncio.Event | None = None

    async def run(self) -> None:
        self.runs += 1
        self._stopped = asyncio.Event()  # each run until its own stop, as the real loops
        if self.runs <= self.failures:
            raise RuntimeError("injected")
        await self._stopped.wait()

    async def stop(self) -> None:
        self.stops += 1
        if self._stopped is not None:
            self._stopped.set()


def test_a_failed_loop_is_started_again_and_counted():
    async def go():
        loop = Loop(failures=2)
        hosted = Hosted(loop, "test-loop-a")
        hosted.restart_delay = 0.01
        await hosted.start()
        for _ in range(200):
            if loop.runs == 3:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        await hosted.stop()
        return loop

    before = restarts("test-loop-a")
    loop = asyncio.run(go())
    assert loop.runs == 3  # two failures, then running until the service stopped
    assert restarts("test-loop-a") == before + 2


def test_a_loop_that_does_not_fail_is_not_counted_and_its_series_exists():
    async def go():
        loop = Loop(failures=0)
        hosted = Hosted(loop, "test-loop-b")
        await hosted.start()
        await asyncio.sleep(0.05)
        await hosted.stop()
        return loop

    loop = asyncio.run(go())
    assert loop.runs == 1 and loop.stops >= 1
    assert REGISTRY.get_sample_value("monitor_loop_restarts_total", {"loop": "test-loop-b"}) == 0.0
