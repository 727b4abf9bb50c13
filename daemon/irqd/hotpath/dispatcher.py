"""The hot loop's first form: one epoll set of every vector eventfd, drained in one call.

The daemon's Trio task does::

    while True:
        await trio.lowlevel.wait_readable(dispatcher.fileno())
        result = dispatcher.drain()   # [(token, count)], [failed token]

Some facts about epoll (epoll(7), fs/eventpoll.c), and what they decide here:

- An epoll fd is itself pollable: it is readable while its ready list is not
  empty. So Trio waits on that one fd, however many vectors there are, and one
  ``epoll_wait(timeout=0)`` afterwards says which eventfds are ready.

- Level-triggered, not EPOLLET. In level-triggered mode an fd is reported on
  every ``epoll_wait`` for as long as it is readable. An eventfd is readable
  while its counter is non-zero, and our 8-byte read takes the whole counter,
  so a drained fd drops out by itself; one that we did not get to (more ready
  fds than ``max_events``) is simply reported again in the next round: nothing
  can be lost between rounds. With EPOLLET a missed read would never be
  reported again until the next interrupt arrived.

- Not EPOLLONESHOT. A one-shot registration is disarmed after each report and
  must be re-armed with ``epoll_ctl(EPOLL_CTL_MOD)``: one more syscall per
  interrupt, for a protection (one reader per event) that a single reader does
  not need.

- Fairness: in level-triggered mode epoll puts a reported fd back at the *tail*
  of its ready list, so when more fds are ready than ``max_events`` the next
  round starts with the ones left out. No vector starves.

- An epoll registration belongs to the open file *and* the fd number it was
  added with, and it is removed automatically only when the last reference to
  the file goes away. The kernel (and SimDevice) holds its own reference to
  every assigned eventfd, so closing our fd does *not* remove it from the set:
  the set keeps reporting it under the old number, which the process may
  already have reused for something else (DPDK PR 66). Hence the rule:
  ``remove(fd)`` (EPOLL_CTL_DEL) *before* the caller closes fd. ``close()``
  here closes the epoll fd through ``select.epoll``, which, like Trio's
  ``_FdHolder``, forgets the number before closing it.

- EPOLLERR and EPOLLHUP are always reported, whether asked for or not, and in
  level-triggered mode forever. An eventfd never reports them, but a bad fd
  handed to ``add`` (a pipe, a socket) can; such an fd, or one whose read gives
  0 bytes or fewer than 8, is removed from the set in the same call and
  reported once in ``failed``.

- Why one native call: a Trio wake-up, an ``epoll.poll`` and one ``os.read``
  per fd cost a few microseconds each in the interpreter. ``irqd._drain``
  does ``epoll_wait`` and every read in C and returns plain Python pairs: one
  interpreter round trip per wake, however many vectors fired. Registrations
  pack ``token << 32 | fd`` into ``epoll_data.u64`` so the C side needs no
  lookup table. The pure-Python fallback (``irqd.hotpath._drain_py``) has the same
  contract and is what runs when the extension is missing.

- ``drain_fd`` reads one fd now, outside a round: at a subscribe/unsubscribe
  boundary the caller first takes what has accumulated so that counts are
  attributed to the right subscribers. It may race a round only if called from
  another thread; the loser of the race sees EAGAIN and reports 0, so a count
  is never reported twice.
"""

from __future__ import annotations

import errno
import os
import select
import sys
from dataclasses import dataclass, field
from typing import Protocol

from . import _drain_py

TOKEN_MAX = 2**32 - 1


class _NativeDrain(Protocol):
    """What ``irqd._drain`` provides (daemon/irqd/_drain.pyi)."""

    def add(self, epfd: int, fd: int, token: int, /) -> None: ...

    def drain(self, epfd: int, maxevents: int, /) -> tuple[list[tuple[int, int]], list[int]]: ...


def _load_native() -> _NativeDrain | None:
    try:
        from irqd import _drain  # noqa: PLC0415  optional extension, imported lazily
    except ImportError:
        return None
    return _drain


_native = _load_native()


@dataclass(slots=True)
class DrainResult:
    """What one ``drain()`` found."""

    #: ``(token, count)`` for each fd that had a non-zero counter.
    counts: list[tuple[int, int]] = field(default_factory=list)
    #: Tokens of fds that hung up, errored or read short; already removed.
    failed: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.counts or self.failed)


@dataclass(slots=True)
class DispatcherStats:
    """Counters for ``stats``."""

    native: bool
    #: ``drain()`` calls that returned something.
    rounds: int = 0
    #: ``(token, count)`` pairs returned in total.
    events: int = 0


class Dispatcher:
    """One epoll set of eventfds, each registered with an opaque 32-bit token."""

    def __init__(self, *, max_events: int = 2048, use_native: bool | None = None) -> None:
        """``use_native``: ``None`` uses ``irqd._drain`` when it is built, ``True``
        requires it (``ImportError`` otherwise), ``False`` uses the Python twin."""
        if not 1 <= max_events <= 65536:
            raise ValueError(f"max_events must be 1..65536: {max_events}")
        if use_native and _native is None:
            raise ImportError("irqd._drain is not built")
        self.native: bool = _native is not None if use_native is None else use_native
        self.max_events = max_events
        self.stats = DispatcherStats(native=self.native)
        self._epoll: select.epoll | None = select.epoll()  # EPOLL_CLOEXEC by default
        self._tokens: dict[int, int] = {}  # fd -> token

    def fileno(self) -> int:
        """The epoll fd: readable while any registered fd is ready."""
        return self._ep().fileno()

    def add(self, fd: int, token: int) -> None:
        """Register ``fd`` (level-triggered EPOLLIN) under ``token`` (0..2**32-1).

        ``FileExistsError`` (EEXIST) if ``fd`` is already registered; nothing is
        changed then. One eventfd backing several vectors is registered once.
        """
        ep = self._ep()
        if not 0 <= token <= TOKEN_MAX:
            raise ValueError(f"token must be 0..{TOKEN_MAX}: {token}")
        if fd in self._tokens:
            raise FileExistsError(errno.EEXIST, f"fd {fd} is already registered")
        if self.native:
            assert _native is not None
            _native.add(ep.fileno(), fd, token)
        else:
            ep.register(fd, select.EPOLLIN)
        self._tokens[fd] = token

    def remove(self, fd: int) -> None:
        """Deregister ``fd``; call it *before* closing fd. ``KeyError`` if unknown."""
        ep = self._ep()
        del self._tokens[fd]
        ep.unregister(fd)

    def token(self, fd: int) -> int:
        """The token ``fd`` is registered under; ``KeyError`` if unknown."""
        return self._tokens[fd]

    def __contains__(self, fd: int) -> bool:
        return fd in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def drain(self) -> DrainResult:
        """Read every ready fd once, without blocking."""
        ep = self._ep()
        if self.native:
            assert _native is not None
            counts, failed_fds = _native.drain(ep.fileno(), self.max_events)
        else:
            counts, failed_fds = _drain_py.drain(ep, self.max_events, self._tokens)
        result = DrainResult(counts, [self._tokens.pop(fd) for fd in failed_fds])
        if result:
            self.stats.rounds += 1
            self.stats.events += len(counts)
        return result

    def drain_fd(self, fd: int) -> int:
        """Take a registered fd's counter now; 0 if nothing is pending. ``KeyError`` if unknown."""
        self._ep()
        if fd not in self._tokens:
            raise KeyError(fd)
        # O_NONBLOCK lives in the open file description, which a process that
        # was handed this eventfd (sim.eventfds) shares and could clear: ask
        # first, so that this read can never block the daemon.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(0):
            return 0
        try:
            value = os.read(fd, 8)
        except BlockingIOError:
            return 0
        # A short or empty read is left for the next drain() to report as failed.
        return int.from_bytes(value, sys.byteorder) if len(value) == 8 else 0

    def close(self) -> None:
        """Close the epoll fd; idempotent. Registered fds are not closed (not ours)."""
        ep, self._epoll = self._epoll, None
        self._tokens.clear()
        if ep is not None:
            ep.close()

    @property
    def closed(self) -> bool:
        return self._epoll is None

    def _ep(self) -> select.epoll:
        if self._epoll is None:
            raise ValueError("dispatcher is closed")
        return self._epoll

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
