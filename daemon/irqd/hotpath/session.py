"""One client connection: its output path and its coalescing interrupt counters.

Interrupt counts are never queued as messages. The dispatcher adds them to a
per-vector counter and wakes the session's sender, which turns everything
pending into one ``irq`` notification per index when the socket can take it.
A client that stops reading therefore costs one integer per subscribed vector
and slows nobody else: the dispatcher only ever increments and sets an event.

Every byte a session writes (responses, notifications, ``irq`` counts) goes
through ``_send_locked`` under one lock, so messages never interleave, and
pending counts are only taken while holding it. ``respond`` flushes pending
counts first: when a client reads the answer to ``unsubscribe``, every count
for that subscription is already in front of it.
"""

from __future__ import annotations

import array
import errno
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio

from irqd.device.base import IrqIndex
from irqd.stats import LatencyHistogram
from irqproto.codec import encode
from irqproto.messages import to_wire
from irqproto.notifications import ResizedNotification, TypedNotification, encode_irq

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


class Session:
    """A connected client as the vector table and the request handlers see it."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        session_id: int,
        peer: PeerCredentials,
        latency: LatencyHistogram,
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
        self.delivered = 0
        self.notifications = 0
        #: Why the output path gave up, when it was the one to end the session.
        self.close_reason: str | None = None
        self._pending: dict[IrqIndex, dict[int, int]] = {}
        self._pending_since_ns = 0
        self._resized: dict[IrqIndex, tuple[set[int], bool]] = {}
        self._outbox: list[bytes] = []
        self._wake = trio.Event()
        self._lock = trio.Lock()

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.name!r} pid={self.peer.pid}>"

    # -- called synchronously by the table and the dispatcher --------------------

    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        """Credit interrupts; coalesces with whatever is still unsent."""
        per_index = self._pending.get(index)
        if per_index is None:
            per_index = self._pending[index] = {}
        if not self._pending_since_ns:
            self._pending_since_ns = time.perf_counter_ns()
        per_index[vector] = per_index.get(vector, 0) + count
        self._wake.set()

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        """Queue a ``resized`` notification; several coalesce into one per index."""
        known, loss = self._resized.get(index, (set(), False))
        known.update(vectors)
        self._resized[index] = (known, loss or possible_loss)
        self._wake.set()

    def post(self, notification: TypedNotification) -> None:
        """Queue a control notification (``shutdown``, ``device_lost``)."""
        self._outbox.append(encode_notification(notification))
        self._wake.set()

    def pending_counters(self) -> int:
        """How many (index, vector) counters are waiting: the memory a slow client costs."""
        return sum(len(per) for per in self._pending.values())

    def pending_total(self) -> int:
        """Interrupts credited but not yet written to the socket."""
        return sum(sum(per.values()) for per in self._pending.values())

    # -- the output path -----------------------------------------------------------------

    async def run_sender(self) -> None:
        """Write pending notifications whenever there are some, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            async with self._lock:
                await self._send_locked(b"")

    async def respond(self, response: bytes, fds: Sequence[int] = ()) -> None:
        """Write a response, after everything pending; ``fds`` ride on its first byte."""
        async with self._lock:
            await self._send_locked(response, fds)

    async def flush(self) -> None:
        """Write whatever is pending now."""
        async with self._lock:
            await self._send_locked(b"")

    async def _send_locked(self, tail: bytes, fds: Sequence[int] = ()) -> None:
        since_ns = self._pending_since_ns
        self._pending_since_ns = 0
        head = self._take_pending()
        if head:
            await self._sendall(head)
            if since_ns:
                self.latency.record_ns(time.perf_counter_ns() - since_ns)
        if tail:
            await self._sendall(tail, fds)

    def _take_posted(self) -> list[bytes]:
        """Queued control notifications and ``resized``, taken for writing."""
        parts = self._outbox
        self._outbox = []
        for index, (vectors, loss) in self._resized.items():
            resized = ResizedNotification(index.wire_name, tuple(sorted(vectors)), loss)
            parts.append(encode_notification(resized))
        self._resized = {}
        return parts

    def _take_pending(self) -> bytes:
        parts = self._take_posted()
        pending = self._pending
        if pending:
            self._pending = {}
            for index in sorted(pending):
                counts = pending[index]
                self.delivered += sum(counts.values())
                parts.append(encode_counts(index, counts))
        if not parts:
            return b""
        self.notifications += len(parts)
        return b"".join(parts)

    # -- restart without disconnecting (irqd.process.fdstore) ---------------------------------

    async def hold_output(self) -> None:
        """Take the output lock for good: a message being written is finished first,
        and nothing is written afterwards. Released by ``release_output``."""
        await self._lock.acquire()

    def release_output(self) -> None:
        """Give back the lock ``hold_output`` took (a hand-over that was called off)."""
        self._lock.release()

    def export_state(self) -> dict[str, Any]:
        """What a new daemon process needs to carry on this session: identity,
        counters and everything not yet written (pending counts, ``resized``,
        queued notifications), as msgpack-able data. Call with the output held."""
        return {
            "id": self.id,
            "name": self.name,
            "greeted": self.greeted,
            "requests": self.requests,
            "delivered": self.delivered,
            "notifications": self.notifications,
            "connected_for": time.monotonic() - self.connected_at,
            "pending": [
                [int(index), vector, count] for index, vector, count in self._export_pending()
            ],
            "resized": [
                [int(index), sorted(vectors), loss]
                for index, (vectors, loss) in self._resized.items()
            ],
            "outbox": self._export_outbox(),
        }

    def _export_pending(self) -> list[tuple[IrqIndex, int, int]]:
        return [
            (index, vector, count)
            for index, counts in self._pending.items()
            for vector, count in counts.items()
        ]

    def _export_outbox(self) -> list[bytes]:
        return list(self._outbox)

    @classmethod
    def from_state(
        cls, sock: trio.socket.SocketType, state: dict[str, Any], latency: LatencyHistogram
    ) -> Session:
        """The session ``export_state`` described, on its adopted socket."""
        session = cls(sock, int(state["id"]), PeerCredentials.of(sock), latency)
        session.restore(state)
        return session

    def restore(self, state: dict[str, Any]) -> None:
        """Take over the counters and unsent output ``export_state`` described.

        The unsent bytes go first: the previous process may have written part of
        a message, whose rest must be the next thing on the wire.
        """
        self.name = str(state["name"])
        self.greeted = bool(state["greeted"])
        self.requests = int(state["requests"])
        self.delivered = int(state["delivered"])
        self.notifications = int(state["notifications"])
        self.connected_at = time.monotonic() - float(state["connected_for"])
        self._restore_outbox([bytes(b) for b in state["outbox"]])
        # ``resized`` before the counts: it was posted before the loopback
        # trigger whose count may be among them (a session writes what was
        # posted ahead of pending counts).
        for index, vectors, loss in state["resized"]:
            self.post_resized(IrqIndex(index), [int(v) for v in vectors], bool(loss))
        for index, vector, count in state["pending"]:
            self.add_pending(IrqIndex(index), int(vector), int(count))

    def _restore_outbox(self, parts: list[bytes]) -> None:
        self._outbox.extend(parts)
        if self._outbox:
            self._wake.set()

    def close_output(self) -> None:
        """The session is over; called before its socket is closed."""

    async def _sendall(self, data: bytes, fds: Sequence[int] = ()) -> None:
        view = memoryview(data)
        pending_fds = list(fds)
        while pending_fds:
            # The kernel takes at most SCM_MAX_FD (253) fds per message, and each
            # batch needs at least one byte to ride on: the client collects fds
            # in order and matches them with the response's vector list.
            batch, pending_fds = pending_fds[:SCM_MAX_FD], pending_fds[SCM_MAX_FD:]
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", batch).tobytes())]
            chunk = view[:1] if pending_fds else view
            sent = await self.sock.sendmsg([chunk], rights)
            view = view[sent:]
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]
