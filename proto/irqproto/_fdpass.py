"""Receiving file descriptors with SCM_RIGHTS (see unix(7), cmsg(3))."""

from __future__ import annotations

import array
import socket
from typing import Final

from ._client import close_fds
from .errors import ErrorCode, RemoteProtocolError

__all__ = ["ANCBUFSIZE", "RECV_FLAGS", "RECV_SIZE", "fds_from_ancdata"]

#: SCM_MAX_FD in include/net/scm.h: the most fds one sendmsg may carry.
SCM_MAX_FD: Final = 253
#: Room for one full SCM_RIGHTS message. Linux stops a stream recvmsg after the
#: first skb that carried fds, so one recvmsg never returns more than that.
ANCBUFSIZE: Final = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)
#: Received fds are close-on-exec, so a fork+exec elsewhere cannot leak them.
RECV_FLAGS: Final = socket.MSG_CMSG_CLOEXEC
#: Bytes per recvmsg: one maximal message in a single call.
RECV_SIZE: Final = 64 * 1024


def fds_from_ancdata(ancdata: list[tuple[int, int, bytes]], msg_flags: int) -> list[int]:
    """The fds in recvmsg's ancillary data.

    Raises :class:`RemoteProtocolError` if the kernel truncated the control
    data (fds were lost); the fds that did arrive are closed first.
    """
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(data[: len(data) - len(data) % ints.itemsize])
            fds.extend(ints)
    if msg_flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise RemoteProtocolError(
            ErrorCode.EPROTO, "the server sent more fds than one message may carry"
        )
    return fds
