"""A sans-IO msgpack-RPC connection: bytes in, events out; messages in, bytes out.

The same class serves both roles, in the style of h11 and wsproto. It never
touches a socket: the caller feeds received bytes to :meth:`Connection.receive_data`,
pulls events with :meth:`Connection.next_event`, and writes whatever
:meth:`Connection.send` returns.

It keeps the envelope honest in both directions: a response must answer an
outstanding request (ours or theirs) exactly once. What a method's params mean
is not its business; see :mod:`irqproto.methods`.

Once the peer's bytes raised :class:`RemoteProtocolError`, the connection is
broken: every later :meth:`~Connection.next_event` raises again, because the
stream position is lost and nothing after it can be trusted. Sending stays
possible so a server can still explain itself before closing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .codec import Decoder, encode
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .limits import Limits
from .messages import (
    MAX_MSGID,
    NEED_DATA,
    ConnectionClosed,
    ErrorInfo,
    Event,
    Message,
    Notification,
    Request,
    Response,
    from_wire,
    to_wire,
)

__all__ = ["Connection"]


class Connection:
    """One end of a msgpack-RPC byte stream."""

    def __init__(self, limits: Limits | None = None, *, release_when_idle: bool = False) -> None:
        """Create a connection; ``limits`` bound what the peer may send.

        ``release_when_idle``: see :class:`~irqproto.codec.Decoder` (a server
        with many idle connections saves memory with it).
        """
        self.limits = limits or Limits()
        self._decoder = Decoder(self.limits, release_when_idle=release_when_idle)
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._next_msgid = 0
        self._ours: set[int] = set()  # requests we sent, awaiting their response
        self._theirs: set[int] = set()  # requests we received, awaiting our response

    @property
    def outstanding(self) -> frozenset[int]:
        """msgids of requests we sent that are not answered yet."""
        return frozenset(self._ours)

    @property
    def unanswered(self) -> frozenset[int]:
        """msgids of requests we received and have not answered yet."""
        return frozenset(self._theirs)

    @property
    def broken(self) -> RemoteProtocolError | None:
        """The error that broke the connection, or None."""
        return self._error

    @property
    def in_message(self) -> bool:
        """True while bytes of an incomplete message are buffered: the stream is
        not at a message boundary (a server hands a connection over only there)."""
        return self._decoder.in_message

    # -- receiving ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed (EOF)."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError(ErrorCode.EINVAL, "received data after EOF")
        self._decoder.feed(data)

    def next_event(self) -> Event:
        """The next event: a message, :class:`ConnectionClosed`, or :data:`NEED_DATA`.

        Raises :class:`RemoteProtocolError` if the peer broke the protocol, and
        again on every later call.
        """
        if self._error is not None:
            raise RemoteProtocolError(
                self._error.code, f"connection is broken: {self._error.message}"
            ) from self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Event:
        obj = self._decoder.next()
        if obj is NEED_DATA:
            if not self._eof:
                return NEED_DATA
            if self._decoder.in_message:
                raise RemoteProtocolError(
                    ErrorCode.EPROTO, "connection closed in the middle of a message"
                )
            return ConnectionClosed()
        msg = from_wire(obj)
        if isinstance(msg, Request):
            if msg.msgid in self._theirs:
                raise RemoteProtocolError(
                    ErrorCode.EPROTO, f"request id {msg.msgid} is already in flight"
                )
            self._theirs.add(msg.msgid)
        elif isinstance(msg, Response):
            if msg.msgid not in self._ours:
                raise RemoteProtocolError(
                    ErrorCode.EPROTO, f"response to unknown request id {msg.msgid}"
                )
            self._ours.discard(msg.msgid)
        return msg

    # -- sending -----------------------------------------------------------------

    def send(self, msg: Message) -> bytes:
        """The bytes of ``msg``; checks that a response answers an unanswered request.

        Raises :class:`LocalProtocolError` if ``msg`` is not valid to send now.
        Nothing is recorded unless the message could be encoded.
        """
        data = encode(to_wire(msg))
        if isinstance(msg, Request):
            if msg.msgid in self._ours:
                raise LocalProtocolError(
                    ErrorCode.EINVAL, f"request id {msg.msgid} is already in flight"
                )
            self._ours.add(msg.msgid)
        elif isinstance(msg, Response):
            if msg.msgid not in self._theirs:
                raise LocalProtocolError(
                    ErrorCode.EINVAL,
                    f"response to request id {msg.msgid}, which is not awaiting one",
                )
            self._theirs.discard(msg.msgid)
        return data

    def send_request(self, method: str, params: Sequence[Any]) -> tuple[int, bytes]:
        """Allocate a msgid and return it with the bytes of the request."""
        msgid = self._allocate_msgid()
        return msgid, self.send(Request(msgid, method, tuple(params)))

    def send_notification(self, method: str, params: Sequence[Any]) -> bytes:
        """The bytes of a notification."""
        return self.send(Notification(method, tuple(params)))

    def respond(self, request: Request | int, result: Any) -> bytes:
        """The bytes of a successful response to ``request`` (or its msgid)."""
        return self.send(Response(_msgid_of(request), None, result))

    def respond_error(self, request: Request | int, code: str, message: str) -> bytes:
        """The bytes of an error response to ``request`` (or its msgid)."""
        return self.send(Response(_msgid_of(request), ErrorInfo(code, message), None))

    def _allocate_msgid(self) -> int:
        if len(self._ours) > MAX_MSGID:
            raise LocalProtocolError(ErrorCode.EINVAL, "every msgid is in flight")
        # Wrap at 2**32 and skip ids still awaiting a response.
        while True:
            msgid = self._next_msgid
            self._next_msgid = (msgid + 1) & MAX_MSGID
            if msgid not in self._ours:
                return msgid


def _msgid_of(request: Request | int) -> int:
    return request.msgid if isinstance(request, Request) else request
