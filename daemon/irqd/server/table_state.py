"""The vector table's state across a restart without disarming (irqd.process.fdstore).

The old process exports its record as msgpack-able data (``export_record``)
and its eventfds apart (they travel through the fd store); the new one takes
both over (``import_record``) without a device call, except for a vector whose
eventfd did not arrive: that one gets a fresh eventfd assigned, a single-vector
call that leaves every other vector alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog

from irqd.config import MsixStrategy
from irqd.device.base import IrqIndex
from irqd.eventfd import EventFd
from irqd.hotpath.interface import Subscriber
from irqd.server.vector_record import Vector, VectorRecord

log = structlog.get_logger("irqd.server.vectors")


def export_record(
    record: VectorRecord, subscriber_id: Callable[[Subscriber], int]
) -> dict[str, Any]:
    """Strategy, what the kernel has per index, and each vector with its total,
    subscribers and claimer (by ``subscriber_id``)."""
    indexes = record.indexes
    return {
        "msix_strategy": str(indexes.msix_strategy),
        "msix_prearm": indexes.msix_prearm,
        "indexes": indexes.export_state(),
        "vectors": [
            [
                int(v.index),
                v.number,
                record.total_of(v),
                [subscriber_id(s) for s in v.subscribers],
                None if v.claimed_by is None else subscriber_id(v.claimed_by),
            ]
            for v in record.vectors()
        ],
    }


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
