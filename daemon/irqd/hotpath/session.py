"""One client connection as the daemon sees it, whichever hot loop serves it.

:class:`Session` is the one interface of a client session: its identity and
request bookkeeping (here), and its output path (abstract, public methods)
that each hot loop implements: :class:`irqd.hotpath.python_session.PythonSession`
(Python's own coalescing counters, written by a Trio sender task) and
:class:`irqd.hotpath.native_session.NativeSession` (the extension's counters
and output queue, written by its thread). Both keep the same guarantees:

* interrupt counts are never queued as messages but added to a per-vector
  counter, so a client that stops reading costs one integer per subscribed
  vector and slows nobody else;
* control notifications coalesce too (:class:`PendingControl`): while
  unsent, ``err`` counts add up, ``resized`` for an index merge, and
  ``shutdown`` and ``device_lost`` are held once each, so what such a client
  costs stays bounded whatever the device and the daemon do;
* what was posted is written ahead of the counts pending with it, so a
  ``resized`` reaches the client before the count of the loopback trigger
  that follows it;
* messages never interleave, and ``respond`` writes everything pending first:
  when a client reads the answer to ``unsubscribe``, every count for that
  subscription is already in front of it;
* for a hand-over (irqd.process.fdstore) the output can be held at a message
  boundary, exported (``export_output``) and restored in the next process;
* with a :class:`irqd.hotpath.guard.StreamGuard` attached to the hot loop, the
  session has a slot there (``guard_slot``) whose byte is 0 whenever its
  stream is at a message boundary, so that after a crash the next process
  knows which client connections it can carry on.
"""

from __future__ import annotations

import array
import errno
import socket
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from irqd.device.base import IrqIndex
from irqd.hotpath.guard import StreamGuard, atomic_send_limit
from irqd.stats import LatencyHistogram
from irqproto.codec import encode
from irqproto.messages import to_wire
from irqproto.notifications import (
    DeviceLostNotification,
    ErrNotification,
    IrqNotification,
    ResizedNotification,
    ShutdownNotification,
    TypedNotification,
    encode_irq,
)

#: include/net/scm.h: the most fds one SCM_RIGHTS message may carry.
SCM_MAX_FD = 253

#: include/uapi/asm-generic/socket.h (Linux 4.13+): the peer's supplementary
#: groups as of connect(); Python's socket module has no name for it.
SO_PEERGROUPS = 59

#: include/uapi/linux/limits.h NGROUPS_MAX: the most groups a process can have.
NGROUPS_MAX = 65536


@dataclass(frozen=True)
class PeerCredentials:
    """``SO_PEERCRED`` and ``SO_PEERGROUPS`` of a Unix socket peer.

    The kernel records them when the peer calls ``connect()``: a process that
    changes its ids later, or passes the socket on, keeps what it had then.
    """

    pid: int
    uid: int
    gid: int
    #: Supplementary groups (``SO_PEERGROUPS``); empty where the kernel lacks it.
    groups: frozenset[int] = frozenset()

    @classmethod
    def of(cls, sock: trio.socket.SocketType) -> PeerCredentials:
        """Read the credentials the kernel recorded when the peer connected."""
        fmt = "3i"
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
        pid, uid, gid = struct.unpack(fmt, raw)
        return cls(pid, uid, gid, _peer_groups(sock))


def _peer_groups(sock: trio.socket.SocketType) -> frozenset[int]:
    # Try a buffer for 64 groups first; ERANGE means the peer has more.
    for count in (64, NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            if exc.errno == errno.ENOPROTOOPT:  # before Linux 4.13
                return frozenset()
            raise
        groups = array.array("I")
        groups.frombytes(raw[: len(raw) - len(raw) % 4])
        return frozenset(groups)
    return frozenset()


def encode_counts(index: IrqIndex, counts: dict[int, int]) -> bytes:
    """One ``irq`` notification carrying every pending count of ``index``."""
    flat: list[int] = []
    for vector in sorted(counts):
        flat.append(vector)
        flat.append(counts[vector])
    return encode_irq(index.wire_name, flat)


def encode_notification(notification: TypedNotification) -> bytes:
    """The wire bytes of a control notification."""
    return encode(to_wire(notification.to_message()))


@dataclass
class PendingControl:
    """A session's unsent control notifications, coalesced as counts are.

    At most one of each: an ``err`` whose count is the sum of every ERR posted
    since the last one was written; one ``resized`` per index, naming the union
    of the vectors posted and ``possible_loss`` if any of them had it; one
    ``device_lost`` and one ``shutdown``, each keeping the first reason posted
    (the cause; anything later is a consequence of it). Written in that order,
    resized by index, ahead of the counts pending at the time.
    """

    err: int = 0
    resized: dict[IrqIndex, tuple[frozenset[int], bool]] = field(default_factory=dict)
    device_lost: DeviceLostNotification | None = None
    shutdown: ShutdownNotification | None = None

    def __bool__(self) -> bool:
        return bool(self.err or self.resized or self.device_lost or self.shutdown)

    def __len__(self) -> int:
        """How many notifications this writes."""
        return (
            (self.err > 0)
            + len(self.resized)
            + (self.device_lost is not None)
            + (self.shutdown is not None)
        )

    def copy(self) -> PendingControl:
        """An independent copy (the sets inside are immutable)."""
        return PendingControl(self.err, dict(self.resized), self.device_lost, self.shutdown)

    def add_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        """Merge a ``resized``: vectors unioned, ``possible_loss`` or-ed."""
        known, loss = self.resized.get(index, (frozenset(), False))
        self.resized[index] = (known.union(vectors), loss or possible_loss)

    def add(self, notification: TypedNotification) -> None:
        """Merge a control notification; ``TypeError`` for ``irq`` (counts are credited)."""
        if isinstance(notification, ErrNotification):
            self.err += notification.count
        elif isinstance(notification, ResizedNotification):
            index = IrqIndex.from_wire(notification.index)
            self.add_resized(index, notification.vectors, notification.possible_loss)
        elif isinstance(notification, DeviceLostNotification):
            self.device_lost = self.device_lost or notification
        elif isinstance(notification, ShutdownNotification):
            self.shutdown = self.shutdown or notification
        else:
            assert isinstance(notification, IrqNotification)
            raise TypeError("irq counts are credited with add_pending, not posted")

    def notifications(self) -> list[TypedNotification]:
        """The notifications to write, in order."""
        out: list[TypedNotification] = [
            ResizedNotification(index.wire_name, tuple(sorted(vectors)), loss)
            for index, (vectors, loss) in sorted(self.resized.items())
        ]
        if self.err:
            out.append(ErrNotification(self.err))
        if self.device_lost is not None:
            out.append(self.device_lost)
        if self.shutdown is not None:
            out.append(self.shutdown)
        return out

    def encode(self) -> bytes:
        """The wire bytes of every notification held, in order."""
        return b"".join(encode_notification(n) for n in self.notifications())


@dataclass
class SessionOutput:
    """Everything a session has not written yet, as ``export_output`` hands it over."""

    #: Unsent interrupt counts: ``(index, vector, count)``.
    pending: list[tuple[IrqIndex, int, int]] = field(default_factory=list)
    #: Unsent ``resized`` notifications: ``(index, vectors, possible_loss)``.
    resized: list[tuple[IrqIndex, list[int], bool]] = field(default_factory=list)
    #: Encoded bytes due before anything else (a message may be half written).
    outbox: list[bytes] = field(default_factory=list)


class Session(ABC):
    """A connected client as the vector table, the handlers and the client loop see it.

    The output path is abstract: each hot loop's session class implements the
    public methods below (``add_pending`` ... ``close_output``); identity,
    request bookkeeping and the hand-over's state format are shared here.
    """

    def __init__(
        self,
        sock: trio.socket.SocketType,
        session_id: int,
        peer: PeerCredentials,
        latency: LatencyHistogram,
        guard: StreamGuard | None = None,
    ) -> None:
        self.sock = sock
        self.id = session_id
        self.peer = peer
        self.name = ""
        self.greeted = False
        self.latency = latency
        self.connected_at = time.monotonic()
        #: ``trio.current_time()`` of the last request, for the idle limit.
        self.last_request = trio.current_time()
        self.requests = 0
        #: Why the output path gave up, when it was the one to end the session.
        self.close_reason: str | None = None
        #: Held for every write, so that messages never interleave; held for
        #: good by ``hold_output`` during a hand-over.
        self._lock = trio.Lock()
        self._guard = guard
        #: This session's byte in the hot loop's :class:`StreamGuard` (0: the
        #: stream is at a message boundary); ``None`` without a guard or when
        #: every slot was taken, and then nothing proves where the stream is.
        self.guard_slot: int | None = guard.allocate() if guard is not None else None
        #: The largest send to this client that is all-or-nothing (what may
        #: go out unmarked); read once, here (``atomic_send_limit``).
        self.atomic_max = atomic_send_limit(sock.fileno()) if self.guard_slot is not None else 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.name!r} pid={self.peer.pid}>"

    # -- the output path: called synchronously by the table and the handlers ----------

    @property
    @abstractmethod
    def delivered(self) -> int:
        """Interrupts written to the client so far (carried across a hand-over)."""

    @property
    @abstractmethod
    def notifications(self) -> int:
        """Notifications written to the client so far (carried across a hand-over)."""

    @abstractmethod
    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        """Credit interrupts; coalesces with whatever is still unsent. Never blocks."""

    @abstractmethod
    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        """Queue a ``resized`` notification, ahead of any count credited after it;
        merges with one for the same index still unsent. Never blocks."""

    @abstractmethod
    def post(self, notification: TypedNotification) -> None:
        """Queue a control notification (``shutdown``, ``device_lost``, ``err``);
        merges with one still unsent (:class:`PendingControl`). Never blocks."""

    @abstractmethod
    def pending_counters(self) -> int:
        """How many (index, vector) counters are waiting: the memory a slow client costs."""

    @abstractmethod
    def pending_total(self) -> int:
        """Interrupts credited but not yet written to the socket."""

    @abstractmethod
    def pending_control(self) -> int:
        """Control notifications waiting, coalesced (:class:`PendingControl`): at most
        one ``err``, one ``resized`` per index, one ``device_lost``, one ``shutdown``."""

    # -- the output path: Trio -----------------------------------------------------------

    @abstractmethod
    async def run_sender(self) -> None:
        """Until cancelled: write what is pending; ``OSError`` once the socket failed."""

    @abstractmethod
    async def respond(self, response: bytes, fds: Sequence[int] = ()) -> None:
        """Write a response, after everything pending; ``fds`` ride on its first byte."""

    @abstractmethod
    async def flush(self) -> None:
        """Write whatever is pending now."""

    @abstractmethod
    def close_output(self) -> None:
        """The session is over; called before its socket is closed. Idempotent."""

    def _release_guard_slot(self) -> None:
        """Give the guard slot back (zeroed): the session's output has ended.
        Called by ``close_output`` once nothing writes the stream any more."""
        slot, self.guard_slot = self.guard_slot, None
        if slot is not None and self._guard is not None:
            self._guard.release(slot)

    # -- restart without disconnecting (irqd.process.fdstore) ------------------------------

    async def hold_output(self) -> None:
        """Take the output lock for good: a message being written is finished first,
        and nothing is written afterwards. Released by ``release_output``."""
        await self._lock.acquire()

    def release_output(self) -> None:
        """Give back the lock ``hold_output`` took (a hand-over that was called off)."""
        self._lock.release()

    @abstractmethod
    def export_output(self) -> SessionOutput:
        """Everything not yet written, taken out for the next process; output held."""

    @abstractmethod
    def restore_output(self, outbox: list[bytes]) -> None:
        """Queue bytes another process left unsent, ahead of anything else."""

    @abstractmethod
    def restore_counters(self, delivered: int, notifications: int) -> None:
        """Take over what the previous process had delivered and written."""

    def export_state(self) -> dict[str, Any]:
        """What a new daemon process needs to carry on this session: identity,
        counters and everything not yet written (pending counts, ``resized``,
        queued notifications), as msgpack-able data. Call with the output held."""
        output = self.export_output()
        return {
            "id": self.id,
            "name": self.name,
            "greeted": self.greeted,
            "requests": self.requests,
            "delivered": self.delivered,
            "notifications": self.notifications,
            "connected_for": time.monotonic() - self.connected_at,
            "pending": [[int(index), vector, count] for index, vector, count in output.pending],
            "resized": [
                [int(index), sorted(vectors), loss] for index, vectors, loss in output.resized
            ],
            "outbox": output.outbox,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take over the counters and unsent output ``export_state`` described.

        The unsent bytes go first: the previous process may have written part of
        a message, whose rest must be the next thing on the wire.
        """
        self.name = str(state["name"])
        self.greeted = bool(state["greeted"])
        self.requests = int(state["requests"])
        self.restore_counters(int(state["delivered"]), int(state["notifications"]))
        self.connected_at = time.monotonic() - float(state["connected_for"])
        self.restore_output([bytes(b) for b in state["outbox"]])
        # ``resized`` before the counts: it was posted before the loopback
        # trigger whose count may be among them (a session writes what was
        # posted ahead of pending counts).
        for index, vectors, loss in state["resized"]:
            self.post_resized(IrqIndex(index), [int(v) for v in vectors], bool(loss))
        for index, vector, count in state["pending"]:
            self.add_pending(IrqIndex(index), int(vector), int(count))
