"""Claims: a vector whose eventfd one client holds and reads itself.

A claimed vector (``claim``) belongs to one client: the client holds a dup of
its eventfd and reads it itself, so the vector is out of the hot loop's epoll
set and has no subscribers; everyone else gets ``EBUSY`` for it. When the claim
ends (``unclaim`` or disconnect) the vector is released like one whose last
subscriber left: nobody else can have wanted it in between. Whatever the client
did not read stays in the eventfd, which it may still hold; nobody else reads it.

The vector table (irqd.server.vectors) checks the request and calls these on
its record (irqd.server.vector_record).
"""

from __future__ import annotations

import contextlib
import errno
import os

import structlog

from irqd.device.base import IrqIndex
from irqd.errors import EBUSY, EINVAL, EIO, ENOSPC, IrqdError
from irqd.hotpath.interface import Subscriber
from irqd.server.vector_record import Vector, VectorRecord

log = structlog.get_logger("irqd.server.vectors")


def check_unclaimed(
    record: VectorRecord, subscriber: Subscriber, index: IrqIndex, number: int
) -> None:
    """``EBUSY`` if the vector is claimed (by anyone, ``subscriber`` included)."""
    vector = record.lookup(index, number)
    if vector is None or vector.claimed_by is None:
        return
    who = "you" if vector.claimed_by is subscriber else "another client"
    raise IrqdError(EBUSY, f"{index.wire_name} vector {number} is claimed by {who}")


def take_claim(record: VectorRecord, subscriber: Subscriber, index: IrqIndex, number: int) -> int:
    """Give ``subscriber`` the vector's eventfd for itself, enabling the vector if it
    is not; returns a dup of the eventfd (the caller's to send and close).

    The caller has checked the vector number and that nobody claimed it.
    ``EBUSY`` if another client subscribes to it. If ``subscriber`` itself
    subscribes to it, that subscription ends here: counts read until now are
    credited to it (and, since responses flush pending counts first, arrive
    before the ``claim`` response), and from then on the eventfd is the
    client's alone.
    """
    vector = record.lookup(index, number)
    fresh = vector is None
    if vector is None:
        record.indexes.make_room_for(index, record.in_use)
        record.enable(index, [number])
        vector = record.get(index, number)
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
            record.release(vector)
        code = ENOSPC if exc.errno in (errno.EMFILE, errno.ENFILE) else EIO
        raise IrqdError(code, f"claim {index.wire_name} vector {number}: {exc.strerror}") from exc
    # Signals read until now belong to the subscription, if there was one
    # (the native loop's ``remove`` settles once more, atomically with
    # taking the vector out of its thread).
    record.settle(vector)
    with contextlib.suppress(KeyError):  # unless the poller dropped it already
        record.stop_polling(vector)
    vector.subscribers.clear()
    vector.claimed_by = subscriber
    log.info("vector.claimed", index=index.wire_name, vector=number, total=vector.total)
    return fd


def give_back_claim(
    record: VectorRecord, subscriber: Subscriber, index: IrqIndex, number: int
) -> None:
    """End ``subscriber``'s claim (``EINVAL`` if it has none on the vector)."""
    vector = record.lookup(index, number)
    if vector is None or vector.claimed_by is not subscriber:
        raise IrqdError(EINVAL, f"{index.wire_name} vector {number} is not claimed by you")
    end_claim(record, vector)


def end_claim(record: VectorRecord, vector: Vector) -> None:
    """End the claim on ``vector``; the vector is released (nobody else wants it)."""
    vector.claimed_by = None
    # Nobody can subscribe to a claimed vector, so nobody wants it now. Its
    # eventfd is not read: what is left in it is the claimer's.
    record.release(vector)
