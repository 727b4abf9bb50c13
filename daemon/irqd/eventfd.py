"""One owner per eventfd.

An fd number is reused by the kernel the moment it is closed, so whoever holds
a number after ``close()`` may act on somebody else's file (DPDK PR 66: a
reused number landed in the wrong interrupt handler). ``EventFd`` is the one
owner of its number and forgets it *before* closing it, as Trio's ``_FdHolder``
does (``src/trio/_unix_pipes.py``).

Facts from eventfd(2) / ``fs/eventfd.c``: a read returns the 8-byte counter and
resets it to 0 (no ``EFD_SEMAPHORE``), or fails with ``EAGAIN`` when the counter
is 0 and the fd is non-blocking; a write adds to the counter and would block
(``EAGAIN``) if the sum exceeded ``2**64 - 2``.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Self

#: The largest value an eventfd counter can hold (eventfd(2)).
EVENTFD_MAX = 2**64 - 2


class ClosedEventFdError(ValueError):
    """The ``EventFd`` was closed by its owner; its number is gone."""


class EventFd:
    """An owned, non-blocking, close-on-exec eventfd.

    ``EventFd()`` creates a new one; ``EventFd.adopt(fd)`` takes ownership of an
    existing number (e.g. one received with SCM_RIGHTS).
    """

    __slots__ = ("_fd",)

    def __init__(self) -> None:
        self._fd: int = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @classmethod
    def adopt(cls, fd: int) -> EventFd:
        """Own ``fd`` from now on: ``close()`` will close it. The fd is not checked."""
        if fd < 0:
            raise ValueError(f"cannot adopt fd {fd}")
        self = cls.__new__(cls)
        self._fd = fd
        return self

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        """The fd number; ``ClosedEventFdError`` once closed."""
        if self._fd < 0:
            raise ClosedEventFdError("eventfd is closed")
        return self._fd

    def signal(self, n: int = 1) -> None:
        """Add ``n`` to the counter, as the kernel's ``eventfd_signal`` does."""
        if not 1 <= n <= EVENTFD_MAX:
            raise ValueError(f"eventfd increment out of range: {n}")
        os.eventfd_write(self.fileno(), n)

    def read(self) -> int:
        """Take the counter (non-blocking 8-byte read); 0 when nothing is pending."""
        try:
            return os.eventfd_read(self.fileno())
        except BlockingIOError:
            return 0

    def close(self) -> None:
        """Close once; later calls do nothing. The number is forgotten before ``os.close``."""
        fd = self._fd
        if fd < 0:
            return
        self._fd = -1
        os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<EventFd fd={self._fd}>" if self._fd >= 0 else "<EventFd closed>"


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an open eventfd in this process.

    ``/proc/self/fdinfo/<fd>`` of an eventfd has an ``eventfd-count:`` line
    (``eventfd_show_fdinfo`` in fs/eventfd.c); fstat cannot tell it from other
    anonymous inodes (epoll, timerfd, signalfd).
    """
    if fd < 0:
        return False
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            info = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(line.startswith("eventfd-count:") for line in info.splitlines())
