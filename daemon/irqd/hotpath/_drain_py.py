"""Pure-Python twin of ``irqd._drain`` with the identical contract.

Used when the extension is not built, and by the tests to check that both
behave the same. ``select.epoll`` stores only the fd in ``epoll_data``, so the
token is looked up in the caller's ``tokens`` map instead of being unpacked.
"""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Mapping

_FAILED = select.EPOLLERR | select.EPOLLHUP


def drain(
    ep: select.epoll, maxevents: int, tokens: Mapping[int, int]
) -> tuple[list[tuple[int, int]], list[int]]:
    """``epoll_wait(timeout=0)`` and an 8-byte read of every ready fd.

    Returns ``(counts, failed)``: ``[(token, count)]`` and the fds that hung up,
    errored or read short, already removed from ``ep``. An event for an fd that
    is not in ``tokens`` any more is ignored.
    """
    counts: list[tuple[int, int]] = []
    failed: list[int] = []
    # select.epoll.poll retries EINTR itself (PEP 475).
    for fd, events in ep.poll(0, maxevents):
        token = tokens.get(fd)
        if token is None:
            continue
        ok = not events & _FAILED
        if events & select.EPOLLIN:
            try:
                value = os.read(fd, 8)
            except BlockingIOError:
                pass  # someone else took the count first
            except OSError:
                ok = False
            else:
                if len(value) == 8:
                    counts.append((token, int.from_bytes(value, sys.byteorder)))
                else:
                    ok = False
        if not ok:
            ep.unregister(fd)
            failed.append(fd)
    return counts, failed
