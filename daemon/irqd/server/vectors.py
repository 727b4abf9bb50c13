"""The vector table: which vectors are enabled, which eventfd backs each, who subscribes.

The desired state lives here, not in the kernel: VFIO_DEVICE_SET_IRQS is not
transactional (a failure half-way through a range leaves vectors de-assigned,
and a failure in the call that enabled an index disables it), so every change
is made as single-vector calls where possible, and every failure is undone from
this table's own record before the error reaches the client.

Everything here is synchronous and runs on the Trio thread. That is what makes
counts exact: between draining a vector's eventfd and changing its subscriber
list nothing else can run, so each eventfd signal is credited to exactly the
subscribers present when it was read.

How an MSI-X vector is added (DESIGN.md):

* ``dynamic`` (NORESIZE clear, Linux 6.5+): enable once with ``start=0,
  count=1, fd=-1`` (enabling at vector N would allocate N+1 host vectors), then
  one ``count=1`` call per vector. Nothing else is touched.
* ``prearm`` (NORESIZE set): enable a bounded range once with every fd -1, then
  assign single vectors inside it. MSI-X is never disabled while vectors live.
* ``grow`` (NORESIZE set and the vector lies beyond the enabled range): disable,
  enable again with the same eventfds and -1 for gaps (QEMU's
  ``vfio_msix_vector_do_use``). Interrupts in that window are lost, so the
  subscribers of the index get ``resized`` with ``possible_loss`` and then a
  loopback trigger, which makes them look at their device.

A claimed vector (``claim``) belongs to one client: the client holds a dup of
its eventfd and reads it itself, so the vector is out of the dispatcher's epoll
set and has no subscribers; everyone else gets ``EBUSY`` for it. When the claim
ends (``unclaim`` or disconnect) the vector is released like one whose last
subscriber left: nobody else can have wanted it in between. Whatever the client
did not read stays in the eventfd, which it may still hold; nobody else reads it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from irqd.config import DEFAULT_PREARM_CAP, MsixStrategy
from irqd.device.base import Device, IrqIndex, IrqInfo
from irqd.errors import (
    EBUSY,
    EINVAL,
    EIO,
    ENODEV,
    ENOSPC,
    ConfigError,
    IrqdError,
    device_error,
)
from irqd.eventfd import EventFd
from irqd.hotpath.dispatcher import Dispatcher
from irqd.hotpath.native import NativeVectors

log = structlog.get_logger("irqd.server.vectors")

#: INTx, MSI and MSI-X cannot be enabled at the same time (vfio_pci_intrs.c:
#: "another index active" is EINVAL).
EXCLUSIVE_INDEXES = frozenset({IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX})

#: Indexes the daemon arms for itself; clients hear of them through notifications.
DAEMON_INDEXES = frozenset({IrqIndex.ERR, IrqIndex.REQ})


def make_token(index: IrqIndex, vector: int) -> int:
    """The dispatcher token for a vector: index in the high half, vector in the low."""
    return (int(index) << 16) | vector


def split_token(token: int) -> tuple[IrqIndex, int]:
    """Inverse of ``make_token``."""
    return IrqIndex(token >> 16), token & 0xFFFF


class Subscriber(Protocol):
    """What the table needs from a client session."""

    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        """Credit ``count`` interrupts of this vector; must not block."""

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        """Queue a ``resized`` notification; must not block."""


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
        return make_token(self.index, self.number)


@dataclass(frozen=True)
class SubscribeOutcome:
    """What a successful subscribe did."""

    vectors: tuple[int, ...]
    enabled: tuple[int, ...]
    how: str


@dataclass
class _IndexState:
    """What the kernel has for one index, as far as the daemon asked for it."""

    active: bool = False
    #: Host vectors enabled as one range (MSI, or MSI-X when not dynamic).
    armed: int = 0
    #: MSI-X vectors the kernel allocated one by one (dynamic); they stay
    #: allocated after de-assign until the index is disabled.
    allocated: set[int] = field(default_factory=set)

    def reset(self) -> None:
        """The index was disabled: the kernel freed every host vector."""
        self.active = False
        self.armed = 0
        self.allocated = set()


class VectorTable:
    """The daemon's record of enabled vectors and their subscribers."""

    def __init__(
        self,
        device: Device,
        dispatcher: Dispatcher | NativeVectors,
        *,
        msix_strategy: MsixStrategy = MsixStrategy.AUTO,
        msix_prearm: int | None = None,
    ) -> None:
        self.device = device
        #: Polls the vector eventfds: the Trio dispatcher, whose counts this table
        #: credits in ``deliver``, or the native hot loop, which credits them in
        #: its own thread from its copy of the subscriber lists (``_join``/``_leave``).
        self.dispatcher = dispatcher
        self._native = dispatcher if isinstance(dispatcher, NativeVectors) else None
        self.info: dict[IrqIndex, IrqInfo] = device.all_irq_info()
        self.msix_strategy = resolve_msix_strategy(self.info[IrqIndex.MSIX], msix_strategy)
        self.msix_prearm = resolve_prearm(self.info[IrqIndex.MSIX], msix_prearm)
        self._vectors: dict[int, Vector] = {}
        self._state = {index: _IndexState() for index in IrqIndex}
        self._closed = False
        self._detached = False

    # -- queries -----------------------------------------------------------------

    def lookup(self, index: IrqIndex, vector: int) -> Vector | None:
        """The enabled vector, or ``None``."""
        return self._vectors.get(make_token(index, vector))

    def vectors(self) -> list[Vector]:
        """Every enabled vector, ordered by index and number."""
        return [self._vectors[t] for t in sorted(self._vectors)]

    def enabled(self, index: IrqIndex) -> list[int]:
        """Numbers of the vectors of ``index`` that have an eventfd assigned."""
        return sorted(v.number for v in self._vectors.values() if v.index is index)

    def claimed(self, index: IrqIndex) -> list[int]:
        """Numbers of the vectors of ``index`` that a client has claimed."""
        return sorted(
            v.number
            for v in self._vectors.values()
            if v.index is index and v.claimed_by is not None
        )

    def is_active(self, index: IrqIndex) -> bool:
        """Whether the daemon has enabled ``index`` on the device."""
        return self._state[index].active

    def host_vectors(self) -> dict[str, int]:
        """Host interrupt vectors the kernel holds for MSI and MSI-X."""
        result = {}
        for index in (IrqIndex.MSI, IrqIndex.MSIX):
            state = self._state[index]
            result[index.wire_name] = max(state.armed, len(state.allocated))
        return result

    def device_info(self) -> dict[str, Any]:
        """The ``device.info`` result (docs/protocol.md)."""
        result: dict[str, Any] = {
            "device": self.device.name,
            "backend": getattr(self.device, "backend", "sim"),
            "msix_strategy": str(self.msix_strategy),
        }
        for index, info in self.info.items():
            result[index.wire_name] = {
                "count": info.count,
                "flags": info.flags,
                "noresize": info.noresize,
                "dynamic": info.dynamic,
                "active": self._state[index].active,
                "enabled": self.enabled(index),
                "claimed": self.claimed(index),
            }
        return result

    # -- the hot path --------------------------------------------------------------

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

    def _settle(self, vector: Vector) -> None:
        """Read what is pending on one eventfd now and credit it to the current subscribers."""
        if vector.claimed_by is not None:
            return  # its counts are the claimer's to read, not ours
        if vector.eventfd.fileno() not in self.dispatcher:
            return  # its eventfd failed and the poller dropped it: nothing to read
        count = self.dispatcher.drain_fd(vector.eventfd.fileno())
        if count and self._native is None:
            self.deliver(vector.token, count)

    # The native loop's copy first: if it refuses, the table is unchanged.
    def _join(self, vector: Vector, subscriber: Subscriber) -> None:
        if subscriber in vector.subscribers:
            return
        if self._native is not None:
            self._native.joined(vector.token, subscriber)
        vector.subscribers.append(subscriber)

    def _leave(self, vector: Vector, subscriber: Subscriber) -> None:
        if self._native is not None:
            self._native.left(vector.token, subscriber)
        vector.subscribers.remove(subscriber)

    def _stop_polling(self, vector: Vector) -> None:
        """Take the vector's eventfd out of the poller (before it is closed or claimed)."""
        fd = vector.eventfd.fileno()
        if self._native is None:
            self.dispatcher.remove(fd)
        else:
            # The native loop reads the eventfd once more as it lets go, and
            # counts that too.
            vector.total += self._native.remove(fd)

    def total_of(self, vector: Vector) -> int:
        """Every eventfd signal read for ``vector`` since it was enabled."""
        if self._native is None:
            return vector.total
        return vector.total + self._native.total(vector.eventfd.fileno())

    # -- subscribe / unsubscribe -----------------------------------------------------------

    def subscribe(
        self, subscriber: Subscriber, index: IrqIndex, numbers: Sequence[int]
    ) -> SubscribeOutcome:
        """Subscribe to every vector in ``numbers``, enabling those not yet enabled.

        Succeeds whole or changes nothing (``IrqdError`` then).
        """
        self._check_open()
        info = self._check_vectors(index, numbers)
        new = [n for n in numbers if self.lookup(index, n) is None]
        for number in numbers:
            self._check_unclaimed(subscriber, index, number)
        if index is IrqIndex.INTX:
            current = self.lookup(index, 0)
            if current is not None and any(s is not subscriber for s in current.subscribers):
                raise IrqdError(
                    EBUSY,
                    "INTx is level-triggered and auto-masked: it has one subscriber at a time, "
                    "and another client holds it",
                )
        how = "already"
        if new:
            self._make_room_for(index)
            how = self._enable(index, info, new)
        for number in numbers:
            vector = self._vectors[make_token(index, number)]
            # Signals read before this subscriber joins belong to the others.
            self._settle(vector)
            self._join(vector, subscriber)
        return SubscribeOutcome(vectors=tuple(numbers), enabled=tuple(new), how=how)

    def unsubscribe(
        self, subscriber: Subscriber, index: IrqIndex, numbers: Sequence[int]
    ) -> list[int]:
        """Stop ``subscriber`` receiving these vectors; the last one out de-assigns."""
        self._check_open()
        for number in numbers:
            vector = self.lookup(index, number)
            if vector is None or subscriber not in vector.subscribers:
                raise IrqdError(EINVAL, f"not subscribed to {index.wire_name} vector {number}")
        for number in numbers:
            vector = self._vectors[make_token(index, number)]
            # Signals read up to now were raised while it was subscribed.
            self._settle(vector)
            self._leave(vector, subscriber)
            if not vector.subscribers:
                self._release(vector)
        return list(numbers)

    def drop(self, subscriber: Subscriber) -> None:
        """Remove every subscription and claim of a departing client."""
        if self._detached:
            return
        for vector in self.vectors():
            if vector.claimed_by is subscriber:
                self._end_claim(vector)
            elif subscriber in vector.subscribers:
                self._settle(vector)
                self._leave(vector, subscriber)
                if not vector.subscribers:
                    self._release(vector)

    def subscriptions(self, subscriber: Subscriber) -> list[tuple[IrqIndex, int]]:
        """The (index, vector) pairs ``subscriber`` receives."""
        return [(v.index, v.number) for v in self.vectors() if subscriber in v.subscribers]

    def claims(self, subscriber: Subscriber) -> list[tuple[IrqIndex, int]]:
        """The (index, vector) pairs ``subscriber`` has claimed."""
        return [(v.index, v.number) for v in self.vectors() if v.claimed_by is subscriber]

    # -- claim / unclaim ---------------------------------------------------------------------

    def claim(self, subscriber: Subscriber, index: IrqIndex, number: int) -> int:
        """Give ``subscriber`` the vector's eventfd for itself; returns a dup of it.

        The dup is the caller's to send and close. The vector is enabled first
        if it is not. ``EBUSY`` if another client subscribes to it or claimed
        it. If ``subscriber`` itself subscribes to it, that subscription ends
        here: counts read until now are credited to it (and, since responses
        flush pending counts first, arrive before the ``claim`` response), and
        from then on the eventfd is the client's alone.
        """
        self._check_open()
        info = self._check_vectors(index, [number])
        self._check_unclaimed(subscriber, index, number)
        vector = self.lookup(index, number)
        fresh = vector is None
        if vector is None:
            self._make_room_for(index)
            self._enable(index, info, [number])
            vector = self._vectors[make_token(index, number)]
        else:
            others = sum(1 for s in vector.subscribers if s is not subscriber)
            if others:
                raise IrqdError(
                    EBUSY,
                    f"{index.wire_name} vector {number} has {others} other subscriber(s); "
                    "a claim is exclusive",
                )
        try:
            fd = os.dup(vector.eventfd.fileno())
        except OSError as exc:
            if fresh:
                self._release(vector)
            code = ENOSPC if exc.errno in (errno.EMFILE, errno.ENFILE) else EIO
            raise IrqdError(
                code, f"claim {index.wire_name} vector {number}: {exc.strerror}"
            ) from exc
        # Signals read until now belong to the subscription, if there was one
        # (the native loop's ``remove`` settles once more, atomically with
        # taking the vector out of its thread).
        self._settle(vector)
        with contextlib.suppress(KeyError):  # unless the poller dropped it already
            self._stop_polling(vector)
        vector.subscribers.clear()
        vector.claimed_by = subscriber
        log.info("vector.claimed", index=index.wire_name, vector=number, total=vector.total)
        return fd

    def unclaim(self, subscriber: Subscriber, index: IrqIndex, number: int) -> None:
        """End ``subscriber``'s claim; the vector is released (nobody else wants it)."""
        self._check_open()
        vector = self.lookup(index, number)
        if vector is None or vector.claimed_by is not subscriber:
            raise IrqdError(EINVAL, f"{index.wire_name} vector {number} is not claimed by you")
        self._end_claim(vector)

    def _end_claim(self, vector: Vector) -> None:
        vector.claimed_by = None
        # Nobody can subscribe to a claimed vector, so nobody wants it now. Its
        # eventfd is not read: what is left in it is the claimer's.
        self._release(vector)

    def _check_unclaimed(self, subscriber: Subscriber, index: IrqIndex, number: int) -> None:
        vector = self.lookup(index, number)
        if vector is None or vector.claimed_by is None:
            return
        who = "you" if vector.claimed_by is subscriber else "another client"
        raise IrqdError(EBUSY, f"{index.wire_name} vector {number} is claimed by {who}")

    # -- other requests --------------------------------------------------------------------

    def trigger(self, index: IrqIndex, numbers: Sequence[int]) -> None:
        """Loopback: ask the kernel to signal these enabled vectors' eventfds."""
        self._check_open()
        for number in numbers:
            if self.lookup(index, number) is None:
                raise IrqdError(EINVAL, f"{index.wire_name} vector {number} is not enabled")
        for number in numbers:
            try:
                self.device.trigger(index, number, 1)
            except OSError as exc:
                raise device_error(exc, f"trigger {index.wire_name} vector {number}") from exc

    def unmask(self, subscriber: Subscriber, index: IrqIndex) -> None:
        """Re-arm the auto-masked INTx line for its subscriber."""
        self._check_open()
        if index is not IrqIndex.INTX:
            raise IrqdError(
                EINVAL, "only intx is masked by the kernel; msi and msix need no unmask"
            )
        vector = self.lookup(index, 0)
        if vector is None or (
            subscriber not in vector.subscribers and vector.claimed_by is not subscriber
        ):
            raise IrqdError(EINVAL, "subscribe to (or claim) intx before unmasking it")
        try:
            self.device.unmask(IrqIndex.INTX)
        except OSError as exc:
            raise device_error(exc, "unmask intx") from exc

    def close(self) -> None:
        """De-assign and disable everything, then close the eventfds (in that order)."""
        if self._closed:
            return
        self._closed = True
        for index, state in self._state.items():
            if state.active:
                with contextlib.suppress(OSError):
                    self.device.disable(index)
                state.reset()
        for vector in list(self._vectors.values()):
            self._forget(vector)

    # -- restart without disarming (irqd.process.fdstore) -----------------------------------------

    def export_state(self, subscriber_id: Callable[[Subscriber], int]) -> dict[str, Any]:
        """The table as msgpack-able data: strategy, what the kernel has per index,
        and each vector with its total, subscribers and claimer (by ``subscriber_id``).

        The eventfds themselves travel separately (``eventfds()``).
        """
        return {
            "msix_strategy": str(self.msix_strategy),
            "msix_prearm": self.msix_prearm,
            "indexes": [
                [int(index), state.active, state.armed, sorted(state.allocated)]
                for index, state in self._state.items()
            ],
            "vectors": [
                [
                    int(v.index),
                    v.number,
                    self.total_of(v),
                    [subscriber_id(s) for s in v.subscribers],
                    None if v.claimed_by is None else subscriber_id(v.claimed_by),
                ]
                for v in self.vectors()
            ],
        }

    def eventfds(self) -> dict[tuple[IrqIndex, int], int]:
        """Every enabled vector's eventfd number, by (index, vector)."""
        return {(v.index, v.number): v.eventfd.fileno() for v in self.vectors()}

    def import_state(
        self,
        state: dict[str, Any],
        eventfds: dict[tuple[IrqIndex, int], EventFd],
        subscriber: Callable[[int], Subscriber | None],
    ) -> list[tuple[IrqIndex, int]]:
        """Take over a table that another process exported, without disarming anything.

        Vectors this table already has (armed before the import) are kept as
        they are and only gain the adopted subscribers.

        ``eventfds`` are the adopted eventfds (the table owns them from now on).
        A vector whose eventfd did not arrive gets a fresh one assigned on the
        device, a single-vector call that leaves every other vector alone; those
        are returned. Subscribers that did not arrive (``subscriber`` returns
        ``None``) are left out; a vector left with nobody is released.
        """
        self._check_open()
        self.msix_strategy = MsixStrategy(state["msix_strategy"])
        self.msix_prearm = int(state["msix_prearm"])
        for index, active, armed, allocated in state["indexes"]:
            index_state = self._state[IrqIndex(index)]
            index_state.active = bool(active)
            index_state.armed = int(armed)
            index_state.allocated = {int(n) for n in allocated}
        replaced: list[tuple[IrqIndex, int]] = []
        orphans: list[Vector] = []
        for raw_index, number, total, subscriber_ids, claimer_id in state["vectors"]:
            index = IrqIndex(raw_index)
            efd = eventfds.pop((index, number), None)
            existing = self.lookup(index, number)
            if existing is not None:
                # Armed by this process already (the daemon's own REQ/ERR
                # subscriber): keep that eventfd, add the adopted subscribers.
                if efd is not None:
                    efd.close()
                for sid in subscriber_ids:
                    found = subscriber(int(sid))
                    if found is not None:
                        self._join(existing, found)
                continue
            if efd is None:
                efd = EventFd()
                try:
                    self.device.assign_eventfds(index, number, [efd.fileno()])
                except OSError as exc:
                    efd.close()
                    log.error(
                        "vector.adopt_failed", index=index.wire_name, vector=number, error=str(exc)
                    )
                    continue
                replaced.append((index, number))
            vector = Vector(index, int(number), efd, total=int(total))
            self._vectors[vector.token] = vector
            claimer = subscriber(int(claimer_id)) if claimer_id is not None else None
            if claimer is not None:
                vector.claimed_by = claimer  # the claimer reads it; never polled here
                continue
            self.dispatcher.add(efd.fileno(), vector.token)
            for sid in subscriber_ids:
                found = subscriber(int(sid))
                if found is not None:
                    self._join(vector, found)
            if not vector.subscribers:
                orphans.append(vector)
        for efd in eventfds.values():
            efd.close()  # not in the exported record: nothing would read it
        for vector in orphans:
            self._release(vector)
        return replaced

    def detach(self) -> None:
        """The device now belongs to another process (hand-over): the table never
        calls the device again. ``drop`` does nothing, ``close`` only forgets and
        closes this process's own eventfd numbers; the kernel keeps its state."""
        self._closed = True
        self._detached = True
        for vector in list(self._vectors.values()):
            self._forget(vector)

    # -- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise IrqdError(ENODEV, "the daemon is shutting down")

    def _check_vectors(self, index: IrqIndex, numbers: Sequence[int]) -> IrqInfo:
        if index in DAEMON_INDEXES:
            # The daemon arms these with its own eventfds (device_events.py); a
            # client's eventfd would replace its trigger in the kernel.
            raise IrqdError(
                EINVAL,
                f"{index.wire_name} belongs to the daemon: every client gets ERR as the "
                "'err' notification and REQ as 'device_lost'",
            )
        info = self.info[index]
        if info.count == 0:
            raise IrqdError(EINVAL, f"the device has no {index.wire_name} interrupt")
        for number in numbers:
            if not 0 <= number < info.count:
                raise IrqdError(
                    EINVAL,
                    f"{index.wire_name} vector {number} is out of range: "
                    f"the device has {info.count} (0..{info.count - 1})",
                )
        return info

    def _make_room_for(self, index: IrqIndex) -> None:
        """Disable an idle conflicting index, or refuse if one has subscribers."""
        if index not in EXCLUSIVE_INDEXES:
            return
        for other in EXCLUSIVE_INDEXES - {index}:
            if not self._state[other].active:
                continue
            if self.enabled(other):
                raise IrqdError(
                    EBUSY,
                    f"{other.wire_name} is in use; the kernel enables only one of intx, msi "
                    f"and msix at a time",
                )
            self._disable_index(other)

    def _disable_index(self, index: IrqIndex) -> None:
        try:
            self.device.disable(index)
        except OSError as exc:
            raise device_error(exc, f"disable {index.wire_name}") from exc
        finally:
            self._state[index].reset()
        log.info("index.disabled", index=index.wire_name)

    def _enable(self, index: IrqIndex, info: IrqInfo, numbers: Sequence[int]) -> str:
        """Give each of ``numbers`` a fresh eventfd on the device; all or nothing."""
        fds = {n: EventFd() for n in numbers}
        try:
            if index is IrqIndex.MSIX:
                how = self._enable_msix(fds)
            elif index is IrqIndex.MSI:
                how = self._enable_ranged(index, fds, info.count)
            else:
                self._assign_each(index, fds)
                self._state[index].active = True
                how = "dynamic"
        except BaseException:
            for efd in fds.values():
                efd.close()
            raise
        for number, efd in fds.items():
            vector = Vector(index, number, efd)
            self._vectors[vector.token] = vector
            self.dispatcher.add(efd.fileno(), vector.token)
        log.info(
            "vectors.enabled",
            index=index.wire_name,
            vectors=list(numbers),
            how=how,
            host_vectors=self.host_vectors().get(index.wire_name),
        )
        return how

    def _enable_msix(self, fds: dict[int, EventFd]) -> str:
        state = self._state[IrqIndex.MSIX]
        strategy = self.msix_strategy
        if strategy is MsixStrategy.DYNAMIC:
            if not state.active:
                # start=0, count=1, fd=-1: enabling at vector N would allocate N+1.
                self._arm(IrqIndex.MSIX, 1)
                state.allocated = {0}
            self._assign_each(IrqIndex.MSIX, fds)
            state.allocated.update(fds)
            return "dynamic"
        highest = max(fds) + 1
        if not state.active:
            size = max(highest, self.msix_prearm if strategy is MsixStrategy.PREARM else 0)
            self._arm(IrqIndex.MSIX, size, minimum=highest)
            self._assign_each(IrqIndex.MSIX, fds)
            return "prearm" if strategy is MsixStrategy.PREARM else "resize"
        if highest <= state.armed:
            self._assign_each(IrqIndex.MSIX, fds)
            return "prearm"
        self._grow(IrqIndex.MSIX, highest, fds)
        return "resize"

    def _enable_ranged(self, index: IrqIndex, fds: dict[int, EventFd], count: int) -> str:
        """MSI: always NORESIZE, at most 32 vectors: arm the whole range once."""
        if not self._state[index].active:
            self._arm(index, count, minimum=max(fds) + 1)
        self._assign_each(index, fds)
        return "prearm"

    def _arm(self, index: IrqIndex, size: int, *, minimum: int = 1) -> None:
        """Enable ``index`` with ``size`` host vectors and no eventfd.

        The kernel answers with a positive count when fewer vectors are free;
        it has then freed them and left the index disabled, so try once more
        with that count if it still covers ``minimum``.
        """
        state = self._state[index]
        for _attempt in range(2):
            try:
                got = self.device.assign_eventfds(index, 0, [-1] * size)
            except OSError as exc:
                raise device_error(exc, f"enable {index.wire_name} with {size} vectors") from exc
            if got == 0:
                state.active = True
                state.armed = size
                return
            if got < minimum:
                break
            size = got
        raise IrqdError(
            ENOSPC,
            f"the host has only {got} {index.wire_name} vectors free; {minimum} are needed",
        )

    def _assign_each(self, index: IrqIndex, fds: dict[int, EventFd]) -> None:
        """One ``count=1`` call per vector, undone in reverse if any fails."""
        done: list[int] = []
        try:
            for number, efd in fds.items():
                try:
                    self.device.assign_eventfds(index, number, [efd.fileno()])
                except OSError as exc:
                    raise device_error(exc, f"assign {index.wire_name} vector {number}") from exc
                done.append(number)
        except BaseException:
            for number in reversed(done):
                with contextlib.suppress(OSError):
                    self.device.assign_eventfds(index, number, [-1])
            raise

    def _grow(self, index: IrqIndex, size: int, fds: dict[int, EventFd]) -> None:
        """Disable and enable again with a larger range, keeping every eventfd."""
        state = self._state[index]
        live = {v.number: v for v in self._vectors.values() if v.index is index}
        old_size = state.armed
        log.warning(
            "msix.resize",
            index=index.wire_name,
            old_size=old_size,
            new_size=size,
            live=sorted(live),
            note="interrupts raised while the index is disabled are lost",
        )
        # Credit what is already in the eventfds before the window opens.
        for vector in live.values():
            self._settle(vector)
        try:
            self._set_range(index, size, {n: v.eventfd for n, v in live.items()} | fds)
        except IrqdError:
            # Put back what was there; the subscribers may have lost interrupts
            # either way, so they are told below all the same.
            with contextlib.suppress(IrqdError):
                self._set_range(index, old_size, {n: v.eventfd for n, v in live.items()})
            self._tell_resized(index, live)
            raise
        self._tell_resized(index, live)

    def _set_range(self, index: IrqIndex, size: int, fds: dict[int, EventFd]) -> None:
        state = self._state[index]
        if state.active:
            self._disable_index(index)
        table = [-1] * size
        for number, efd in fds.items():
            table[number] = efd.fileno()
        try:
            got = self.device.assign_eventfds(index, 0, table)
        except OSError as exc:
            raise device_error(exc, f"enable {index.wire_name} with {size} vectors") from exc
        if got != 0:
            raise IrqdError(
                ENOSPC, f"the host has only {got} {index.wire_name} vectors free; {size} needed"
            )
        state.active = True
        state.armed = size

    def _tell_resized(self, index: IrqIndex, live: dict[int, Vector]) -> None:
        """``resized`` to every subscriber of the index, then a loopback trigger."""
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

    def _release(self, vector: Vector) -> None:
        """De-assign on the device, then stop polling, then close (vfio-notes.md)."""
        index = vector.index
        try:
            if index is IrqIndex.INTX:
                # Disable INTx entirely so that MSI or MSI-X can be enabled later.
                self._disable_index(index)
            else:
                self.device.assign_eventfds(index, vector.number, [-1])
        except (OSError, IrqdError) as exc:
            log.error(
                "vector.release_failed",
                index=index.wire_name,
                vector=vector.number,
                error=str(exc),
            )
        self._forget(vector)
        log.info(
            "vectors.released",
            index=index.wire_name,
            vectors=[vector.number],
            total=vector.total,
        )

    def _forget(self, vector: Vector) -> None:
        self._vectors.pop(vector.token, None)
        with contextlib.suppress(KeyError, ValueError):
            self._stop_polling(vector)
        vector.eventfd.close()


def resolve_msix_strategy(info: IrqInfo, wanted: MsixStrategy) -> MsixStrategy:
    """The strategy to use for this device's MSI-X, given what was asked for."""
    if wanted is MsixStrategy.AUTO:
        return MsixStrategy.DYNAMIC if info.dynamic else MsixStrategy.PREARM
    if wanted is MsixStrategy.DYNAMIC and info.count and not info.dynamic:
        raise ConfigError(
            "--msix-strategy dynamic: the device reports VFIO_IRQ_INFO_NORESIZE for MSI-X "
            "(dynamic MSI-X needs Linux 6.5+ and a platform that allocates vectors "
            "dynamically); use auto, prearm or grow"
        )
    return wanted


def resolve_prearm(info: IrqInfo, wanted: int | None) -> int:
    """The size of the pre-armed MSI-X range."""
    if wanted is None:
        return max(1, min(info.count, DEFAULT_PREARM_CAP))
    if not 1 <= wanted <= max(info.count, 1):
        raise ConfigError(
            f"--msix-prearm {wanted}: must be between 1 and the MSI-X table size ({info.count})"
        )
    return wanted
