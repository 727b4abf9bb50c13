"""The I/O-free half of both clients: calls in flight, received fds, notifications.

The blocking and the Trio client only move bytes and fds between a socket and
a :class:`ClientCore`; everything they have in common lives here, so both
behave alike and this part is testable without a socket.

File descriptors: the server attaches the fds of a ``claim``,
``sim.eventfds``, ``device.open`` or ``dma.alloc`` response to that
response's bytes with SCM_RIGHTS, possibly over several ``sendmsg`` calls
(Linux passes at most 253 fds per message). The kernel delivers fds no
later than the first byte they were attached to, so every fd a response
carries is in :attr:`ClientCore.fds` by the time the response is complete.
The fds arrive in the order of the responses, so responses take them
first-in, first-out; the result's ``vectors`` says how many (``claim``,
``device.open``, ``dma.alloc``: always one).
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .connection import Connection
from .errors import Disconnected, ErrorCode, RemoteProtocolError, RpcError
from .limits import CLIENT_LIMITS, Limits
from .messages import NEED_DATA, ConnectionClosed, ErrorInfo, Notification, Response
from .methods import CLAIM, DEVICE_OPEN, DMA_ALLOC, SIM_EVENTFDS
from .notifications import TypedNotification, parse_notification

__all__ = [
    "FD_METHODS",
    "ONE_FD_METHODS",
    "ClientCore",
    "Outcome",
    "close_fds",
    "fds_by_vector",
    "single_fd",
]

#: Methods whose successful response carries file descriptors.
FD_METHODS: Final = frozenset({CLAIM, SIM_EVENTFDS, DEVICE_OPEN, DMA_ALLOC})
#: Methods whose successful response carries exactly one fd: the vector's eventfd
#: (``claim``), the VFIO device fd (``device.open``), the buffer's memfd (``dma.alloc``).
ONE_FD_METHODS: Final = frozenset({CLAIM, DEVICE_OPEN, DMA_ALLOC})


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished call: the response's error or result, and the fds it carried."""

    error: ErrorInfo | None
    result: Any
    fds: tuple[int, ...]

    def unwrap(self) -> Any:
        """The result, or :class:`RpcError` (closing the fds) for an error."""
        if self.error is not None:
            close_fds(self.fds)
            raise RpcError(self.error.code, self.error.message)
        return self.result


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd; one that fails to close must not leak the others."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ClientCore:
    """State shared by the clients; feed it with :meth:`receive`."""

    def __init__(self, limits: Limits | None = None) -> None:
        """Create the core; ``limits`` bound what the server may send
        (default :data:`~irqproto.limits.CLIENT_LIMITS`)."""
        self.conn = Connection(limits if limits is not None else CLIENT_LIMITS)
        self.fds: deque[int] = deque()  # received, not yet taken by a response
        self.notifications: deque[TypedNotification | Notification] = deque()
        self.eof = False
        self.error: Exception | None = None
        self._methods: dict[int, str] = {}  # msgid -> method of calls in flight
        self._abandoned: set[int] = set()
        self._done: dict[int, Outcome] = {}

    def start_call(self, method: str, params: Sequence[Any]) -> tuple[int, bytes]:
        """Begin a call; returns its msgid and the bytes to send."""
        self.check()
        if self.eof:
            raise Disconnected("the server closed the connection")
        msgid, data = self.conn.send_request(method, params)
        self._methods[msgid] = method
        return msgid, data

    def take(self, msgid: int) -> Outcome | None:
        """The outcome of call ``msgid`` if it finished, else None.

        Raises the connection's error, or :class:`Disconnected` if the server
        closed before answering.
        """
        outcome = self._done.pop(msgid, None)
        if outcome is not None:
            return outcome
        self.check()
        if self.eof:
            raise Disconnected("the server closed the connection before answering")
        return None

    def abandon(self, msgid: int) -> None:
        """Forget call ``msgid`` (it timed out); fds it brings later are closed."""
        outcome = self._done.pop(msgid, None)
        if outcome is not None:
            close_fds(outcome.fds)
        elif msgid in self._methods:
            self._abandoned.add(msgid)

    def next_notification(self) -> TypedNotification | Notification | None:
        """The oldest queued notification, or None.

        Raises the connection's error, or :class:`Disconnected` at EOF once the
        queue is empty.
        """
        if self.notifications:
            return self.notifications.popleft()
        self.check()
        if self.eof:
            raise Disconnected("the server closed the connection")
        return None

    def check(self) -> None:
        """Raise the error that broke the connection, if any."""
        if self.error is not None:
            raise self.error

    def fail(self, error: Exception) -> Exception:
        """Record that the transport failed; later calls raise it.

        A peer that hung up (``EPIPE``, ``ECONNRESET``) becomes
        :class:`Disconnected`. Returns the exception to raise.
        """
        if isinstance(error, BrokenPipeError | ConnectionResetError):
            disconnected = Disconnected(f"the server closed the connection: {error}")
            disconnected.__cause__ = error
            error = disconnected
        if self.error is None:
            self.error = error
        self.close()
        return self.error

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Process bytes (``b""`` = EOF) and the fds that came with them."""
        self.fds.extend(fds)
        if self.error is not None:
            self.close()  # nobody will take them
            return
        self.conn.receive_data(data)
        try:
            self._process()
        except RemoteProtocolError as exc:
            self.fail(exc)

    def close(self) -> None:
        """Close every received fd that no response took."""
        close_fds(self.fds)
        self.fds.clear()
        for outcome in self._done.values():
            close_fds(outcome.fds)
        self._done.clear()

    def _process(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, ConnectionClosed):
                self.eof = True
                return
            if isinstance(event, Response):
                self._finish(event)
            elif isinstance(event, Notification):
                self.notifications.append(parse_notification(event))
            else:  # a request: the server does not call clients
                raise RemoteProtocolError(
                    ErrorCode.EPROTO, f"unexpected request {event.method!r:.40} from server"
                )

    def _finish(self, response: Response) -> None:
        method = self._methods.pop(response.msgid)
        fds: tuple[int, ...] = ()
        if response.error is None and method in FD_METHODS:
            fds = self._take_fds(method, response.result)
        if response.msgid in self._abandoned:
            self._abandoned.discard(response.msgid)
            close_fds(fds)
            return
        self._done[response.msgid] = Outcome(response.error, response.result, fds)

    def _take_fds(self, method: str, result: Any) -> tuple[int, ...]:
        vectors = result.get("vectors") if isinstance(result, dict) else None
        if method in ONE_FD_METHODS:
            count = 1
        elif isinstance(vectors, list):
            count = len(vectors)
        else:
            raise RemoteProtocolError(
                ErrorCode.EPROTO, f"{method} result must list its vectors, got {result!r:.80}"
            )
        if count > len(self.fds):
            raise RemoteProtocolError(
                ErrorCode.EPROTO, f"{method} response promised {count} fds, {len(self.fds)} arrived"
            )
        return tuple(self.fds.popleft() for _ in range(count))


def fds_by_vector(result: Any, fds: tuple[int, ...], vectors: Sequence[int]) -> list[int]:
    """Order the fds of a ``sim.eventfds`` response like the requested ``vectors``.

    The result lists its vectors in fd order, which need not be the order asked
    for; fds of vectors nobody asked for are closed. Raises
    :class:`RemoteProtocolError` (closing every fd) if a requested vector is missing.
    """
    sent = result.get("vectors") if isinstance(result, dict) else None
    by_vector = dict(zip(sent, fds, strict=True)) if isinstance(sent, list) else {}
    missing = [v for v in vectors if v not in by_vector]
    if missing:
        close_fds(fds)
        raise RemoteProtocolError(
            ErrorCode.EPROTO, f"sim.eventfds result lacks vectors {missing[:8]}"
        )
    wanted = [by_vector.pop(v) for v in vectors]
    close_fds(by_vector.values())
    return wanted


def single_fd(outcome: Outcome, method: str = CLAIM) -> int:
    """The one fd of a ``claim``/``device.open``/``dma.alloc`` response;
    :class:`RemoteProtocolError` otherwise."""
    if len(outcome.fds) != 1:
        close_fds(outcome.fds)
        raise RemoteProtocolError(
            ErrorCode.EPROTO, f"{method} carried {len(outcome.fds)} fds, expected 1"
        )
    return outcome.fds[0]
