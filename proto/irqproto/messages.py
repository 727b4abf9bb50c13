"""The three msgpack-RPC messages, the connection events, and their wire shape.

On the wire (msgpack-RPC):

* request ``[0, msgid, method, params]``
* response ``[1, msgid, error, result]``; ``error`` is nil or ``[code, message]``
* notification ``[2, method, params]``

``msgid`` is a uint32, ``method`` a str, ``params`` an array. What is sent is
exactly that; what is received may also have a bin ``method`` and a lone value
for ``params`` (see :func:`from_wire`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, TypeAlias

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "MAX_MSGID",
    "NEED_DATA",
    "ConnectionClosed",
    "ErrorInfo",
    "Event",
    "Message",
    "NeedData",
    "Notification",
    "Request",
    "Response",
    "from_wire",
    "to_wire",
    "undecodable",
]

REQUEST = 0
RESPONSE = 1
NOTIFICATION = 2

#: msgid is a uint32 in msgpack-RPC.
MAX_MSGID = 2**32 - 1


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The error of a response: a short upper-case ``code`` and human text."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Request:
    """``[0, msgid, method, params]``: a call that expects a response."""

    msgid: int
    method: str
    params: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Response:
    """``[1, msgid, error, result]``: the answer to the request ``msgid``."""

    msgid: int
    error: ErrorInfo | None
    result: Any


@dataclass(frozen=True, slots=True)
class Notification:
    """``[2, method, params]``: a one-way message, never answered."""

    method: str
    params: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its end cleanly, on a message boundary."""


class NeedData(enum.Enum):
    """Type of :data:`NEED_DATA`: feed more bytes before asking again."""

    NEED_DATA = "NEED_DATA"


#: Returned by ``next_event`` when no complete message is buffered.
NEED_DATA = NeedData.NEED_DATA

Message: TypeAlias = Request | Response | Notification
Event: TypeAlias = Request | Response | Notification | ConnectionClosed | NeedData


def _check_msgid(msgid: object, err: type[LocalProtocolError | RemoteProtocolError]) -> int:
    # bool is an int subclass but never a valid msgid.
    if type(msgid) is not int or not 0 <= msgid <= MAX_MSGID:
        code = ErrorCode.EINVAL if err is LocalProtocolError else ErrorCode.EPROTO
        raise err(code, f"msgid must be a uint32, got {msgid!r}")
    return msgid


def from_wire(obj: Any) -> Message:
    """Turn a decoded msgpack object into a message.

    Raises :class:`RemoteProtocolError` (``EPROTO``) for anything that is not one
    of the three shapes. Liberal where the reading is unambiguous: a method
    given as bin is decoded (:func:`undecodable` flags one that is not UTF-8),
    and params that are not an array are one param. Inner values of ``params``
    and ``result`` are not checked here: that is the job of
    :mod:`irqproto.methods` and :mod:`irqproto.notifications`.
    """
    if not isinstance(obj, list) or not obj:
        raise RemoteProtocolError(
            ErrorCode.EPROTO, f"a message must be a non-empty array, got {_kind(obj)}"
        )
    tag = obj[0]
    if type(tag) is not int or tag not in (REQUEST, RESPONSE, NOTIFICATION):
        raise RemoteProtocolError(ErrorCode.EPROTO, f"unknown message type {tag!r}")
    if tag == REQUEST:
        if len(obj) != 4:
            raise RemoteProtocolError(ErrorCode.EPROTO, f"a request has 4 items, got {len(obj)}")
        _, msgid, method, params = obj
        _check_msgid(msgid, RemoteProtocolError)
        return Request(msgid, _method_from_wire(method), _params_from_wire(params))
    if tag == RESPONSE:
        if len(obj) != 4:
            raise RemoteProtocolError(ErrorCode.EPROTO, f"a response has 4 items, got {len(obj)}")
        _, msgid, error, result = obj
        _check_msgid(msgid, RemoteProtocolError)
        return Response(msgid, _error_from_wire(error), result)
    if len(obj) != 3:
        raise RemoteProtocolError(ErrorCode.EPROTO, f"a notification has 3 items, got {len(obj)}")
    _, method, params = obj
    return Notification(_method_from_wire(method), _params_from_wire(params))


def to_wire(msg: Message) -> list[Any]:
    """The msgpack-ready array for ``msg``.

    Raises :class:`LocalProtocolError` if ``msg`` could not be decoded by a peer
    (msgid out of range, method not a str, params not a sequence).
    """
    if isinstance(msg, Request):
        _check_msgid(msg.msgid, LocalProtocolError)
        _check_local_method(msg.method)
        return [REQUEST, msg.msgid, msg.method, _local_params(msg.params)]
    if isinstance(msg, Response):
        _check_msgid(msg.msgid, LocalProtocolError)
        error = None
        if msg.error is not None:
            if not isinstance(msg.error.code, str) or not isinstance(msg.error.message, str):
                raise LocalProtocolError(ErrorCode.EINVAL, "ErrorInfo code and message must be str")
            error = [msg.error.code, msg.error.message]
        return [RESPONSE, msg.msgid, error, msg.result]
    if isinstance(msg, Notification):
        _check_local_method(msg.method)
        return [NOTIFICATION, msg.method, _local_params(msg.params)]
    raise LocalProtocolError(ErrorCode.EINVAL, f"not a message: {msg!r}")


def _kind(obj: object) -> str:
    return type(obj).__name__


# What we accept from peers beyond the letter of msgpack-RPC, where the reading
# is unambiguous (docs/protocol.md, "What the daemon accepts"). Client
# libraries differ in ways the spec leaves loose; each rule here is one of them.


def _method_from_wire(method: object) -> str:
    """The method name of a request or notification: a str, or a bin.

    A bin holding valid UTF-8 is that name (libraries that pack a ``bytes``
    name as bin, e.g. pynvim's ``b"nvim_set_client_info"``). A bin that is not
    UTF-8 is kept as a str by the ``surrogateescape`` convention (PEP 383, as
    ``os.fsdecode`` does): every undecodable byte becomes one lone surrogate,
    which a str decoded from msgpack can never hold. :func:`undecodable` tells
    such a name apart, so a server can answer that request ``EINVAL`` and keep
    the stream, which is intact.
    """
    if isinstance(method, str):
        return method
    if isinstance(method, bytes):
        return method.decode("utf-8", "surrogateescape")
    raise RemoteProtocolError(ErrorCode.EPROTO, f"method must be a str or bin, got {_kind(method)}")


def undecodable(method: str) -> bool:
    """True if ``method`` came from a bin name that is not valid UTF-8."""
    try:
        method.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _params_from_wire(params: object) -> tuple[Any, ...]:
    """The params of a request or notification: an array, or one lone value.

    An array is the params. Anything else cannot be the params array, so it is
    read as the one param of a call (``"intx"`` is ``["intx"]``, nil is
    ``[nil]``). The method's own arity check then answers ``EINVAL`` if one
    param is wrong for it, and the connection stays usable.
    """
    if isinstance(params, list):
        return tuple(params)
    return (params,)


def _error_from_wire(error: object) -> ErrorInfo | None:
    if error is None:
        return None
    if (
        isinstance(error, list)
        and len(error) == 2
        and isinstance(error[0], str)
        and isinstance(error[1], str)
    ):
        return ErrorInfo(error[0], error[1])
    raise RemoteProtocolError(
        ErrorCode.EPROTO, f"error must be nil or [code, message], got {error!r:.80}"
    )


def _check_local_method(method: object) -> None:
    if not isinstance(method, str):
        raise LocalProtocolError(ErrorCode.EINVAL, f"method must be a str, got {_kind(method)}")


def _local_params(params: object) -> list[Any]:
    # A str is a sequence too, but params="x" is certainly a mistake.
    if not isinstance(params, list | tuple):
        raise LocalProtocolError(
            ErrorCode.EINVAL, f"params must be a list or tuple, got {_kind(params)}"
        )
    return list(params)
