"""``vfio-irqd ping``: a loopback round trip through the whole interrupt path.

For each vector, :func:`ping` asks the daemon for a ``trigger`` (the kernel
signals the vector's eventfd itself, ``VFIO_IRQ_SET_DATA_NONE``) and waits for
the ``irq`` notification that carries it back: request, device call, eventfd,
dispatcher, session, socket. The time between sending the request and reading
the notification is the round-trip time. Vectors are pinged one at a time so
that each time belongs to exactly one vector.

The client only needs ``trigger``, ``unmask`` and ``next_notification``
(:class:`PingClient`), so the loop is tested with a scripted fake as well as
against the daemon.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from irqproto.errors import RpcError
from irqproto.notifications import IrqNotification

__all__ = ["PingClient", "VectorPing", "format_ping", "ping", "ping_json"]


class PingClient(Protocol):
    """What :func:`ping` needs of a client (:class:`irqproto.blocking.Client` has it)."""

    def trigger(self, index: str, vectors: Sequence[int]) -> None:
        """Send ``trigger`` and wait for its response."""

    def unmask(self, index: str = "intx") -> None:
        """Send ``unmask``."""

    def next_notification(self, timeout: float | None = None) -> object:
        """The next notification; ``TimeoutError`` after ``timeout`` seconds."""


@dataclass
class VectorPing:
    """The outcome of pinging one vector."""

    vector: int
    #: Triggers sent.
    sent: int = 0
    #: Round-trip times in seconds of the triggers that came back in time.
    rtts: list[float] = field(default_factory=list)

    @property
    def returned(self) -> int:
        """Triggers that came back within the timeout."""
        return len(self.rtts)

    @property
    def ok(self) -> bool:
        """Every trigger came back."""
        return self.sent > 0 and self.returned == self.sent


def _absorb(note: object, index: str, received: dict[int, int]) -> None:
    if isinstance(note, IrqNotification) and note.index == index:
        for vector, count in note.counts:
            received[vector] = received.get(vector, 0) + count


def _drain_queued(client: PingClient, index: str, received: dict[int, int]) -> None:
    # timeout=0 returns what is already queued and never blocks: counts that
    # arrived late (a trigger that timed out) or from the device itself must
    # not be mistaken for the next trigger's answer.
    while True:
        try:
            note = client.next_notification(timeout=0)
        except TimeoutError:
            return
        _absorb(note, index, received)


def ping(
    client: PingClient,
    index: str,
    vectors: Sequence[int],
    *,
    count: int = 5,
    timeout: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[VectorPing]:
    """Trigger each vector ``count`` times, one at a time; the round-trip times.

    The client must already be subscribed to ``vectors`` of ``index``. A
    trigger counts as returned when an ``irq`` for its vector arrives within
    ``timeout`` seconds of sending it. On a vector the device is raising at the
    same time, a device interrupt can stand in for the loopback one, so the
    times are then a lower bound. ``RpcError`` from ``trigger`` propagates.
    """
    results = [VectorPing(vector) for vector in vectors]
    received: dict[int, int] = {}
    for _ in range(count):
        for result in results:
            vector = result.vector
            _drain_queued(client, index, received)
            before = received.get(vector, 0)
            result.sent += 1
            start = clock()
            client.trigger(index, [vector])
            deadline = start + timeout
            while received.get(vector, 0) <= before:
                remaining = deadline - clock()
                if remaining <= 0:
                    break
                try:
                    note = client.next_notification(timeout=remaining)
                except TimeoutError:
                    break
                _absorb(note, index, received)
            else:
                result.rtts.append(clock() - start)
                if index == "intx":
                    # The kernel masks INTx when it fires; re-arm it as a
                    # driver would, or the next round never comes back.
                    with contextlib.suppress(RpcError):
                        client.unmask(index)
    return results


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def format_ping(index: str, results: Sequence[VectorPing], timeout: float) -> list[str]:
    """The human report: one line per vector and a summary line."""
    lines: list[str] = []
    for r in results:
        line = f"{index} {r.vector}: {r.returned}/{r.sent} came back"
        if r.rtts:
            line += (
                f"   rtt min {_ms(min(r.rtts))}  median {_ms(statistics.median(r.rtts))}"
                f"  max {_ms(max(r.rtts))}"
            )
        lost = r.sent - r.returned
        if lost:
            line += f"   {lost} not back within {timeout:g} s"
        lines.append(line)
    sent = sum(r.sent for r in results)
    lost = sum(r.sent - r.returned for r in results)
    if lost:
        lines.append(f"FAIL: {lost} of {sent} triggers did not come back")
    else:
        lines.append(f"ok: all {sent} triggers came back")
    return lines


def ping_json(index: str, results: Sequence[VectorPing], timeout: float) -> dict[str, Any]:
    """The ``--json`` report; times in microseconds."""

    def micros(seconds: float) -> float:
        return round(seconds * 1e6, 1)

    return {
        "index": index,
        "timeout_s": timeout,
        "ok": all(r.ok for r in results),
        "vectors": [
            {
                "vector": r.vector,
                "sent": r.sent,
                "returned": r.returned,
                "rtt_us": (
                    {
                        "min": micros(min(r.rtts)),
                        "median": micros(statistics.median(r.rtts)),
                        "max": micros(max(r.rtts)),
                    }
                    if r.rtts
                    else None
                ),
            }
            for r in results
        ],
    }
