"""Counters the ``stats`` method reports that belong to no single module."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

#: Upper bounds (µs) of the latency buckets: powers of two from 1 µs to ~1 s.
LATENCY_BOUNDS_US: tuple[int, ...] = tuple(1 << i for i in range(21))


class LatencyHistogram:
    """Delivery latency: from the moment a count is credited to a session until
    the ``irq`` bytes carrying it have been handed to the kernel.

    Fixed log2 buckets so recording is one bisect and an increment, and memory
    does not grow with traffic. The last bucket also holds everything slower.
    """

    def __init__(self) -> None:
        self.counts = [0] * len(LATENCY_BOUNDS_US)
        self._sources: list[Callable[[], Sequence[int]]] = []

    def add_source(self, counts: Callable[[], Sequence[int]]) -> None:
        """Merge another recorder's cumulative bucket counts (the native hot loop's)."""
        self._sources.append(counts)

    def merged(self) -> list[int]:
        """The bucket counts, with every source added."""
        merged = list(self.counts)
        for source in self._sources:
            for slot, count in enumerate(source()):
                merged[min(slot, len(merged) - 1)] += count
        return merged

    def record_ns(self, nanoseconds: int) -> None:
        """Add one observation."""
        micros = nanoseconds / 1000
        slot = bisect.bisect_left(LATENCY_BOUNDS_US, micros)
        self.counts[min(slot, len(self.counts) - 1)] += 1

    def total(self) -> int:
        """How many observations were recorded."""
        return sum(self.merged())

    def percentile_us(self, fraction: float) -> int | None:
        """The bucket bound below which ``fraction`` of observations fall, or ``None``."""
        return bucket_percentile(LATENCY_BOUNDS_US, self.merged(), fraction)

    def as_wire(self) -> dict[str, list[int]]:
        """The ``latency_us`` part of the ``stats`` result."""
        return {"bounds": list(LATENCY_BOUNDS_US), "counts": self.merged()}


def bucket_percentile(bounds: Sequence[int], counts: Sequence[int], fraction: float) -> int | None:
    """The upper bound of the bucket holding the ``fraction`` quantile; ``None`` if empty.

    Works on the wire form too (``stats``' ``latency_us``), so clients share it.
    """
    total = sum(counts)
    if not total or not bounds:
        return None
    wanted = fraction * total
    running = 0
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        if running >= wanted:
            return bound
    return bounds[-1]
