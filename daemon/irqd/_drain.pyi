"""Type stub for the native ``irqd._drain`` (daemon/irqd/_drain.c)."""

def add(epfd: int, fd: int, token: int, /) -> None:
    """EPOLL_CTL_ADD ``fd`` for EPOLLIN with ``token << 32 | fd`` in ``epoll_data.u64``."""

def drain(epfd: int, maxevents: int, /) -> tuple[list[tuple[int, int]], list[int]]:
    """``epoll_wait(timeout=0)`` and an 8-byte read of every ready fd.

    Returns ``([(token, count)], [failed fd])``; failed fds are already removed.
    """
