"""Error codes and exceptions, typed by who is at fault.

The split follows h11: a :class:`LocalProtocolError` means *this* side misused
the API (a bug in the caller), a :class:`RemoteProtocolError` means the peer
sent something that is not our protocol (the connection cannot be trusted any
more), and a :class:`RequestError` means a well-formed request asked for
something invalid (answer it with an error response; the connection stays
usable). :class:`RpcError` is the client-side view of such an error response.

Every exception carries the error ``code`` to answer with, one of the short
upper-case strings below.
"""

from __future__ import annotations

import enum

__all__ = [
    "E2BIG",
    "EACCES",
    "EBUSY",
    "EINVAL",
    "EIO",
    "ENODEV",
    "ENOSPC",
    "ENOSYS",
    "EPROTO",
    "ERROR_CODES",
    "Disconnected",
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "RequestError",
    "RpcError",
]


class ErrorCode(enum.StrEnum):
    """The error code of an error response: a short upper-case string on the wire.

    The names follow errno's (``include/uapi/asm-generic/errno-base.h``) for
    their meaning, but they are strings, not the kernel's numbers: a member is
    equal to its wire string (``ErrorCode.EINVAL == "EINVAL"``) and msgpack
    encodes it as one. Compare a number from an ``OSError`` with ``errno.*``.
    """

    #: A parameter is malformed or out of range.
    EINVAL = "EINVAL"
    #: No room: the device has no more vectors or host vectors ran out.
    ENOSPC = "ENOSPC"
    #: The resource is taken (e.g. a vector another client claimed).
    EBUSY = "EBUSY"
    #: Not allowed for this client.
    EACCES = "EACCES"
    #: The device is gone, or the method does not apply to this device.
    ENODEV = "ENODEV"
    #: The byte stream or the message envelope is not this protocol,
    #: or a request came before ``hello``.
    EPROTO = "EPROTO"
    #: A message exceeded one of the decoder's limits.
    E2BIG = "E2BIG"
    #: Unknown method (an extension of the protocol's list, in the spirit of errno).
    ENOSYS = "ENOSYS"
    #: A device call failed in a way no other code describes (an extension too).
    EIO = "EIO"


# The module-level names of earlier versions, kept as aliases of the members.
EINVAL = ErrorCode.EINVAL
ENOSPC = ErrorCode.ENOSPC
EBUSY = ErrorCode.EBUSY
EACCES = ErrorCode.EACCES
ENODEV = ErrorCode.ENODEV
EPROTO = ErrorCode.EPROTO
E2BIG = ErrorCode.E2BIG
ENOSYS = ErrorCode.ENOSYS
EIO = ErrorCode.EIO

#: Every code the server may answer with; clients must accept others too
#: (an error response carries a plain ``str``, see :class:`RpcError`).
ERROR_CODES: tuple[ErrorCode, ...] = tuple(ErrorCode)


class ProtocolError(Exception):
    """Base of every protocol error; ``code`` is the error code to answer with.

    Every error class of this package and of the daemon takes the code first,
    then the message.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LocalProtocolError(ProtocolError):
    """This side misused the API, e.g. answered a request it never received.

    ``code`` is :data:`ErrorCode.EINVAL` unless said otherwise.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not this protocol.

    ``code`` is :data:`ErrorCode.EPROTO` (not msgpack, wrong shape, unknown
    id) or :data:`ErrorCode.E2BIG` (a limit was exceeded). The connection
    that raised it is broken for good.
    """


class RequestError(ProtocolError):
    """A well-formed request whose method or params are invalid.

    ``field`` names the offending part of the request in wire terms, e.g.
    ``method``, ``params``, ``params[1][3]`` or ``params[0].protocol``; the
    ``message`` starts with it. The server answers with an error response and
    keeps the connection.
    """

    def __init__(self, code: ErrorCode, field: str, detail: str) -> None:
        super().__init__(code, f"{field}: {detail}")
        self.field = field


class RpcError(Exception):
    """The server answered a call with an error response (client side).

    ``code`` is the string the server sent: usually one of :class:`ErrorCode`
    (and then equal to it), but a newer server may send others.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Disconnected(ConnectionError):
    """The server closed the connection while a client was waiting on it."""
