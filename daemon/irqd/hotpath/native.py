"""The native hot loop, as the vector table and the daemon see it.

With ``hot_loop = native`` (the default when ``irqd._hotloop`` is built) the
interrupt path never enters Python: a thread of the extension's own waits on
the vector eventfds, credits each count to the subscribers' pending counters,
encodes the ``irq`` bytes and writes them to the client sockets
(daemon/irqd/_hotloop.c explains its locking). Trio keeps everything else:
accepting, reading requests, changing the vector table, and writing responses,
which go through the extension's per-client output queue so that they never
interleave with notifications.

The table talks to the extension through :class:`NativeHotLoop`, one of the
two implementations of :class:`irqd.hotpath.interface.HotLoop`: ``joined`` /
``left`` keep the extension's own copy of each vector's subscriber list,
changed only here, on the Trio thread, at the same points where the table
changes its own. The Python hot loop (irqd.hotpath.python) remains the
fallback and the reference (``hot_loop = python``).

The thread cannot call into Python, so the loop's Trio task (``run``) asks now
and then what it gave up on: vectors whose eventfd failed (logged) and clients
whose socket failed (their session ends, as a failed write ends it with the
Python loop).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import structlog
import trio

from irqd.device.base import IrqIndex
from irqd.hotpath.dispatcher import DispatcherStats
from irqd.hotpath.guard import StreamGuard
from irqd.hotpath.interface import Deliver, Subscriber
from irqd.hotpath.native_session import NativeSession
from irqd.hotpath.session import PeerCredentials, Session
from irqd.stats import LatencyHistogram

if TYPE_CHECKING:
    from irqd._hotloop import HotLoop

log = structlog.get_logger("irqd.hotpath.native")

#: How often ``responds`` looks at the hot thread's round counter.
RESPONDS_POLL_S = 0.0005

#: How often failed vector eventfds and client sockets reported by the hot
#: thread are looked at.
FAILURES_PERIOD = 1.0


def native_available() -> bool:
    """Whether ``irqd._hotloop`` was built and imports."""
    try:
        from irqd import _hotloop  # noqa: F401, PLC0415  optional extension
    except ImportError:
        return False
    return True


class NativeHotLoop:
    """Owner of the extension's ``HotLoop``: the hot loop in a thread of its own.

    A vector whose eventfd failed (the hot thread dropped it; ``take_failed``)
    stays known here as failed, so that the table can go on treating it as a
    vector that simply never fires until it releases it.
    """

    def __init__(self, latency: LatencyHistogram | None = None) -> None:
        from irqd._hotloop import HotLoop  # noqa: PLC0415  only in native mode

        names: list[str | None] = [None] * 16
        for index in IrqIndex:
            names[int(index)] = index.wire_name
        self.hot: HotLoop = HotLoop(names)
        self.latency = latency if latency is not None else LatencyHistogram()
        self.latency.add_source(self.latency_counts)
        self._tokens: dict[int, int] = {}  # fd -> token, of vectors the thread polls
        self._failed: dict[int, int] = {}  # fd -> token, of vectors it dropped
        self._closed = False
        self._last_rounds = 0
        self._last_latency: Sequence[int] = ()
        # The sessions whose sockets the thread writes: ``run`` asks each now
        # and then whether the thread gave up on it. Weak: a session is the
        # client loop's, and ends with it.
        self._sessions: weakref.WeakSet[NativeSession] = weakref.WeakSet()
        self._guard: StreamGuard | None = None

    @property
    def name(self) -> str:
        return "native"

    # -- the vector table's poller interface -------------------------------------------

    def attach(self, deliver: Deliver) -> None:
        """Nothing to attach: the thread credits the subscribers from its own copy
        of the subscriber lists (``joined``/``left``), never through the table."""

    def add(self, fd: int, token: int) -> None:
        """Poll ``fd`` in the hot thread under ``token``."""
        self.hot.add_vector(fd, token)
        self._tokens[fd] = token

    def remove(self, fd: int) -> int:
        """Stop polling ``fd``, crediting what it still holds first; returns every
        count ever read from it. Call before closing fd. ``KeyError`` if unknown."""
        if fd not in self._tokens:
            del self._failed[fd]  # KeyError if not even that
            return 0
        del self._tokens[fd]
        total = self.hot.vector_total(fd)
        return total + self.hot.remove_vector(fd)

    def drain_fd(self, fd: int) -> int:
        """Read ``fd`` now and credit the count to its current subscribers; returns it."""
        if fd in self._failed:
            return 0
        return self.hot.drain_vector(fd)  # KeyError if unknown

    def joined(self, token: int, subscriber: Subscriber) -> None:
        """``subscriber`` receives the vector from now on."""
        if token not in self._failed.values():
            self.hot.subscribe(_client_id(subscriber), token)

    def left(self, token: int, subscriber: Subscriber) -> None:
        """``subscriber`` stops receiving the vector; what it was owed is queued to it."""
        if token not in self._failed.values():
            self.hot.unsubscribe(_client_id(subscriber), token)

    def total(self, fd: int) -> int:
        """Every count read from ``fd`` since it was added (0 once it is not polled)."""
        return self.hot.vector_total(fd) if fd in self._tokens else 0

    def __contains__(self, fd: int) -> bool:
        return fd in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    # -- sessions, statistics ------------------------------------------------------------

    def attach_guard(self, guard: StreamGuard | None) -> None:
        """The thread marks each later session's slot in ``guard`` around its sends
        (``HotLoop.set_guard`` holds the mapping until detached or closed).
        ``ValueError`` while a session with a slot is open."""
        if not self._closed:
            self.hot.set_guard(guard.buffer if guard is not None else None)
        self._guard = guard

    def new_session(
        self, sock: trio.socket.SocketType, session_id: int, peer: PeerCredentials
    ) -> Session:
        """A session whose counters and output queue are the extension's."""
        session = NativeSession(sock, session_id, peer, self.latency, self.hot, guard=self._guard)
        self._sessions.add(session)
        return session

    def dispatch_stats(self, own: DispatcherStats) -> dict[str, Any]:
        """The Trio dispatcher then polls only the daemon's own eventfds."""
        return {
            "rounds": own.rounds,
            "events": own.events,
            "native": own.native,
            "hot_loop": self.name,
            "hot_rounds": self.rounds,
        }

    # -- the thread --------------------------------------------------------------------

    async def run(self) -> None:
        """What the thread gave up on, which it cannot tell Trio itself: vectors whose
        eventfd failed (logged, like the Python loop's ``vector.eventfd_failed``) and
        clients whose socket failed (their session's sender raises, ending it)."""
        while True:
            await trio.sleep(FAILURES_PERIOD)
            for token in self.take_failed():
                log.error("vector.eventfd_failed", token=token)
            if self._closed:
                continue
            for session in list(self._sessions):
                if not session.removed:
                    session.check_output()

    def start(self) -> None:
        """Start forwarding (idempotent)."""
        if not self.hot.running:
            self.hot.start()

    def stop(self) -> None:
        """Stop forwarding and wait for the thread; state is kept for ``start``."""
        if not self._closed:
            self.hot.stop()

    @property
    def closed(self) -> bool:
        """After ``close`` (or a hand-over): nothing is forwarded any more."""
        return self._closed

    @property
    def rounds(self) -> int:
        """Rounds the hot thread has completed: the watchdog's proof of life."""
        if not self._closed:
            self._last_rounds = self.hot.rounds
        return self._last_rounds

    def poke(self) -> None:
        """Make the hot thread go round once, even with no interrupt (not once closed)."""
        if not self._closed:
            self.hot.poke()

    def responds(self, timeout: float) -> bool:
        """Poke the hot thread and wait up to ``timeout`` seconds for it to go round.

        Blocking, in real time on purpose: the hot thread is not a Trio task,
        so only a real wait can tell a slow thread from a stuck one. ``True``
        once closed: there is no thread left to be stuck.
        """
        if self._closed:
            return True
        before = self.hot.rounds
        self.hot.poke()
        deadline = time.monotonic() + timeout
        while self.hot.rounds == before:
            if time.monotonic() >= deadline:
                return False
            time.sleep(RESPONDS_POLL_S)
        return True

    def take_failed(self) -> list[int]:
        """Tokens of vectors whose eventfd failed and that are no longer polled."""
        if self._closed:
            return []
        failed = self.hot.take_failed()
        for fd, token in list(self._tokens.items()):
            if token in failed:
                del self._tokens[fd]
                self._failed[fd] = token
        return failed

    def latency_counts(self) -> Sequence[int]:
        """The extension's delivery-latency histogram (``irqd.stats`` buckets)."""
        if self._closed:
            return self._last_latency
        self._last_latency = self.hot.latency()
        return self._last_latency

    def close(self) -> None:
        """Stop the thread and free the extension's state; idempotent."""
        if not self._closed:
            self.latency_counts()
            self._last_rounds = self.hot.rounds
        self._closed = True
        self._tokens.clear()
        self._failed.clear()
        self.hot.close()


def _client_id(subscriber: Subscriber) -> int:
    if not isinstance(subscriber, NativeSession):
        raise TypeError(f"{subscriber!r} has no output in the native hot loop")
    return subscriber.client_id
