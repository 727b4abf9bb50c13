"""The Python hot loop: a Trio task draining one epoll set of vector eventfds.

:class:`PollLoop` is the loop itself: wait until the dispatcher's epoll fd is
readable, drain every ready eventfd in one native call
(:class:`irqd.hotpath.dispatcher.Dispatcher`), hand each ``(token, count)`` to
its ``deliver``. It has a heartbeat eventfd of its own in the set, so that an
idle loop still goes round when the watchdog pokes it.

Two of them run in the daemon with ``hot_loop = python``, each over its own
epoll set: the daemon's own (heartbeat, REQ, ERR; ``deliver`` is
:meth:`irqd.device.events.DeviceEvents.deliver`), which runs in both modes, and
:class:`PythonHotLoop`'s (the vectors; ``deliver`` is the vector table's). Two
sets rather than one shared: the daemon's own events then take the same path
whichever hot loop runs, the hot loop's set holds nothing but vectors, and
stopping the hot loop for a hand-over is the same call in both modes; the
cost is one more epoll fd and, for an interrupt, nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import structlog
import trio

from irqd.eventfd import EventFd
from irqd.hotpath.dispatcher import TOKEN_MAX, Dispatcher, DispatcherStats
from irqd.hotpath.guard import StreamGuard
from irqd.hotpath.interface import Deliver, Subscriber
from irqd.hotpath.python_session import PythonSession
from irqd.hotpath.session import PeerCredentials, Session
from irqd.stats import LatencyHistogram

log = structlog.get_logger("irqd.hotpath.python")

#: The token of a loop's heartbeat eventfd; vector tokens (``make_token``) never reach it.
HEARTBEAT_TOKEN = TOKEN_MAX


def _ignore(token: int, count: int) -> None:
    """``deliver`` until one is attached."""


class PollLoop:
    """A Trio task draining one :class:`Dispatcher` and delivering what it reads."""

    def __init__(self, dispatcher: Dispatcher | None = None, deliver: Deliver = _ignore) -> None:
        self.dispatcher = dispatcher if dispatcher is not None else Dispatcher()
        self.deliver = deliver
        #: Rounds so far: the watchdog's proof that the loop runs.
        self.rounds = 0
        self._seen = 0
        self._stopped = False
        self._resumed = trio.Event()
        # An eventfd in the loop's own set that ``poke`` signals, so that an
        # idle device still makes the loop go round once per watchdog period;
        # added by the first ``poke``: without a watchdog the set holds only
        # what the loop is for.
        self._heartbeat: EventFd | None = None

    async def run(self) -> None:
        """Drain and deliver whenever an eventfd is ready, until cancelled."""
        dispatcher = self.dispatcher
        epoll_fd = dispatcher.fileno()
        while True:
            try:
                await trio.lowlevel.wait_readable(epoll_fd)
            except trio.ClosedResourceError:
                return  # ``close``d under a hand-over: nothing more to read
            # Checked between the wake-up and the drain, with no checkpoint in
            # between: once ``stop`` returned (a hand-over's snapshot), nothing
            # more is read here; the eventfds keep their counts.
            if self._stopped:
                await self._resumed.wait()
                continue
            self.rounds += 1
            result = dispatcher.drain()
            deliver = self.deliver
            for token, count in result.counts:
                deliver(token, count)
            for token in result.failed:
                log.error("vector.eventfd_failed", token=token)

    def start(self) -> None:
        """Read again after ``stop``; idempotent."""
        self._stopped = False
        self._resumed.set()

    def stop(self) -> None:
        """Read nothing more from now on, until ``start``."""
        if not self._stopped:
            self._stopped = True
            self._resumed = trio.Event()

    def poke(self) -> None:
        """Make the loop go round once; ``responds`` then tells whether it did."""
        self._seen = self.rounds
        if self._heartbeat is None:
            self._heartbeat = EventFd()
            self.dispatcher.add(self._heartbeat.fileno(), HEARTBEAT_TOKEN)
        self._heartbeat.signal()

    def responds(self, timeout: float = 0.0) -> bool:
        """Whether the loop went round since the last ``poke``. Never blocks: a
        Trio task goes round only while this one waits anyway."""
        return self.rounds != self._seen

    def close(self) -> None:
        """Close the heartbeat and the epoll set (not the eventfds in it); idempotent."""
        if not self.dispatcher.closed:
            # Wakes ``run`` if it waits on the epoll fd, which it must not do
            # on a closed (and perhaps reused) number; outside Trio nobody waits.
            with contextlib.suppress(RuntimeError):
                trio.lowlevel.notify_closing(self.dispatcher.fileno())
            if self._heartbeat is not None:
                self.dispatcher.remove(self._heartbeat.fileno())
            self.dispatcher.close()
        if self._heartbeat is not None:
            self._heartbeat.close()


class PythonHotLoop(PollLoop):
    """The hot loop in a Trio task: the reference, and the fallback when
    ``irqd._hotloop`` is not built. The vector table credits every count."""

    def __init__(self, latency: LatencyHistogram | None = None) -> None:
        super().__init__(Dispatcher())
        self.latency = latency if latency is not None else LatencyHistogram()
        self._guard: StreamGuard | None = None

    @property
    def name(self) -> str:
        return "python"

    # -- the vector table's poller ---------------------------------------------------------

    def attach(self, deliver: Deliver) -> None:
        """Credit every count through ``deliver`` (the table's)."""
        self.deliver = deliver

    def add(self, fd: int, token: int) -> None:
        """Poll ``fd`` under ``token``."""
        self.dispatcher.add(fd, token)

    def remove(self, fd: int) -> int:
        """Stop polling ``fd``; 0: every count it gave was credited through the table."""
        self.dispatcher.remove(fd)
        return 0

    def drain_fd(self, fd: int) -> int:
        """Read ``fd`` now and credit the count through the table; returns it."""
        count = self.dispatcher.drain_fd(fd)
        if count:
            self.deliver(self.dispatcher.token(fd), count)
        return count

    def total(self, fd: int) -> int:
        """0: the table's own record holds every count."""
        return 0

    def joined(self, token: int, subscriber: Subscriber) -> None:
        """Nothing to do: the table's subscriber list is the one credited."""

    def left(self, token: int, subscriber: Subscriber) -> None:
        """Nothing to do: the table's subscriber list is the one credited."""

    def __contains__(self, fd: int) -> bool:
        return fd in self.dispatcher

    # -- what the daemon asks ---------------------------------------------------------------

    def attach_guard(self, guard: StreamGuard | None) -> None:
        """Sessions made from now on keep their mark in ``guard`` (``None``: none do)."""
        self._guard = guard

    def new_session(
        self, sock: trio.socket.SocketType, session_id: int, peer: PeerCredentials
    ) -> Session:
        """A session with Python's counters, written by its own sender task."""
        return PythonSession(sock, session_id, peer, self.latency, self._guard)

    def dispatch_stats(self, own: DispatcherStats) -> dict[str, Any]:
        """Both Trio loops' drains together, as when they shared one epoll set."""
        mine = self.dispatcher.stats
        return {
            "rounds": own.rounds + mine.rounds,
            "events": own.events + mine.events,
            "native": mine.native,
            "hot_loop": self.name,
        }
