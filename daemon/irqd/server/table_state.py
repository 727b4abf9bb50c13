"""The vector table's state across a restart without disarming (irqd.process.fdstore).

The old process packs its record (``RecordPacker``, which keeps what did
not change packed, for the ``live-state`` record rewritten after every change)
and passes its eventfds apart (they travel through the fd store); the new one takes
both over (``import_record``) without a device call, except for a vector whose
eventfd did not arrive: that one gets a fresh eventfd assigned, a single-vector
call that leaves every other vector alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import structlog

from irqd.config import MsixStrategy
from irqd.device.base import IrqIndex
from irqd.eventfd import EventFd
from irqd.hotpath.interface import Subscriber
from irqd.packing import Packed, pack_map
from irqd.server.vector_record import Vector, VectorRecord

log = structlog.get_logger("irqd.server.vectors")


@dataclass
class _PackedVector:
    """What one vector's entry was packed from, and the parts that stay."""

    vector: Vector
    #: A copy of its subscriber list and its claimer, as packed.
    subscribers: list[Subscriber]
    claimed_by: Subscriber | None
    #: The entry's array header, index and number.
    head: bytes
    #: Its subscribers' ids and its claimer's id.
    tail: bytes

    def is_current(self, vector: Vector, changed_ids: set[int]) -> bool:
        """Whether ``vector``'s entry is still ``head``, a total, ``tail``."""
        if self.vector is not vector or self.claimed_by is not vector.claimed_by:
            return False
        if self.subscribers != vector.subscribers:
            return False
        if changed_ids:
            used = [id(s) for s in self.subscribers]
            if self.claimed_by is not None:
                used.append(id(self.claimed_by))
            return changed_ids.isdisjoint(used)
        return True


class RecordPacker:
    """The vector record as msgpack bytes, for a record packed again after every change.

    The ``live-state`` record (irqd.process.crashstate) is rewritten after every
    request that changes anything. Mapping every subscriber of every vector
    to its session id each time costs in proportion to vectors x subscribers
    (2048 x 64 took about 24 ms a request; docs/performance.md). Between two
    calls only the totals change for most vectors, so each vector's entry is
    kept packed and only its total is packed anew; an entry is packed again
    when its subscriber list or claimer changed, or the id of one of them.

    ``ids`` maps ``id(subscriber)`` to the id under which the next process
    knows it (a session's id); a subscriber not in it is ``-1``, which the
    next process leaves out. The cache holds the subscribers it packed, so
    none of their ``id()`` is reused by another object while it is kept.
    """

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)
        self._ids: dict[int, int] = {}
        self._vectors: dict[int, _PackedVector] = {}

    def pack(self, record: VectorRecord, ids: Mapping[int, int]) -> bytes:
        """``{msix_strategy, msix_prearm, indexes, vectors}``, each vector as
        ``[index, number, total, [subscriber ids], claimer id or None]``."""
        changed = {k for k in self._ids.keys() | ids.keys() if self._ids.get(k) != ids.get(k)}
        self._ids = dict(ids)
        pack = self._packer.pack
        vectors = record.vectors()
        kept: dict[int, _PackedVector] = {}
        parts = [self._packer.pack_array_header(len(vectors))]
        for vector in vectors:
            entry = self._vectors.get(vector.token)
            if entry is None or not entry.is_current(vector, changed):
                entry = self._pack_vector(vector)
            kept[vector.token] = entry
            parts += (entry.head, pack(record.total_of(vector)), entry.tail)
        self._vectors = kept
        indexes = record.indexes
        return pack_map(
            {
                "msix_strategy": str(indexes.msix_strategy),
                "msix_prearm": indexes.msix_prearm,
                "indexes": indexes.export_state(),
                "vectors": Packed(b"".join(parts)),
            }
        )

    def _pack_vector(self, vector: Vector) -> _PackedVector:
        pack, ids = self._packer.pack, self._ids
        claimer = vector.claimed_by
        head = self._packer.pack_array_header(5) + pack(int(vector.index)) + pack(vector.number)
        tail = pack([ids.get(id(s), -1) for s in vector.subscribers]) + pack(
            None if claimer is None else ids.get(id(claimer), -1)
        )
        return _PackedVector(vector, list(vector.subscribers), claimer, head, tail)


def eventfds_of(record: VectorRecord) -> dict[tuple[IrqIndex, int], int]:
    """Every enabled vector's eventfd number, by (index, vector)."""
    return {(v.index, v.number): v.eventfd.fileno() for v in record.vectors()}


def import_record(
    record: VectorRecord,
    state: dict[str, Any],
    eventfds: dict[tuple[IrqIndex, int], EventFd],
    subscriber: Callable[[int], Subscriber | None],
) -> list[tuple[IrqIndex, int]]:
    """Take over a record that another process exported, without disarming anything.

    Vectors the record already has (armed before the import) are kept as they
    are and only gain the adopted subscribers.

    ``eventfds`` are the adopted eventfds (the record owns them from now on).
    A vector whose eventfd did not arrive gets a fresh one assigned on the
    device; those are returned. Subscribers that did not arrive (``subscriber``
    returns ``None``) are left out; a vector left with nobody is released.
    """
    record.indexes.msix_strategy = MsixStrategy(state["msix_strategy"])
    record.indexes.msix_prearm = int(state["msix_prearm"])
    record.indexes.import_state(state["indexes"])
    replaced: list[tuple[IrqIndex, int]] = []
    orphans: list[Vector] = []
    for raw_index, number, total, subscriber_ids, claimer_id in state["vectors"]:
        index = IrqIndex(raw_index)
        efd = eventfds.pop((index, number), None)
        subscribers = [s for s in map(subscriber, map(int, subscriber_ids)) if s is not None]
        existing = record.lookup(index, number)
        if existing is not None:
            # Armed by this process already (the daemon's own REQ/ERR
            # subscriber): keep that eventfd, add the adopted subscribers.
            if efd is not None:
                efd.close()
            for found in subscribers:
                record.join(existing, found)
            continue
        if efd is None:
            efd = _reassign(record, index, number)
            if efd is None:
                continue
            replaced.append((index, number))
        vector = Vector(index, int(number), efd, total=int(total))
        claimer = subscriber(int(claimer_id)) if claimer_id is not None else None
        if claimer is not None:
            vector.claimed_by = claimer  # the claimer reads it; never polled here
            record.add(vector, polled=False)
            continue
        record.add(vector, polled=True)
        for found in subscribers:
            record.join(vector, found)
        if not vector.subscribers:
            orphans.append(vector)
    for efd in eventfds.values():
        efd.close()  # not in the exported record: nothing would read it
    for vector in orphans:
        record.release(vector)
    return replaced


def _reassign(record: VectorRecord, index: IrqIndex, number: int) -> EventFd | None:
    """A fresh eventfd for an adopted vector whose own did not arrive; ``None``
    (logged) if the device refuses it."""
    efd = EventFd()
    try:
        record.device.assign_eventfds(index, number, [efd.fileno()])
    except OSError as exc:
        efd.close()
        log.error("vector.adopt_failed", index=index.wire_name, vector=number, error=str(exc))
        return None
    return efd
