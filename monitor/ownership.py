"""Which cached patients a worker may keep across a consumer-group rebalance. Pure."""
from __future__ import annotations


def stale_partitions(prev_generation: int | None, prev_held: frozenset, generation: int,
                     now_held: frozenset, cached: set[int]) -> set[int]:
    """Partitions whose cached patients may be out of date after a rebalance.

    A partition held in two consecutive generations was never anyone else's, so its
    cached patients stay (faust re-reads the changelog meanwhile, and the cache keeps the
    newest writes of a batch that was in flight). If a generation passed without this
    worker (it was expelled and rejoined), any partition may have moved and come back."""
    kept = prev_held & now_held if prev_generation is not None and generation == prev_generation + 1 else frozenset()
    return set(cached) - set(kept)
