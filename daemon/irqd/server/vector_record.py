"""The record of enabled vectors: each one's eventfd, its place in the hot loop, its subscribers.

This is the layer under the vector table's requests (irqd.server.vectors), its
claims (irqd.server.claims) and its hand-over (irqd.server.table_state): how a
vector is enabled, credited, joined, left, released and forgotten, in the one
order that keeps counts exact and no eventfd stranded.

Everything here is synchronous and runs on the Trio thread. That is what makes
counts exact: between draining a vector's eventfd and changing its subscriber
list nothing else can run, so each eventfd signal is credited to exactly the
subscribers present when it was read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from irqd.device.base import Device, IrqIndex
from irqd.errors import IrqdError
from irqd.eventfd import EventFd
from irqd.hotpath.interface import Subscriber, VectorPoller
from irqd.server.indexes import DeviceIndexes
from irqd.tokens import make_token

log = structlog.get_logger("irqd.server.vectors")


@dataclass(eq=False)
class Vector:
    """One enabled vector: its eventfd and the sessions that receive it."""

    index: IrqIndex
    number: int
    eventfd: EventFd
    #: Subscribers in the order they joined, each once. A list rather than a
    #: dict: 2048 vectors with 256 subscribers each cost 4 MiB instead of 18,
    #: and no operation here is hot enough for the linear ``in`` to matter.
    subscribers: list[Subscriber] = field(default_factory=list)
    #: Every eventfd signal read for this vector since it was enabled.
    total: int = 0
    #: The client that claimed it; the daemon then neither polls nor reads it.
    claimed_by: Subscriber | None = None

    @property
    def token(self) -> int:
        """The vector's hot-loop token (irqd.tokens)."""
        return make_token(self.index, self.number)


class VectorRecord:
    """The enabled vectors by token, kept in step with the poller and the device."""

    def __init__(self, device: Device, poller: VectorPoller, indexes: DeviceIndexes) -> None:
        self.device = device
        #: Polls the vector eventfds: the hot loop (irqd.hotpath.interface). It
        #: credits counts either through ``deliver`` or itself, from its own copy
        #: of the subscriber lists (``join``/``leave`` keep that up to date).
        self.poller = poller
        poller.attach(self.deliver)
        #: What the kernel has per index; enables vectors on the device.
        self.indexes = indexes
        self._vectors: dict[int, Vector] = {}

    # -- queries -----------------------------------------------------------------

    def lookup(self, index: IrqIndex, vector: int) -> Vector | None:
        """The enabled vector, or ``None``."""
        return self._vectors.get(make_token(index, vector))

    def get(self, index: IrqIndex, vector: int) -> Vector:
        """The enabled vector (``KeyError`` if it is not)."""
        return self._vectors[make_token(index, vector)]

    def vectors(self) -> list[Vector]:
        """Every enabled vector, ordered by index and number."""
        return [self._vectors[t] for t in sorted(self._vectors)]

    def of_index(self, index: IrqIndex) -> list[Vector]:
        """The enabled vectors of ``index``, in no particular order."""
        return [v for v in self._vectors.values() if v.index is index]

    def in_use(self, index: IrqIndex) -> bool:
        """Whether ``index`` has an enabled vector."""
        return any(v.index is index for v in self._vectors.values())

    def total_of(self, vector: Vector) -> int:
        """Every eventfd signal read for ``vector`` since it was enabled."""
        return vector.total + self.poller.total(vector.eventfd.fileno())

    # -- counts and subscribers ---------------------------------------------------

    def deliver(self, token: int, count: int) -> None:
        """Credit ``count`` signals read from a vector's eventfd to its subscribers."""
        vector = self._vectors.get(token)
        if vector is None:
            # Only possible for a token the dispatcher reported after the
            # vector was released in the same round; its count was already
            # drained and credited at release.
            return
        vector.total += count
        for subscriber in vector.subscribers:
            subscriber.add_pending(vector.index, vector.number, count)

    def settle(self, vector: Vector) -> None:
        """Read what is pending on one eventfd now and credit it to the current subscribers."""
        if vector.claimed_by is not None:
            return  # its counts are the claimer's to read, not ours
        if vector.eventfd.fileno() not in self.poller:
            return  # its eventfd failed and the poller dropped it: nothing to read
        self.poller.drain_fd(vector.eventfd.fileno())

    # The poller's copy first: if it refuses, the record is unchanged.
    def join(self, vector: Vector, subscriber: Subscriber) -> None:
        """``subscriber`` receives ``vector`` from now on (once, however often joined)."""
        if subscriber in vector.subscribers:
            return
        self.poller.joined(vector.token, subscriber)
        vector.subscribers.append(subscriber)

    def leave(self, vector: Vector, subscriber: Subscriber) -> None:
        """``subscriber`` stops receiving ``vector``; settle first to credit it what it is owed."""
        self.poller.left(vector.token, subscriber)
        vector.subscribers.remove(subscriber)

    def leave_settled(self, vector: Vector, subscriber: Subscriber) -> None:
        """Credit what was read up to now, let ``subscriber`` go, release the vector if
        it was the last one."""
        self.settle(vector)
        self.leave(vector, subscriber)
        if not vector.subscribers:
            self.release(vector)

    def stop_polling(self, vector: Vector) -> None:
        """Take the vector's eventfd out of the poller (before it is closed or claimed)."""
        # A poller that credits counts itself reads the eventfd once more as it
        # lets go, and returns everything it credited that ``total`` held.
        vector.total += self.poller.remove(vector.eventfd.fileno())

    # -- adding and removing vectors ------------------------------------------------

    def enable(self, index: IrqIndex, numbers: Sequence[int]) -> str:
        """Give each of ``numbers`` a fresh eventfd on the device; all or nothing."""
        fds = {n: EventFd() for n in numbers}
        try:
            how = self.indexes.enable(index, fds, self)
        except BaseException:
            for efd in fds.values():
                efd.close()
            raise
        for number, efd in fds.items():
            self.add(Vector(index, number, efd), polled=True)
        log.info(
            "vectors.enabled",
            index=index.wire_name,
            vectors=list(numbers),
            how=how,
            host_vectors=self.indexes.host_vectors().get(index.wire_name),
        )
        return how

    def add(self, vector: Vector, *, polled: bool) -> None:
        """Record a vector whose eventfd the device has; poll it unless ``polled`` is false
        (a claimed vector's eventfd is its claimer's to read)."""
        self._vectors[vector.token] = vector
        if polled:
            self.poller.add(vector.eventfd.fileno(), vector.token)

    def release(self, vector: Vector) -> None:
        """De-assign on the device, then stop polling, then close.

        In that order: an eventfd closed while still assigned stays in the
        kernel's hands, and one closed while still polled leaves a stale epoll
        registration (irqd.hotpath.dispatcher).
        """
        index = vector.index
        try:
            self.indexes.release(index, vector.number)
        except (OSError, IrqdError) as exc:
            log.error(
                "vector.release_failed",
                index=index.wire_name,
                vector=vector.number,
                error=str(exc),
            )
        self.forget(vector)
        log.info(
            "vectors.released",
            index=index.wire_name,
            vectors=[vector.number],
            total=vector.total,
        )

    def forget(self, vector: Vector) -> None:
        """Drop the vector from the record and the poller and close this process's
        eventfd, without a device call."""
        self._vectors.pop(vector.token, None)
        with contextlib.suppress(KeyError, ValueError):
            self.stop_polling(vector)
        vector.eventfd.close()

    def forget_all(self) -> None:
        """``forget`` every vector."""
        for vector in list(self._vectors.values()):
            self.forget(vector)

    # -- around a grow (irqd.server.indexes.ResizeWatcher) ---------------------------------

    def resize_live(self, index: IrqIndex) -> dict[int, EventFd]:
        """The enabled vectors of ``index`` and their eventfds."""
        return {v.number: v.eventfd for v in self.of_index(index)}

    def resize_starting(self, index: IrqIndex) -> None:
        """Credit what is already in the eventfds before the window opens."""
        for vector in self.of_index(index):
            self.settle(vector)

    def resize_done(self, index: IrqIndex) -> None:
        """``resized`` to every subscriber of the index, then a loopback trigger."""
        live = {v.number: v for v in self.of_index(index)}
        if not live:
            return
        per_subscriber: dict[Subscriber, list[int]] = {}
        for number, vector in sorted(live.items()):
            for subscriber in vector.subscribers:
                per_subscriber.setdefault(subscriber, []).append(number)
            if vector.claimed_by is not None:
                per_subscriber.setdefault(vector.claimed_by, []).append(number)
        for subscriber, numbers in per_subscriber.items():
            subscriber.post_resized(index, numbers, True)
        for number in sorted(live):
            with contextlib.suppress(OSError):
                self.device.trigger(index, number, 1)
