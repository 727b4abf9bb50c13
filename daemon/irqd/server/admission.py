"""Taking connections: the accept loop, admission by the policy, refusal with a clear error.

A connection is admitted when the policy lets its peer ``connect`` and the
daemon serves fewer than ``max_clients``; it is then served by
``irqd.server.clients``. A refused one gets an error response to its first
request (``EACCES``, ``E2BIG``), not a bare EOF.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
import trio

from irqd.errors import E2BIG, EACCES
from irqd.hotpath.session import PeerCredentials
from irqd.policy import Action
from irqd.server.handlers import Handlers
from irqd.server.sessions import SessionSet
from irqproto.connection import Connection
from irqproto.errors import RemoteProtocolError
from irqproto.messages import NeedData, Request

log = structlog.get_logger("irqd.server.admission")

#: Bytes read from a refused client at a time; one message is at most 64 KiB.
RECV_SIZE = 65536

#: How long the accept loop pauses when accept() fails for want of fds or memory.
ACCEPT_BACKOFF_SECONDS = 0.1

#: Serves an admitted connection until it ends, closing it.
Serve = Callable[[trio.socket.SocketType, PeerCredentials], Awaitable[None]]


@dataclass
class _Slots:
    """Connections being served, and refusals being answered (``_accept_loop``)."""

    clients: int = 0
    refusing: int = 0


class Admission:
    """The accept loop and who gets in."""

    def __init__(
        self, sessions: SessionSet, handlers: Callable[[], Handlers], serve: Serve
    ) -> None:
        """``handlers`` returns the handlers with the current policy and limits."""
        self.sessions = sessions
        self.handlers = handlers
        self.serve = serve
        #: The listening socket, once ``start`` was given it (the caller owns it).
        self.listener: trio.socket.SocketType | None = None
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None

    def start(self, nursery: trio.Nursery, listener: trio.socket.SocketType) -> None:
        """Accept on ``listener`` in ``nursery``, where every connection is served too."""
        self._nursery = nursery
        self.listener = listener
        self.resume()

    def stop(self) -> None:
        """Accept nothing more (until ``resume``); connections already taken go on."""
        if self._scope is not None:
            self._scope.cancel()

    def resume(self) -> None:
        """Accept again after ``stop``."""
        if self._nursery is None or self.listener is None:
            return
        self._scope = scope = trio.CancelScope()
        self._nursery.start_soon(self._accept_guarded, self.listener, self._nursery, scope)

    async def _accept_guarded(
        self, listener: trio.socket.SocketType, nursery: trio.Nursery, scope: trio.CancelScope
    ) -> None:
        with scope:
            await self._accept_loop(listener, nursery)

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        handlers = self.handlers()
        handlers.socket_gid = socket_group(listener)
        if handlers.socket_gid is None:
            log.warning(
                "access.no_socket_group", note="'socket-group' in the policy matches nobody"
            )
        slots = _Slots()
        failures = 0
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue  # that peer gave up before we took it; the next may not
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of descriptors (or kernel memory): the connection stays in
                # the backlog, and the listener stays readable, so back off
                # instead of spinning on accept; one line per episode, not per try.
                if not failures:
                    log.warning(
                        "accept.backoff",
                        error=exc.strerror,
                        errno=errno.errorcode.get(exc.errno or 0, "?"),
                        clients=len(self.sessions),
                    )
                failures += 1
                await trio.sleep(ACCEPT_BACKOFF_SECONDS)
                continue
            if failures:
                log.info("accept.recovered", retries=failures, clients=len(self.sessions))
                failures = 0
            self._take(sock, nursery, slots)

    def _take(self, sock: trio.socket.SocketType, nursery: trio.Nursery, slots: _Slots) -> None:
        """Serve ``sock``, or refuse it when the daemon is full."""
        limits = self.handlers().limits
        if max(slots.clients, len(self.sessions)) >= limits.max_clients:
            if slots.refusing >= limits.max_clients:
                sock.close()  # even the refusals are at their limit: no answer
                return
            slots.refusing += 1
            message = f"too many clients: this daemon serves at most {limits.max_clients}"
            log.warning("client.refused", reason=message)
            nursery.start_soon(self._refuse_counted, sock, E2BIG, message, slots)
            return
        slots.clients += 1
        nursery.start_soon(self._connection_counted, sock, slots)

    async def _connection_counted(self, sock: trio.socket.SocketType, slots: _Slots) -> None:
        try:
            await self._connection(sock)
        finally:
            slots.clients -= 1

    async def _connection(self, sock: trio.socket.SocketType) -> None:
        """Admit the peer (or refuse it) and serve it; ``sock`` is closed in the end."""
        with sock:
            try:
                peer = PeerCredentials.of(sock)
            except OSError:
                return
            if await self._admit(sock, peer):
                await self.serve(sock, peer)

    async def _refuse_counted(
        self, sock: trio.socket.SocketType, code: str, message: str, slots: _Slots
    ) -> None:
        try:
            with sock:
                await self.refuse(sock, code, message)
        finally:
            slots.refusing -= 1

    async def refuse(self, sock: trio.socket.SocketType, code: str, message: str) -> None:
        """Answer the first request with ``code`` and close: a clear error, not a bare EOF.

        Given ``refuse_timeout`` seconds; anything unexpected just closes.
        """
        limits = self.handlers().limits
        conn = Connection(limits.message)
        with trio.move_on_after(limits.refuse_timeout), contextlib.suppress(OSError):
            while True:
                try:
                    event = conn.next_event()
                except RemoteProtocolError:
                    return
                if isinstance(event, Request):
                    data = memoryview(conn.respond_error(event, code, message))
                    while data:
                        data = data[await sock.send(data) :]
                    return
                if not isinstance(event, NeedData):
                    return  # closed, or not a request
                chunk = await sock.recv(RECV_SIZE)
                conn.receive_data(chunk)

    async def _admit(self, sock: trio.socket.SocketType, peer: PeerCredentials) -> bool:
        """Whether the policy lets ``peer`` connect; a refused peer gets ``EACCES``."""
        handlers = self.handlers()
        reason = handlers.policy.denial(Action.CONNECT, peer, socket_gid=handlers.socket_gid)
        if reason is None:
            return True
        log.warning(
            "access.denied",
            action=Action.CONNECT.value,
            pid=peer.pid,
            uid=peer.uid,
            gid=peer.gid,
            reason=reason,
        )
        await self.refuse(sock, EACCES, reason)
        return False


def socket_group(listener: trio.socket.SocketType) -> int | None:
    """The gid owning the listening socket's file, or ``None`` (abstract, unlinked)."""
    try:
        name = listener.getsockname()
        path = os.fsdecode(name) if isinstance(name, bytes) else name
        if not isinstance(path, str) or not path or path.startswith("\0"):
            return None
        return os.stat(path).st_gid
    except OSError:
        return None
