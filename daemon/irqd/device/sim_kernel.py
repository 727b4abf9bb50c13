"""What the simulated device's rules share with the kernel: errnos and eventfd references.

The kernel holds a reference on each assigned eventfd (``eventfd_ctx_fdget``),
so closing the caller's fd does not detach it; the simulation holds its own
``dup`` for the same reason and closes it where the kernel would drop its
reference (``eventfd_ctx_put``).
"""

from __future__ import annotations

import errno
import os

from irqd.eventfd import is_eventfd


def fail(code: int) -> OSError:
    """The ``OSError`` a failed ioctl raises with ``code``."""
    return OSError(code, os.strerror(code))


def get_eventfd(fd: int) -> int:
    """``eventfd_ctx_fdget``: EBADF for no such fd, EINVAL for another kind of file.

    The dup pins the file as the kernel's reference does.
    """
    try:
        dup = os.dup(fd)
    except OSError as e:
        raise fail(errno.EBADF) from e
    if not is_eventfd(dup):
        os.close(dup)
        raise fail(errno.EINVAL)
    return dup  # os.dup makes it non-inheritable


def put(fd: int | None) -> None:
    """``eventfd_ctx_put``."""
    if fd is not None:
        os.close(fd)


def signal(fd: int | None, n: int) -> None:
    """``eventfd_signal``: adds n to the counter; nothing when no eventfd."""
    if fd is not None:
        os.eventfd_write(fd, n)
