"""The vector table: which vectors are enabled, which eventfd backs each, who subscribes.

The desired state lives here, not in the kernel: VFIO_DEVICE_SET_IRQS is not
transactional (a failure half-way through a range leaves vectors de-assigned,
and a failure in the call that enabled an index disables it), so every change
is made as single-vector calls where possible, and every failure is undone from
this table's own record before the error reaches the client.

The table checks each request and carries it out on its parts, one job each:

* irqd.server.vector_record: the enabled vectors, their eventfds in the hot
  loop and their subscribers; why counts are exact;
* irqd.server.indexes: what the kernel has per index, and how a vector gets
  there (the MSI-X strategies). A grow there disables MSI-X for a moment:
  interrupts in that window are lost, so the subscribers of the index get
  ``resized`` with ``possible_loss`` and then a loopback trigger, which makes
  them look at their device;
* irqd.server.claims: a vector one client holds and reads itself;
* irqd.server.table_state: the record across a restart without disarming.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from irqd.config import MsixStrategy
from irqd.device.base import Device, IrqIndex, IrqInfo
from irqd.errors import EBUSY, EINVAL, ENODEV, IrqdError, device_error
from irqd.eventfd import EventFd
from irqd.hotpath.interface import Subscriber, VectorPoller
from irqd.server import table_state
from irqd.server.claims import check_unclaimed, end_claim, give_back_claim, take_claim
from irqd.server.indexes import (
    EXCLUSIVE_INDEXES,
    DeviceIndexes,
    resolve_msix_strategy,
    resolve_prearm,
)
from irqd.server.vector_record import Vector, VectorRecord
from irqd.tokens import make_token, split_token

#: Indexes the daemon arms for itself; clients hear of them through notifications.
DAEMON_INDEXES = frozenset({IrqIndex.ERR, IrqIndex.REQ})


__all__ = [
    "DAEMON_INDEXES",
    "EXCLUSIVE_INDEXES",
    "SubscribeOutcome",
    "Subscriber",
    "Vector",
    "VectorTable",
    "make_token",
    "resolve_msix_strategy",
    "resolve_prearm",
    "split_token",
]


@dataclass(frozen=True)
class SubscribeOutcome:
    """What a successful subscribe did."""

    vectors: tuple[int, ...]
    enabled: tuple[int, ...]
    how: str


class VectorTable:
    """The daemon's record of enabled vectors and their subscribers."""

    def __init__(
        self,
        device: Device,
        poller: VectorPoller,
        *,
        msix_strategy: MsixStrategy = MsixStrategy.AUTO,
        msix_prearm: int | None = None,
    ) -> None:
        self.device = device
        #: Polls the vector eventfds: the hot loop (irqd.hotpath.interface).
        self.poller = poller
        self.info: dict[IrqIndex, IrqInfo] = device.all_irq_info()
        #: What the kernel has per index; enables vectors on the device.
        self.indexes = DeviceIndexes(
            device, self.info, msix_strategy=msix_strategy, msix_prearm=msix_prearm
        )
        self._record = VectorRecord(device, poller, self.indexes)
        self._packer = table_state.RecordPacker()
        self._closed = False
        self._detached = False

    # -- queries -----------------------------------------------------------------

    def lookup(self, index: IrqIndex, vector: int) -> Vector | None:
        """The enabled vector, or ``None``."""
        return self._record.lookup(index, vector)

    def vectors(self) -> list[Vector]:
        """Every enabled vector, ordered by index and number."""
        return self._record.vectors()

    def enabled(self, index: IrqIndex) -> list[int]:
        """Numbers of the vectors of ``index`` that have an eventfd assigned."""
        return sorted(v.number for v in self._record.of_index(index))

    def claimed(self, index: IrqIndex) -> list[int]:
        """Numbers of the vectors of ``index`` that a client has claimed."""
        return sorted(v.number for v in self._record.of_index(index) if v.claimed_by is not None)

    @property
    def msix_strategy(self) -> MsixStrategy:
        """How MSI-X vectors are added (``auto`` made concrete)."""
        return self.indexes.msix_strategy

    @property
    def msix_prearm(self) -> int:
        """The size of the pre-armed MSI-X range."""
        return self.indexes.msix_prearm

    def is_active(self, index: IrqIndex) -> bool:
        """Whether the daemon has enabled ``index`` on the device."""
        return self.indexes.is_active(index)

    def host_vectors(self) -> dict[str, int]:
        """Host interrupt vectors the kernel holds for MSI and MSI-X."""
        return self.indexes.host_vectors()

    def device_info(self) -> dict[str, Any]:
        """The ``device.info`` result (docs/protocol.md)."""
        result: dict[str, Any] = {
            "device": self.device.name,
            "backend": self.device.backend,
            "msix_strategy": str(self.msix_strategy),
        }
        for index, info in self.info.items():
            result[index.wire_name] = {
                "count": info.count,
                "flags": info.flags,
                "noresize": info.noresize,
                "dynamic": info.dynamic,
                "active": self.indexes.is_active(index),
                "enabled": self.enabled(index),
                "claimed": self.claimed(index),
            }
        return result

    def total_of(self, vector: Vector) -> int:
        """Every eventfd signal read for ``vector`` since it was enabled."""
        return self._record.total_of(vector)

    def deliver(self, token: int, count: int) -> None:
        """Credit ``count`` signals read from a vector's eventfd to its subscribers
        (what the poller calls; tests drive it by hand)."""
        self._record.deliver(token, count)

    # -- subscribe / unsubscribe -----------------------------------------------------------

    def subscribe(
        self, subscriber: Subscriber, index: IrqIndex, numbers: Sequence[int]
    ) -> SubscribeOutcome:
        """Subscribe to every vector in ``numbers``, enabling those not yet enabled.

        Succeeds whole or changes nothing (``IrqdError`` then).
        """
        self._check_open()
        self._check_vectors(index, numbers)
        record = self._record
        new = [n for n in numbers if record.lookup(index, n) is None]
        for number in numbers:
            check_unclaimed(record, subscriber, index, number)
        if index is IrqIndex.INTX:
            current = record.lookup(index, 0)
            if current is not None and any(s is not subscriber for s in current.subscribers):
                raise IrqdError(
                    EBUSY,
                    "INTx is level-triggered and auto-masked: it has one subscriber at a time, "
                    "and another client holds it",
                )
        how = "already"
        if new:
            self.indexes.make_room_for(index, record.in_use)
            how = record.enable(index, new)
        for number in numbers:
            vector = record.get(index, number)
            # Signals read before this subscriber joins belong to the others.
            record.settle(vector)
            record.join(vector, subscriber)
        return SubscribeOutcome(vectors=tuple(numbers), enabled=tuple(new), how=how)

    def unsubscribe(
        self, subscriber: Subscriber, index: IrqIndex, numbers: Sequence[int]
    ) -> list[int]:
        """Stop ``subscriber`` receiving these vectors; the last one out de-assigns."""
        self._check_open()
        for number in numbers:
            vector = self._record.lookup(index, number)
            if vector is None or subscriber not in vector.subscribers:
                raise IrqdError(EINVAL, f"not subscribed to {index.wire_name} vector {number}")
        for number in numbers:
            # Signals read up to now were raised while it was subscribed.
            self._record.leave_settled(self._record.get(index, number), subscriber)
        return list(numbers)

    def drop(self, subscriber: Subscriber) -> None:
        """Remove every subscription and claim of a departing client."""
        if self._detached:
            return
        for vector in self.vectors():
            if vector.claimed_by is subscriber:
                end_claim(self._record, vector)
            elif subscriber in vector.subscribers:
                self._record.leave_settled(vector, subscriber)

    def subscriptions(self, subscriber: Subscriber) -> list[tuple[IrqIndex, int]]:
        """The (index, vector) pairs ``subscriber`` receives."""
        return [(v.index, v.number) for v in self.vectors() if subscriber in v.subscribers]

    def claims(self, subscriber: Subscriber) -> list[tuple[IrqIndex, int]]:
        """The (index, vector) pairs ``subscriber`` has claimed."""
        return [(v.index, v.number) for v in self.vectors() if v.claimed_by is subscriber]

    # -- claim / unclaim (irqd.server.claims) ----------------------------------------------

    def claim(self, subscriber: Subscriber, index: IrqIndex, number: int) -> int:
        """Give ``subscriber`` the vector's eventfd for itself; returns a dup of it.

        The dup is the caller's to send and close. The vector is enabled first
        if it is not. ``EBUSY`` if another client subscribes to it or claimed
        it. If ``subscriber`` itself subscribes to it, that subscription ends
        here (``irqd.server.claims.take_claim``).
        """
        self._check_open()
        self._check_vectors(index, [number])
        check_unclaimed(self._record, subscriber, index, number)
        return take_claim(self._record, subscriber, index, number)

    def unclaim(self, subscriber: Subscriber, index: IrqIndex, number: int) -> None:
        """End ``subscriber``'s claim; the vector is released (nobody else wants it)."""
        self._check_open()
        give_back_claim(self._record, subscriber, index, number)

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
        self.indexes.close()
        self._record.forget_all()

    # -- restart without disarming (irqd.server.table_state) -------------------------------

    def packed_state(self, ids: Mapping[int, int]) -> bytes:
        """The table as msgpack: strategy, what the kernel has per index, and each
        vector with its total, subscribers and claimer (``ids`` maps
        ``id(subscriber)`` to the id the next process knows it by; others are -1).

        Cheap again and again: what did not change since the last call is not
        packed again (``table_state.RecordPacker``). The eventfds themselves
        travel separately (``eventfds()``).
        """
        return self._packer.pack(self._record, ids)

    def eventfds(self) -> dict[tuple[IrqIndex, int], int]:
        """Every enabled vector's eventfd number, by (index, vector)."""
        return table_state.eventfds_of(self._record)

    def import_state(
        self,
        state: dict[str, Any],
        eventfds: dict[tuple[IrqIndex, int], EventFd],
        subscriber: Callable[[int], Subscriber | None],
    ) -> list[tuple[IrqIndex, int]]:
        """Take over a table that another process exported, without disarming anything;
        returns the vectors that got a fresh eventfd (``table_state.import_record``)."""
        self._check_open()
        return table_state.import_record(self._record, state, eventfds, subscriber)

    def detach(self) -> None:
        """The device now belongs to another process (hand-over): the table never
        calls the device again. ``drop`` does nothing, ``close`` only forgets and
        closes this process's own eventfd numbers; the kernel keeps its state."""
        self._closed = True
        self._detached = True
        self._record.forget_all()

    # -- checks ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise IrqdError(ENODEV, "the daemon is shutting down")

    def _check_vectors(self, index: IrqIndex, numbers: Sequence[int]) -> IrqInfo:
        if index in DAEMON_INDEXES:
            # The daemon arms these with its own eventfds (irqd.device.events); a
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
