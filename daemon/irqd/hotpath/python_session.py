"""A client session served by the Python hot loop: counters in Python, written by Trio.

The Python hot loop (irqd.hotpath.python) adds each count it reads to the
session's per-vector counter and wakes the session's sender task, which turns
everything pending into one ``irq`` notification per index when the socket
can take it: the dispatcher only ever increments and sets an event.

Every byte (responses, notifications, ``irq`` counts) goes through
``_send_locked`` under the session's one lock, and pending counts are only
taken while holding it, so ``respond`` writes them ahead of the response.
Control notifications wait coalesced (:class:`PendingControl`) and are taken
with the counts, ahead of them: while the sender is stuck on a client that
does not read, nothing grows but the counters and that one record.

With a stream guard (irqd.hotpath.guard) each ``_sendall`` is one run of
whole messages: sent in one all-or-nothing send it leaves the stream at a
message boundary, so only a larger run, one with fds, or a restored outbox
(which may begin inside a message) marks the session's byte first; the byte
is cleared when the run has gone out whole.
"""

from __future__ import annotations

import array
import socket
import time
from collections.abc import Sequence
from typing import Any

import trio

from irqd.device.base import IrqIndex
from irqd.hotpath.guard import StreamGuard
from irqd.hotpath.session import (
    SCM_MAX_FD,
    PeerCredentials,
    PendingControl,
    Session,
    SessionOutput,
    encode_counts,
)
from irqd.stats import LatencyHistogram
from irqproto.notifications import TypedNotification


class PythonSession(Session):
    """:class:`Session` whose counters and output queue live in Python."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        session_id: int,
        peer: PeerCredentials,
        latency: LatencyHistogram,
        guard: StreamGuard | None = None,
    ) -> None:
        super().__init__(sock, session_id, peer, latency, guard)
        self._delivered = 0
        self._notifications = 0
        self._pending: dict[IrqIndex, dict[int, int]] = {}
        self._pending_since_ns = 0
        self._control = PendingControl()
        #: Bytes a previous process left unsent (``restore_output``), due first.
        self._outbox: list[bytes] = []
        self._wake = trio.Event()

    @classmethod
    def from_state(
        cls,
        sock: trio.socket.SocketType,
        state: dict[str, Any],
        latency: LatencyHistogram,
        guard: StreamGuard | None = None,
    ) -> PythonSession:
        """The session ``export_state`` described, on its adopted socket."""
        session = cls(sock, int(state["id"]), PeerCredentials.of(sock), latency, guard)
        session.restore(state)
        return session

    @property
    def delivered(self) -> int:
        return self._delivered

    @property
    def notifications(self) -> int:
        return self._notifications

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
        self._control.add_resized(index, vectors, possible_loss)
        self._wake.set()

    def post(self, notification: TypedNotification) -> None:
        """Queue a control notification; merges with one still unsent."""
        self._control.add(notification)
        self._wake.set()

    def pending_control(self) -> int:
        """Control notifications waiting, coalesced."""
        return len(self._control)

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

    def close_output(self) -> None:
        """Give back the guard slot; the counters die with the session."""
        self._release_guard_slot()

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

    def _take_pending(self) -> bytes:
        # What a previous process left, then what was posted, then the counts.
        parts = self._outbox
        self._outbox = []
        messages = len(parts)
        if self._control:
            parts.append(self._control.encode())
            messages += len(self._control)
            self._control = PendingControl()
        pending = self._pending
        if pending:
            self._pending = {}
            for index in sorted(pending):
                counts = pending[index]
                self._delivered += sum(counts.values())
                parts.append(encode_counts(index, counts))
                messages += 1
        if not parts:
            return b""
        self._notifications += messages
        return b"".join(parts)

    async def _sendall(self, data: bytes, fds: Sequence[int] = ()) -> None:
        # ``data`` is whole messages. Unless one all-or-nothing send takes it
        # (no fds, at most ``atomic_max`` bytes), the stream may be left
        # inside a message until the last byte is out: mark it before the
        # first byte goes.
        guard, slot = self._guard, self.guard_slot
        if guard is not None and slot is not None and (fds or len(data) > self.atomic_max):
            guard.mark(slot)
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
            if sent < len(view) and guard is not None and slot is not None:
                # Not expected below ``atomic_max`` (a send buffer lowered
                # after the session started): the mark is late but kept true.
                guard.mark(slot)
            view = view[sent:]
        if guard is not None and slot is not None:
            guard.clear(slot)

    # -- restart without disconnecting (irqd.process.fdstore) ------------------------------

    def export_output(self) -> SessionOutput:
        """Pending counts, ``resized`` and queued notifications, as they are (output held).

        The other control notifications go as bytes after the outbox: the
        next process writes them ahead of the ``resized`` and counts, as this
        one would have.
        """
        others = self._control.copy()
        others.resized = {}
        return SessionOutput(
            pending=[
                (index, vector, count)
                for index, counts in self._pending.items()
                for vector, count in counts.items()
            ],
            resized=[
                (index, sorted(vectors), loss)
                for index, (vectors, loss) in self._control.resized.items()
            ],
            outbox=[*self._outbox, others.encode()] if others else list(self._outbox),
        )

    def restore_output(self, outbox: list[bytes]) -> None:
        """Queue what the previous process left unsent, ahead of anything else.

        It may begin inside a message the previous process started: the
        stream is mid-message until it has gone out (``_sendall`` clears).
        """
        self._outbox.extend(outbox)
        if self._outbox:
            if self._guard is not None and self.guard_slot is not None:
                self._guard.mark(self.guard_slot)
            self._wake.set()

    def restore_counters(self, delivered: int, notifications: int) -> None:
        """Take over what the previous process had delivered and written."""
        self._delivered = delivered
        self._notifications = notifications
