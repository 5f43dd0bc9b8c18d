"""A faust table whose changelog writes can be awaited until the broker holds them.

Why: before committing offsets, faust flushes its producer buffer only until no message
has left it for 0.1 s (``ProducerBuffer.flush_atmost``), then commits. Under load (the
first write to a changelog partition waits for metadata, the send queue is full, two
cores are busy) a consumer offset can therefore be committed while the changelog write of
the state that event produced is still in the buffer. A crash in that window loses the
state for good: the event is never replayed and the changelog never saw it. The CI
rebalance test caught it once: a dose event was committed, its state was lost with the
killed worker, and the survivor evaluated that patient's liver labs as pre-dose values.

The clinical agent therefore collects the changelog futures of a batch and waits for all
of them (resending what failed, with backoff) before the batch's events are acknowledged.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

import faust

log = logging.getLogger(__name__)


class ConfirmedTable(faust.Table):
    """``faust.Table`` that remembers every changelog write until :meth:`confirm_changelog`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: (changelog partition, key, value, future) not yet confirmed by the broker
        self._unconfirmed: list[tuple[Optional[int], Any, Any, asyncio.Future]] = []

    def send_changelog(self, partition, key, value, key_serializer=None, value_serializer=None):
        fut = super().send_changelog(partition, key, value, key_serializer, value_serializer)
        self._unconfirmed.append((partition, key, value, fut))
        return fut

    @property
    def unconfirmed(self) -> int:
        return len(self._unconfirmed)

    async def confirm_changelog(self, max_delay: float = 10.0) -> int:
        """Wait until the broker acknowledged every changelog write made so far; resend the
        failed ones with exponential backoff, for as long as it takes. Returns how many
        writes were confirmed."""
        async def resend(p, k, v) -> None:
            self.send_changelog(p, k, v)

        return await until_acknowledged(self._unconfirmed, resend, "changelog writes", max_delay)


async def until_acknowledged(pending: list, resend, what: str, max_delay: float = 10.0) -> int:
    """Drain ``pending`` (entries ``(*args, future)``) until the broker acknowledged every
    one: wait for the futures, then ``await resend(*args)`` each failed entry (which must
    append a new entry to ``pending``) after an exponential backoff, for as long as it
    takes. Returns how many were acknowledged."""
    acknowledged = 0
    delay = 0.5
    while pending:
        batch = list(pending)
        pending.clear()
        results = await gather_watched([e[-1] for e in batch], f"{what} not yet acknowledged by the broker")
        failed = [e[:-1] for e, r in zip(batch, results) if isinstance(r, BaseException)]
        acknowledged += len(batch) - len(failed)
        if not failed:
            break
        log.warning("%d %s not acknowledged by the broker; resending in %.1fs", len(failed), what, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)
        for args in failed:
            await resend(*args)
    return acknowledged


async def gather_watched(futures: list, what: str, warn_every: float = 30.0) -> list:
    """``asyncio.gather(..., return_exceptions=True)`` that logs a warning every
    ``warn_every`` seconds while some are still pending (a stalled batch must be visible)."""
    gathered = asyncio.gather(*futures, return_exceptions=True)
    waited = 0.0
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(gathered), warn_every)
        except asyncio.TimeoutError:
            waited += warn_every
            left = sum(1 for f in futures if not f.done())
            log.warning("%d %s after %.0fs; the batch waits", left, what, waited)


def confirmed_table(app: faust.App, name: str, **kwargs: Any) -> ConfirmedTable:
    """Define a :class:`ConfirmedTable` on ``app`` (as ``app.Table`` would)."""
    return app.tables.add(ConfirmedTable(app, name=name, beacon=app.tables.beacon, **kwargs))
