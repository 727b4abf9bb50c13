"""The hot loop as the rest of the daemon sees it: one interface, two implementations.

The hot loop is what reads the vector eventfds and credits each count to the
subscribers' sessions. Two implementations, chosen once at start-up by
:func:`irqd.hotpath.select.open_hot_loop` (the only place that tells them apart):

* :class:`irqd.hotpath.native.NativeHotLoop`: a thread of the ``irqd._hotloop``
  extension forwards interrupts without entering Python; its Trio task only
  reports what the thread gave up on (failed eventfds and client sockets);
* :class:`irqd.hotpath.python.PythonHotLoop`: a Trio task drains an epoll set
  of the vector eventfds (:class:`irqd.hotpath.dispatcher.Dispatcher`) and
  credits the counts through the vector table; the reference.

The vector table uses a hot loop as its poller (:class:`VectorPoller`); the
daemon runs it, makes its sessions, asks it for liveness and statistics
(:class:`HotLoop`). The daemon's own eventfds (watchdog heartbeat, REQ, ERR)
are not the hot loop's: the daemon polls them with a
:class:`irqd.hotpath.python.PollLoop` of its own in both modes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import trio

from irqd.device.base import IrqIndex
from irqd.hotpath.dispatcher import DispatcherStats
from irqd.hotpath.guard import StreamGuard
from irqd.hotpath.session import PeerCredentials, Session

#: ``deliver(token, count)``: credit ``count`` signals read under ``token``.
Deliver = Callable[[int, int], None]


class Subscriber(Protocol):
    """What the vector table and the hot loop need from a client session."""

    @property
    def id(self) -> int:
        """The session's id (``status``' ``claimed_by``, the hand-over's key)."""

    def add_pending(self, index: IrqIndex, vector: int, count: int) -> None:
        """Credit ``count`` interrupts of this vector; must not block."""

    def post_resized(self, index: IrqIndex, vectors: Sequence[int], possible_loss: bool) -> None:
        """Queue a ``resized`` notification; must not block."""


class VectorPoller(Protocol):
    """What the vector table needs of the hot loop: which eventfds to poll, and
    who receives each one's counts.

    All of it runs on the Trio thread, at the points where the table changes
    its own record, which is what keeps counts exact.
    """

    def attach(self, deliver: Deliver) -> None:
        """Credit what this poller reads through ``deliver`` (the table's), where
        it does not credit the subscribers itself."""

    def add(self, fd: int, token: int) -> None:
        """Poll ``fd`` under ``token``; ``FileExistsError`` if it is polled already."""

    def remove(self, fd: int) -> int:
        """Stop polling ``fd``; call before closing it. ``KeyError`` if unknown.

        Returns what the poller read from ``fd`` and credited itself, which the
        table's record of the vector's total does not hold yet (0 when the
        table credited everything).
        """

    def drain_fd(self, fd: int) -> int:
        """Read ``fd`` now and credit the count to its current subscribers; returns it."""

    def total(self, fd: int) -> int:
        """What the poller read from ``fd`` and credited itself (see ``remove``)."""

    def joined(self, token: int, subscriber: Subscriber) -> None:
        """``subscriber`` receives the vector from now on."""

    def left(self, token: int, subscriber: Subscriber) -> None:
        """``subscriber`` stops receiving the vector; what it was owed stays owed."""

    def __contains__(self, fd: int) -> bool:
        """Whether ``fd`` is polled (a failed eventfd is dropped by the poller)."""


class HotLoop(VectorPoller, Protocol):
    """One hot loop: the table's poller, plus what the daemon runs and asks it."""

    @property
    def name(self) -> str:
        """``native`` or ``python``: ``stats``' ``dispatch.hot_loop``."""

    @property
    def rounds(self) -> int:
        """Rounds the loop has gone so far: the watchdog's proof of life."""

    def attach_guard(self, guard: StreamGuard | None) -> None:
        """Keep each session's "may be mid-message" mark in ``guard`` from now on.

        Every session made after this takes a slot there (``Session.guard_slot``;
        ``None`` when it is full) and gives it back when its output is closed;
        the loop keeps the slot's byte 0 whenever the client's stream is at a
        message boundary (irqd.hotpath.guard). ``None`` detaches: later
        sessions have no slot. Call it before making sessions: the native
        loop refuses (``ValueError``) while a session with a slot is open.
        The guard must outlive the loop's use of it: detach or ``close`` the
        loop before closing the guard.
        """

    def new_session(
        self, sock: trio.socket.SocketType, session_id: int, peer: PeerCredentials
    ) -> Session:
        """A session whose output this loop writes; ``OSError``/``ValueError`` if refused."""

    async def run(self) -> None:
        """The loop's Trio task, for as long as the daemon serves (until cancelled)."""

    def start(self) -> None:
        """Forward interrupts (again, after ``stop``); idempotent."""

    def stop(self) -> None:
        """Stop reading eventfds at once; counts stay in them. State is kept for ``start``."""

    def close(self) -> None:
        """Stop for good and let go of every eventfd (which are not closed); idempotent."""

    def poke(self) -> None:
        """Make the loop go round once, even with no interrupt (the watchdog's heartbeat)."""

    def responds(self, timeout: float) -> bool:
        """Whether the loop went round since the last ``poke``; may block up to
        ``timeout`` seconds (in real time) for a thread to answer."""

    def dispatch_stats(self, own: DispatcherStats) -> dict[str, Any]:
        """``stats``' ``dispatch`` map, given the daemon's own dispatcher's counters."""
