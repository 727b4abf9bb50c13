"""The native hot loop, as the vector table and the daemon see it.

With ``hot_loop = native`` (the default when ``irqd._hotloop`` is built) the
interrupt path never enters Python: a thread of the extension's own waits on
the vector eventfds, credits each count to the subscribers' pending counters,
encodes the ``irq`` bytes and writes them to the client sockets
(daemon/irqd/_hotloop.c explains its locking). Trio keeps everything else:
accepting, reading requests, changing the vector table, and writing responses,
which go through the extension's per-client output queue so that they never
interleave with notifications.

The table talks to the extension through :class:`NativeVectors`, which has the
same ``add`` / ``remove`` / ``drain_fd`` as :class:`irqd.hotpath.dispatcher.Dispatcher`
plus ``joined`` / ``left``: the extension keeps its own copy of each vector's
subscriber list, changed only here, on the Trio thread, at the same points
where the table changes its own. The Trio dispatcher and the table's Python
crediting remain the fallback and the reference (``hot_loop = python``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from irqd.config import HotLoop as HotLoopChoice
from irqd.device.base import IrqIndex
from irqd.errors import ConfigError

if TYPE_CHECKING:
    from irqd._hotloop import HotLoop


#: How often ``responds`` looks at the hot thread's round counter.
RESPONDS_POLL_S = 0.0005


def native_available() -> bool:
    """Whether ``irqd._hotloop`` was built and imports."""
    try:
        from irqd import _hotloop  # noqa: F401, PLC0415  optional extension
    except ImportError:
        return False
    return True


def resolve_hot_loop(wanted: HotLoopChoice) -> HotLoopChoice:
    """``AUTO`` made concrete; ``ConfigError`` if ``NATIVE`` is asked for but not built."""
    if wanted is HotLoopChoice.PYTHON:
        return wanted
    if native_available():
        return HotLoopChoice.NATIVE
    if wanted is HotLoopChoice.NATIVE:
        raise ConfigError(
            "hot_loop = native, but the extension irqd._hotloop is not built "
            "(reinstall with gcc and the Python headers present, or use hot_loop = python)"
        )
    return HotLoopChoice.PYTHON


class NativeVectors:
    """Owner of the extension's ``HotLoop``; the vector table's poller in native mode.

    A vector whose eventfd failed (the hot thread dropped it; ``take_failed``)
    stays known here as failed, so that the table can go on treating it as a
    vector that simply never fires until it releases it.
    """

    def __init__(self) -> None:
        from irqd._hotloop import HotLoop  # noqa: PLC0415  only in native mode

        names: list[str | None] = [None] * 16
        for index in IrqIndex:
            names[int(index)] = index.wire_name
        self.hot: HotLoop = HotLoop(names)
        self._tokens: dict[int, int] = {}  # fd -> token, of vectors the thread polls
        self._failed: dict[int, int] = {}  # fd -> token, of vectors it dropped
        self._closed = False
        self._last_rounds = 0
        self._last_latency: Sequence[int] = ()

    # -- the vector table's poller interface -------------------------------------------

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

    def joined(self, token: int, subscriber: object) -> None:
        """``subscriber`` receives the vector from now on."""
        if token not in self._failed.values():
            self.hot.subscribe(_client_id(subscriber), token)

    def left(self, token: int, subscriber: object) -> None:
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

    # -- the thread --------------------------------------------------------------------

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
        """Make the hot thread go round once, even with no interrupt."""
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


def _client_id(subscriber: object) -> int:
    client_id = getattr(subscriber, "client_id", None)
    if not isinstance(client_id, int):
        raise TypeError(f"{subscriber!r} has no output in the native hot loop")
    return client_id
