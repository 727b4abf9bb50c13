"""The three msgpack-RPC messages, the connection events, and their wire shape.

On the wire (msgpack-RPC):

* request ``[0, msgid, method, params]``
* response ``[1, msgid, error, result]``; ``error`` is nil or ``[code, message]``
* notification ``[2, method, params]``

``msgid`` is a uint32, ``method`` a str, ``params`` an array.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, TypeAlias

from .errors import LocalProtocolError, RemoteProtocolError

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
        raise err(f"msgid must be a uint32, got {msgid!r}")
    return msgid


def from_wire(obj: Any) -> Message:
    """Turn a decoded msgpack object into a message.

    Raises :class:`RemoteProtocolError` (``EPROTO``) for anything that is not one
    of the three shapes. Inner values of ``params`` and ``result`` are not
    checked here: that is the job of :mod:`irqproto.methods` and
    :mod:`irqproto.notifications`.
    """
    if not isinstance(obj, list) or not obj:
        raise RemoteProtocolError(f"a message must be a non-empty array, got {_kind(obj)}")
    tag = obj[0]
    if type(tag) is not int or tag not in (REQUEST, RESPONSE, NOTIFICATION):
        raise RemoteProtocolError(f"unknown message type {tag!r}")
    if tag == REQUEST:
        if len(obj) != 4:
            raise RemoteProtocolError(f"a request has 4 items, got {len(obj)}")
        _, msgid, method, params = obj
        _check_msgid(msgid, RemoteProtocolError)
        _check_method(method)
        _check_params(params)
        return Request(msgid, method, tuple(params))
    if tag == RESPONSE:
        if len(obj) != 4:
            raise RemoteProtocolError(f"a response has 4 items, got {len(obj)}")
        _, msgid, error, result = obj
        _check_msgid(msgid, RemoteProtocolError)
        return Response(msgid, _error_from_wire(error), result)
    if len(obj) != 3:
        raise RemoteProtocolError(f"a notification has 3 items, got {len(obj)}")
    _, method, params = obj
    _check_method(method)
    _check_params(params)
    return Notification(method, tuple(params))


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
                raise LocalProtocolError("ErrorInfo code and message must be str")
            error = [msg.error.code, msg.error.message]
        return [RESPONSE, msg.msgid, error, msg.result]
    if isinstance(msg, Notification):
        _check_local_method(msg.method)
        return [NOTIFICATION, msg.method, _local_params(msg.params)]
    raise LocalProtocolError(f"not a message: {msg!r}")


def _kind(obj: object) -> str:
    return type(obj).__name__


def _check_method(method: object) -> None:
    if not isinstance(method, str):
        raise RemoteProtocolError(f"method must be a str, got {_kind(method)}")


def _check_params(params: object) -> None:
    if not isinstance(params, list):
        raise RemoteProtocolError(f"params must be an array, got {_kind(params)}")


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
    raise RemoteProtocolError(f"error must be nil or [code, message], got {error!r:.80}")


def _check_local_method(method: object) -> None:
    if not isinstance(method, str):
        raise LocalProtocolError(f"method must be a str, got {_kind(method)}")


def _local_params(params: object) -> list[Any]:
    # A str is a sequence too, but params="x" is certainly a mistake.
    if not isinstance(params, list | tuple):
        raise LocalProtocolError(f"params must be a list or tuple, got {_kind(params)}")
    return list(params)
