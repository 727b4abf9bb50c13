"""The per-client request loop: read, answer in order, timeouts, error mapping.

One task per client (``Clients.serve``) runs the session's sender and reads
requests, answering each through the session's output path. Whatever one
connection raises is caught, logged and turns into a closed connection: a
client can only ever end its own task.

What a restart after a crash needs is recorded (``HandoverController.record``,
irqd.process.livestore) once a session starts, before it is read from; after
every request, before its response is written (a client that read the
response can count on what it did surviving a crash); and once it ended.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import structlog
import trio

from irqd.errors import E2BIG, EIO, ENOSPC, EPROTO, IrqdError
from irqd.hotpath.interface import HotLoop
from irqd.hotpath.session import PeerCredentials, Session
from irqd.server.handlers import AccessDenied, Handlers, Reply
from irqd.server.handover import HandoverController
from irqd.server.sessions import SessionSet
from irqd.server.vectors import VectorTable
from irqproto import methods as m
from irqproto.connection import Connection
from irqproto.errors import RemoteProtocolError, RequestError
from irqproto.messages import ConnectionClosed, NeedData, Notification, Request

log = structlog.get_logger("irqd.server.clients")

#: Bytes read from a client socket at a time; one message is at most 64 KiB.
RECV_SIZE = 65536


#: Methods that change nothing the crash record holds (the table, the sessions,
#: the DMA buffers): no record is written after them. Building the record costs
#: milliseconds with thousands of vectors, and ``stats`` is polled by ``top``.
#: Counters are refreshed by the status loop instead.
_STATE_UNCHANGED = frozenset(
    {m.DEVICE_INFO, m.STATS, m.DEVICE_REGIONS, m.DEVICE_OPEN, m.TRIGGER, m.UNMASK, m.SIM_EVENTFDS}
)


class Clients:
    """Serves each client: its sender, its requests in order, its time limits."""

    def __init__(
        self,
        sessions: SessionSet,
        table: VectorTable,
        hot: HotLoop,
        handover: HandoverController,
        handlers: Callable[[], Handlers],
    ) -> None:
        """``handlers`` returns the handlers with the current settings (a reload may
        change them between two requests)."""
        self.sessions = sessions
        self.table = table
        self.hot = hot
        self.handover = handover
        self.handlers = handlers

    def open(self, sock: trio.socket.SocketType, peer: PeerCredentials) -> Session | None:
        """A new session for an admitted peer; ``None`` (logged) if the hot loop refuses it."""
        try:
            session = self.hot.new_session(sock, self.sessions.next_id, peer)
        except (OSError, ValueError) as exc:
            log.error("client.refused", pid=peer.pid, error=str(exc))
            return None
        self.sessions.take_id()
        return session

    async def serve_new(self, sock: trio.socket.SocketType, peer: PeerCredentials) -> None:
        """Serve an admitted connection until it ends; closes ``sock``."""
        with sock:
            session = self.open(sock, peer)
            if session is not None:
                await self.serve(session, adopted=False)

    async def serve_adopted(self, session: Session) -> None:
        """Serve a session carried over from the previous daemon process
        (irqd.server.handover) until it ends; closes its socket."""
        await self.serve(session, adopted=True)

    async def serve(self, session: Session, *, adopted: bool) -> None:
        """Serve ``session`` until it ends; closes its socket."""
        peer = session.peer
        with session.sock:
            self.sessions.add(session)
            self.handover.served(session)
            # Its socket into the fd store before anything is read from it.
            self.handover.record()
            bound = log.bind(client=session.id, pid=peer.pid, uid=peer.uid)
            bound.info("client.adopted" if adopted else "client.connected")
            reason = "closed"
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_send_until_broken, session, nursery.cancel_scope)
                    nursery.start_soon(self._enforce_timeouts, session, nursery.cancel_scope)
                    reason = await self._read_requests(session)
                    nursery.cancel_scope.cancel()
                reason = session.close_reason or reason
            except Exception as exc:
                # Never let one client take the daemon down; log it loudly.
                bound.exception("client.crashed")
                reason = f"internal error: {exc!r}"
            finally:
                subscriptions, claims = self._leave(session, bound)
                # At once, with no checkpoint since: no fd number it freed is
                # reused under one of its names before the store knows.
                self.handover.record()
            bound.info(
                "client.disconnected",
                name=session.name,
                reason=reason,
                requests=session.requests,
                delivered=session.delivered,
                subscriptions_dropped=subscriptions,
                claims_released=claims,
            )

    def _leave(
        self, session: Session, bound: structlog.typing.FilteringBoundLogger
    ) -> tuple[int, int]:
        """Forget the session and drop what it held; returns (subscriptions, claims)."""
        self.sessions.remove(session)
        subscriptions = len(self.table.subscriptions(session))
        claims = len(self.table.claims(session))
        try:
            self.table.drop(session)
        except IrqdError:
            pass
        except Exception:
            bound.exception("client.cleanup_failed")
        finally:
            # Before the socket is closed: the hot loop must not write to
            # whatever gets this fd number next.
            session.close_output()
        try:
            self.handlers().broker.release(session)  # its DMA buffers
        except Exception:
            bound.exception("client.dma_cleanup_failed")
        return subscriptions, claims

    async def _enforce_timeouts(self, session: Session, scope: trio.CancelScope) -> None:
        """End a session that does not say ``hello`` in time, or that sits idle.

        Idle means: no request for ``idle_timeout`` seconds *and* nothing held.
        A client with a subscription or a claim is waiting for interrupts, which
        is what it is for, however long that takes.
        """
        limits = self.handlers().limits
        await trio.sleep_until(session.last_request + limits.hello_timeout)
        if not session.greeted:
            session.close_reason = f"limit: no hello within {limits.hello_timeout:g} s"
            scope.cancel()
            return
        while True:
            limits = self.handlers().limits
            deadline = session.last_request + limits.idle_timeout
            if trio.current_time() < deadline:
                await trio.sleep_until(deadline)
                continue
            if self.table.subscriptions(session) or self.table.claims(session):
                # Not idle; look again one period from now.
                await trio.sleep(limits.idle_timeout)
                continue
            session.close_reason = f"limit: idle for {limits.idle_timeout:g} s"
            scope.cancel()
            return

    async def _read_requests(self, session: Session) -> str:
        """Answer requests in order until the peer leaves; returns why it ended."""
        try:
            return await self._read_requests_until_closed(session)
        except OSError as exc:
            # ECONNRESET, EPIPE: the peer closed with data unread. An ordinary end.
            return f"socket error: {exc.strerror or exc}"

    async def _read_requests_until_closed(self, session: Session) -> str:
        """Read, then answer in order everything that read completed; repeat.

        Requests are "outstanding" from the read that completes them until
        their answer is written. The socket is read again only once all are
        answered, so a client that stops reading its answers stops being read
        (and costs nothing); one read holding more than ``max_outstanding``
        complete requests is a client pipelining past the limit: ``E2BIG``,
        closed like any other exceeded limit.
        """
        limits = self.handlers().limits
        # Clients are idle nearly all the time; their requests are rare.
        conn = Connection(limits.message, release_when_idle=True)
        while True:
            data = await self._receive(session, conn)
            conn.receive_data(data)
            del data  # not kept alive while the next recv waits
            batch: list[Request] = []
            ended: str | None = None
            while ended is None:
                try:
                    event = conn.next_event()
                except RemoteProtocolError as exc:
                    ended = f"protocol error ({exc.code}): {exc.message}"
                    break
                if isinstance(event, NeedData):
                    break
                if isinstance(event, ConnectionClosed):
                    ended = "closed by client"
                elif isinstance(event, Request):
                    batch.append(event)
                    if len(batch) > limits.max_outstanding:
                        return (
                            f"limit ({E2BIG}): more than {limits.max_outstanding} "
                            "requests outstanding"
                        )
                elif isinstance(event, Notification):
                    # A notification from a client means nothing to the server,
                    # but client libraries send their own ("$/cancelRequest",
                    # "nvim_set_client_info"): ignored, never answered. (A
                    # response can't arrive here: Connection rejects unknown ids.)
                    method = repr(event.method[:80])
                    log.debug("client.notification", client=session.id, method=method)
            await self._answer_all(session, conn, batch)
            if ended is not None:
                return ended

    async def _receive(self, session: Session, conn: Connection) -> bytes:
        """The next bytes from a client; during a hand-over, parks at a message boundary.

        A request that has started to arrive is received (and answered) first;
        only a connection whose input is at a message boundary is parked, so
        nothing the client sent is lost: unread bytes stay in the socket for
        the next daemon process.
        """
        while True:
            if conn.in_message:
                return await session.sock.recv(RECV_SIZE)
            await self.handover.boundary(session)
            with self.handover.interruptible(session):
                return await session.sock.recv(RECV_SIZE)

    async def _answer_all(self, session: Session, conn: Connection, batch: list[Request]) -> None:
        # A helper, so that no local keeps the last request alive while the
        # next recv waits: a subscribe to 2048 vectors is 2048 int objects, per
        # idle client.
        while batch:
            request = batch.pop(0)
            session.requests += 1
            session.last_request = trio.current_time()
            await self._answer(session, conn, request)

    async def _answer(self, session: Session, conn: Connection, request: Request) -> None:
        if not session.greeted and request.method != m.HELLO:
            await session.respond(conn.respond_error(request, EPROTO, "send hello first"))
            return
        handlers = self.handlers()
        reply: Reply | None = None
        try:
            try:
                params = m.parse_params(request.method, request.params)
                reply = handlers.handle(session, request.method, params)
            except (RequestError, IrqdError) as exc:
                if isinstance(exc, AccessDenied):
                    _log_denied(session, request, exc)
                data = conn.respond_error(request, exc.code, exc.message)
            except OSError as exc:
                # Not a device call (those become IrqdError): creating an
                # eventfd or a dup, which fails when the daemon is out of fds.
                code = ENOSPC if exc.errno in (errno.EMFILE, errno.ENFILE) else EIO
                data = conn.respond_error(request, code, f"{request.method}: {exc.strerror}")
            else:
                data = conn.respond(request, reply.result)
            # Before the response (also of a failed request: a device call may
            # have been made): a client that read it can count on what the
            # request did surviving a crash (irqd.process.livestore).
            if request.method not in _STATE_UNCHANGED:
                self.handover.record()
            await session.respond(data, reply.fds if reply is not None else ())
        finally:
            # Sent or not, the reply's fds are dups that only it owns.
            if reply is not None:
                reply.close()


def _log_denied(session: Session, request: Request, exc: AccessDenied) -> None:
    log.warning(
        "access.denied",
        action=exc.action.value,
        method=request.method,
        client=session.id,
        pid=session.peer.pid,
        uid=session.peer.uid,
        gid=session.peer.gid,
        reason=exc.message,
    )


async def _send_until_broken(session: Session, scope: trio.CancelScope) -> None:
    """The session's sender; a peer that went away ends the whole session."""
    try:
        await session.run_sender()
    except OSError as exc:
        session.close_reason = f"socket error: {exc.strerror or exc}"
        scope.cancel()
