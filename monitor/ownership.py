"""Which cached patients a worker may keep across a consumer-group rebalance. Pure."""
from __future__ import annotations


def kept_partitions(prev_generation: int | None, prev_held: frozenset, generation: int,
                    now_held: frozenset) -> frozenset:
    """Partitions whose cached patients and processed offsets stay valid across a rebalance.

    A partition held in two consecutive generations was never anyone else's, so what this
    worker knows of it stays (faust re-reads the changelog meanwhile, and the cache keeps
    the newest writes of a batch that was in flight). If a generation passed without this
    worker (it was expelled and rejoined), any partition may have moved and come back."""
    if prev_generation is None or generation != prev_generation + 1:
        return frozenset()
    return frozenset(prev_held) & frozenset(now_held)


class OffsetContinuity:
    """Per topic-partition, the offsets a stream delivered, to catch a message the
    framework never delivered (input topics here have no compaction or transactions, so
    consecutive records have consecutive offsets). Reset it when partitions are assigned:
    the consumer then seeks to the committed offsets."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: dict[tuple[str, int], int] = {}

    def reset(self, keep_partitions=frozenset()) -> None:
        """Forget the partitions not in ``keep_partitions`` (their records will be read
        again from the committed offsets and are not redeliveries for this process)."""
        for key in [k for k in self.last if k[1] not in keep_partitions]:
            del self.last[key]

    def observe(self, topic: str, partition: int, offset: int) -> tuple[str, range | None]:
        """``("next", None)``, ``("repeat", None)`` for a redelivery, or ``("gap", missing)``."""
        key = (topic, partition)
        last = self.last.get(key)
        if last is not None and offset <= last:
            return "repeat", None
        self.last[key] = offset
        if last is None or offset == last + 1:
            return "next", None
        return "gap", range(last + 1, offset)
