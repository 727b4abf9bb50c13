"""A client session whose every byte goes through the native hot loop's output queue.

The extension owns the session's pending interrupt counters and its output
queue; the hot thread encodes and writes ``irq`` notifications itself. Trio's
responses are appended to the same queue by ``HotLoop.send``, whole messages
at a time, after it has encoded every count still pending: the guarantee of
:class:`irqd.hotpath.session.Session` that a response comes after every count credited
before it holds here too.

Control notifications (``err``, ``resized``, ``shutdown``, ``device_lost``) are
not queued but held in the extension's one control buffer per client
(``HotLoop.hold_control``), which goes into the queue just ahead of the next
counts it encodes: a ``resized`` is ahead of the count of the loopback trigger
that follows it, with no sender task in between. The session coalesces what
is held (:class:`irqd.hotpath.session.PendingControl`) and replaces the buffer
as a whole; once the thread has queued it, the next notification starts a
new one. So a client that does not read costs its counters and one bounded
control buffer, however many ERRs and grows there are.

``send`` never blocks. A client that does not read makes its queue grow only
by what Trio adds, so Trio waits for the socket to become writable whenever
the queue is above :data:`OUTPUT_HIGH_WATER` (and until it is empty when the
message carries fds, which the extension holds until they are sent).

With a stream guard (irqd.hotpath.guard) the extension is given the session's
slot and its all-or-nothing send size, and its thread keeps the slot's byte
(``_hotloop.c``, ``client_write``); the session only gives the slot back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from irqd.device.base import IrqIndex
from irqd.hotpath.guard import StreamGuard
from irqd.hotpath.session import PeerCredentials, PendingControl, Session, SessionOutput
from irqd.stats import LatencyHistogram
from irqd.tokens import make_token, split_token
from irqproto.notifications import TypedNotification

if TYPE_CHECKING:
    from irqd._hotloop import HotLoop

#: Bytes Trio may leave queued for a client before it waits for the socket.
OUTPUT_HIGH_WATER = 64 * 1024


class NativeSession(Session):
    """:class:`Session` with the extension's output path and counters."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        session_id: int,
        peer: PeerCredentials,
        latency: LatencyHistogram,
        hot: HotLoop,
        *,
        guard: StreamGuard | None = None,
    ) -> None:
        super().__init__(sock, session_id, peer, latency, guard)
        self._hot = hot
        #: The extension's id for this client (``irqd.hotpath.native.NativeHotLoop`` uses it).
        try:
            self.client_id = hot.add_client(
                sock.fileno(),
                -1 if self.guard_slot is None else self.guard_slot,
                self.atomic_max,
            )
        except BaseException:
            self._release_guard_slot()
            raise
        # What the counters held before this process (``restore_counters``), and
        # what Trio itself queued; the extension counts what its thread writes.
        self._base_delivered = 0
        self._py_notifications = 0
        #: What was last handed to ``hold_control``: still held there, or queued
        #: already (the next ``_hold`` finds out which).
        self._control = PendingControl()
        #: Output taken out of the extension for a hand-over, put back if it is called off.
        self._exported: tuple[bytes, list[tuple[int, int]]] | None = None
        self._removed = False
        self._wake = trio.Event()

    @property
    def delivered(self) -> int:
        return self._base_delivered + self._native_stats()[0]

    @property
    def notifications(self) -> int:
        return self._py_notifications + self._native_stats()[1]

    @property
    def removed(self) -> bool:
        """After ``close_output``: the extension no longer knows this client."""
        return self._removed

    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        """Credit interrupts in the extension (an adopted session's counts)."""
        self._hot.credit(self.client_id, make_token(index, vector), count)

    def pending_counters(self) -> int:
        """How many (index, vector) counters are waiting in the extension."""
        return self._native_stats()[2]

    def pending_total(self) -> int:
        """Interrupts credited in the extension but not yet encoded."""
        return self._native_stats()[3]

    def _native_stats(self) -> tuple[int, int, int, int, int, int]:
        if self._removed:
            return (0, 0, 0, 0, 0, 0)
        return self._hot.client_stats(self.client_id)

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        """Hold ``resized`` in the extension at once, ahead of the loopback trigger's
        count that follows it; merges with one for the index still held."""
        self._hold(lambda control: control.add_resized(index, vectors, possible_loss))

    def post(self, notification: TypedNotification) -> None:
        """Hold a control notification in the extension; merges with one still held."""
        self._hold(lambda control: control.add(notification))

    def pending_control(self) -> int:
        """Control notifications the extension holds, not queued yet."""
        if self._removed:
            return 0
        with contextlib.suppress(KeyError, ValueError):
            return self._hot.held_control(self.client_id)
        return 0

    def _hold(self, change: Callable[[PendingControl], None]) -> None:
        # Merge into what was held if the thread has not queued it yet (one
        # atomic check-and-replace in the extension); otherwise hold the new
        # notification alone. No lock: the buffer is replaced whole, and only
        # this (Trio) thread fills it.
        merged = self._control.copy()
        change(merged)
        hot, client = self._hot, self.client_id
        with contextlib.suppress(OSError, KeyError, ValueError):
            if self._control and hot.hold_control(client, merged.encode(), len(merged), True):
                self._control = merged
                return
            fresh = PendingControl()
            change(fresh)
            hot.hold_control(client, fresh.encode(), len(fresh))
            self._control = fresh

    async def run_sender(self) -> None:
        """Until cancelled: raise ``OSError`` once the extension has given up on the
        socket (``check_output`` wakes it), which ends the session."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            error = self._native_stats()[5]
            if error:
                raise OSError(error, os.strerror(error))

    def check_output(self) -> None:
        """Wake the sender if the hot thread's last write to this client failed.

        The thread cannot call into Python, so the native hot loop's Trio task
        asks every session now and then (``NativeHotLoop.run``).
        """
        if self._native_stats()[5]:
            self._wake.set()

    async def respond(self, response: bytes, fds: Sequence[int] = ()) -> None:
        """Queue a response after every count pending; ``fds`` ride on its first byte.

        The extension holds the fds it was given until they are sent: wait for
        that, so a hand-over never finds fds in a queue.
        """
        async with self._lock:
            await self._write(response, fds, 0 if fds else OUTPUT_HIGH_WATER)

    async def flush(self) -> None:
        """Write whatever is pending and wait until the socket has taken all of it."""
        async with self._lock:
            await self._write(b"", (), 0)

    async def _write(self, data: bytes, fds: Sequence[int], drain_to: int) -> None:
        hot, client = self._hot, self.client_id
        if self._removed:
            raise trio.ClosedResourceError("the session has ended")
        queued = hot.send(client, data, fds) if data else hot.flush(client)
        while queued > drain_to:
            await self.sock.wait_writable()
            if self._removed:
                raise trio.ClosedResourceError("the session has ended")
            queued = hot.flush(client)

    def export_output(self) -> SessionOutput:
        """The extension's queued bytes and pending counters, taken out of it.

        Called with the hot thread stopped (a hand-over): nothing moves. The
        held control notifications come last in the bytes, ahead of the
        counts as here, so Python hands on no ``resized`` of its own.
        """
        output = self._hot.take_output(self.client_id)
        self._control = PendingControl()
        pending = self._hot.take_pending(self.client_id)
        self._exported = (output, pending)
        return SessionOutput(
            pending=[(*split_token(token), count) for token, count in pending],
            outbox=[output] if output else [],
        )

    def release_output(self) -> None:
        """A hand-over was called off: put back what ``export_output`` took out."""
        if self._exported is not None:
            output, pending = self._exported
            self._exported = None
            with contextlib.suppress(OSError):
                if output:
                    self._hot.send(self.client_id, output)
                for token, count in pending:
                    self._hot.credit(self.client_id, token, count)
        super().release_output()

    def restore_output(self, outbox: list[bytes]) -> None:
        """Straight into the extension's queue, before any count is credited.

        It may begin inside a message the previous process started: marked
        before it is queued, the thread clears the mark once it has all gone
        out. (The thread writes nothing else to a session this new, so it
        cannot clear the mark in between.)
        """
        data = b"".join(outbox)
        if data:
            if self._guard is not None and self.guard_slot is not None:
                self._guard.mark(self.guard_slot)
            self._hot.send(self.client_id, data)

    def restore_counters(self, delivered: int, notifications: int) -> None:
        """Take over what the previous process had delivered and written."""
        self._base_delivered = delivered
        self._py_notifications = notifications

    def close_output(self) -> None:
        """Drop the client from the extension; queued output is discarded."""
        if self._removed:
            return
        with contextlib.suppress(KeyError, ValueError):
            delivered, notifications, *_ = self._hot.client_stats(self.client_id)
            self._base_delivered += delivered
            self._py_notifications += notifications
        self._removed = True
        with contextlib.suppress(KeyError, ValueError):
            self._hot.remove_client(self.client_id)
        # Only now: the thread writes the slot's byte until the client is removed.
        self._release_guard_slot()
