"""Raise interrupts on the simulated device by writing vector eventfds, as the kernel does.

For an MSI-X interrupt the kernel's vfio-pci handler calls ``eventfd_signal(ctx, 1)``
on the vector's eventfd: the counter goes up by one and anyone polling it wakes.
:func:`fire` does the same from user space with ``os.eventfd_write(fd, 1)``, so the
daemon's dispatcher cannot tell a simulated interrupt from a real one. It is used
by ``vfio-irqd sim fire``, the tests and the benchmarks; the eventfds come from the
``sim.eventfds`` method.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["MAX_SLEEP_SLICE", "FireResult", "fire"]

#: Longest single sleep while pacing, so that a stop request is noticed promptly
#: even at very low rates.
MAX_SLEEP_SLICE = 0.05

#: If pacing falls further behind than this (a suspended process, a loaded
#: host), the schedule restarts from now instead of firing a catch-up burst.
MAX_LAG_SECONDS = 1.0


@dataclass(frozen=True)
class FireResult:
    """What :func:`fire` did."""

    #: ``(vector, interrupts written)`` in the order the vectors were given.
    written: tuple[tuple[int, int], ...]
    #: Wall time spent firing, in seconds (monotonic clock).
    elapsed_s: float
    #: ``True`` when ``should_stop`` ended an unbounded or unfinished run.
    stopped: bool

    @property
    def total(self) -> int:
        """Interrupts written over all vectors."""
        return sum(n for _, n in self.written)


def _never() -> bool:
    return False


def fire(
    targets: Sequence[tuple[int, int]],
    *,
    count: int = 1,
    rate: float | None = None,
    should_stop: Callable[[], bool] = _never,
) -> FireResult:
    """Signal each ``(vector, eventfd)`` in ``targets`` ``count`` times.

    One interrupt is one ``eventfd_write(fd, 1)``, exactly what the kernel does
    per interrupt. Vectors are fired round-robin: every round writes each fd
    once, so all vectors get the same count and ``should_stop`` (polled between
    rounds and while pacing) never leaves a round half done.

    ``count=0`` fires until ``should_stop()`` returns true. ``rate`` is
    interrupts per second *per vector*; ``None`` fires as fast as the writes go.
    The fds are borrowed, not closed. Raises ``ValueError`` for a negative
    count or a non-positive rate, and ``OSError`` if a write fails.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    fds = [fd for _, fd in targets]
    rounds = 0
    stopped = False
    write = os.eventfd_write
    start = time.monotonic()
    interval = 1.0 / rate if rate is not None else 0.0
    # Each round is due at origin + rounds * interval, not "interval after the
    # previous one", so the rate does not drift with the loop's own overhead.
    origin = start
    while count == 0 or rounds < count:
        if interval:
            due = origin + rounds * interval
            while True:
                if should_stop():
                    stopped = True
                    break
                remaining = due - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(remaining, MAX_SLEEP_SLICE))
            if stopped:
                break
            lag = time.monotonic() - due
            if lag > MAX_LAG_SECONDS:
                origin += lag
        elif should_stop():
            stopped = True
            break
        for fd in fds:
            write(fd, 1)
        rounds += 1
    elapsed = time.monotonic() - start
    return FireResult(
        written=tuple((vector, rounds) for vector, _ in targets),
        elapsed_s=elapsed,
        stopped=stopped,
    )
