"""EventFd: one owner per fd, which forgets the number before closing it."""

from __future__ import annotations

import os

import pytest

from irqd.eventfd import EVENTFD_MAX, ClosedEventFdError, EventFd, is_eventfd


def test_signal_and_read() -> None:
    with EventFd() as e:
        assert e.read() == 0
        e.signal()
        e.signal(41)
        assert e.read() == 42
        assert e.read() == 0


def test_created_non_blocking_and_cloexec() -> None:
    with EventFd() as e:
        fd = e.fileno()
        assert not os.get_blocking(fd)
        assert not os.get_inheritable(fd)
        assert is_eventfd(fd)


def test_close_is_idempotent_and_forgets_the_number() -> None:
    e = EventFd()
    fd = e.fileno()
    e.close()
    assert e.closed
    e.close()
    with pytest.raises(ClosedEventFdError):
        e.fileno()
    with pytest.raises(ValueError, match="closed"):
        e.signal()
    assert not is_eventfd(fd)
    assert "closed" in repr(e)


def test_adopt_takes_ownership() -> None:
    fd = os.eventfd(3, os.EFD_NONBLOCK)
    e = EventFd.adopt(fd)
    assert e.fileno() == fd
    assert e.read() == 3
    e.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError, match="adopt"):
        EventFd.adopt(-1)


def test_signal_range() -> None:
    with EventFd() as e:
        for bad in (0, -1, EVENTFD_MAX + 1):
            with pytest.raises(ValueError, match="range"):
                e.signal(bad)
        e.signal(EVENTFD_MAX)
        with pytest.raises(BlockingIOError):
            e.signal(1)  # the counter would overflow
        assert e.read() == EVENTFD_MAX


def test_is_eventfd_tells_other_files_apart() -> None:
    r, w = os.pipe()
    try:
        assert not is_eventfd(r)
    finally:
        os.close(r)
        os.close(w)
    assert not is_eventfd(-1)
    assert not is_eventfd(2**31 - 2)
