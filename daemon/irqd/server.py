"""The Trio service: listening socket, the dispatch loop, one task pair per client.

Structure (one nursery, everything cancelled together on shutdown):

* ``_dispatch_loop`` waits on the dispatcher's single epoll fd, drains every
  ready eventfd in one native call and credits the counts to the sessions;
* ``_accept_loop`` takes connections and starts ``_client`` for each;
* ``_client`` runs the session's sender and reads requests in order, answering
  each through the session's output path.

A client can only ever end its own ``_client`` task: every exception from one
connection is caught, logged and turns into a closed connection.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

from irqd.config import ServerConfig
from irqd.device.base import Device, IrqIndex
from irqd.device.sim import SimDevice
from irqd.dispatcher import Dispatcher
from irqd.errors import EPROTO, ConfigError, IrqdError
from irqd.handlers import Handlers
from irqd.session import PeerCredentials, Session
from irqd.stats import LatencyHistogram
from irqd.vectors import VectorTable
from irqproto import methods as m
from irqproto.connection import Connection
from irqproto.errors import RemoteProtocolError, RequestError
from irqproto.messages import ConnectionClosed, NeedData, Request
from irqproto.notifications import ShutdownNotification

log = structlog.get_logger("irqd.server")

#: Bytes read from a client socket at a time; one message is at most 64 KiB.
RECV_SIZE = 65536

#: How long shutdown waits for each client to take its ``shutdown`` notification.
SHUTDOWN_FLUSH_SECONDS = 1.0


def open_device(config: ServerConfig) -> Device:
    """The device backend ``config`` names."""
    if config.device is not None:
        raise ConfigError(
            f"--device {config.device}: the VFIO backend is not part of this build yet; "
            "run the simulated device with --sim"
        )
    sim = config.sim
    return SimDevice(
        msix_vectors=sim.msix_vectors,
        noresize=sim.noresize,
        msi_vectors=sim.msi_vectors,
        intx=sim.intx,
    )


def bind_listener(path: Path, mode: int) -> socket.socket:
    """A listening Unix socket at ``path`` created with ``mode`` from the start.

    A leftover socket file is replaced only if nothing answers on it: a live
    daemon's socket is never stolen.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            path.unlink()
            log.info("socket.stale_removed", path=str(path))
        else:
            raise ConfigError(f"{path}: another daemon is listening on it")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    # bind() creates the file with the umask applied; setting the umask first
    # means there is no moment at which the socket has looser permissions.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock


@dataclass
class Daemon:
    """The running service's state."""

    config: ServerConfig
    device: Device
    dispatcher: Dispatcher = field(default_factory=Dispatcher)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    sessions: dict[int, Session] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.table = VectorTable(
            self.device,
            self.dispatcher,
            msix_strategy=self.config.msix_strategy,
            msix_prearm=self.config.msix_prearm,
        )
        self.handlers = Handlers(
            device=self.device,
            table=self.table,
            dispatcher=self.dispatcher,
            latency=self.latency,
            sessions=lambda: list(self.sessions.values()),
        )
        self._next_id = 1

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled; the caller owns and closes the listener."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dispatch_loop)
            nursery.start_soon(self._accept_loop, listener, nursery)
            task_status.started()

    async def shutdown(self, reason: str) -> None:
        """Tell every client; all together get ``SHUTDOWN_FLUSH_SECONDS`` to read it."""
        notification = ShutdownNotification(reason)
        with trio.move_on_after(SHUTDOWN_FLUSH_SECONDS):
            async with trio.open_nursery() as nursery:
                for session in list(self.sessions.values()):
                    session.post(notification)
                    nursery.start_soon(self._flush_quietly, session)

    @staticmethod
    async def _flush_quietly(session: Session) -> None:
        # A client may be leaving at this very moment; that is its business.
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            await session.flush()

    def close(self) -> None:
        """Disable every index, then close eventfds, the epoll set and the device."""
        self.table.close()
        self.dispatcher.close()
        self.device.close()

    # -- loops ---------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        epoll_fd = self.dispatcher.fileno()
        table = self.table
        while True:
            await trio.lowlevel.wait_readable(epoll_fd)
            result = self.dispatcher.drain()
            for token, count in result.counts:
                table.deliver(token, count)
            for token in result.failed:
                log.error("vector.eventfd_failed", token=token)

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            try:
                sock, _ = await listener.accept()
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of descriptors: back off instead of spinning on accept.
                log.warning("accept.backoff", error=exc.strerror)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._client, sock)

    async def _client(self, sock: trio.socket.SocketType) -> None:
        with sock:
            try:
                peer = PeerCredentials.of(sock)
            except OSError:
                return
            session = Session(sock, self._next_id, peer, self.latency)
            self._next_id += 1
            self.sessions[session.id] = session
            bound = log.bind(client=session.id, pid=peer.pid, uid=peer.uid)
            bound.info("client.connected")
            reason = "closed"
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_until_broken, session, nursery.cancel_scope)
                    reason = await self._read_requests(session)
                    nursery.cancel_scope.cancel()
                reason = session.close_reason or reason
            except Exception as exc:
                # Never let one client take the daemon down; log it loudly.
                bound.exception("client.crashed")
                reason = f"internal error: {exc!r}"
            finally:
                del self.sessions[session.id]
                subscriptions = len(self.table.subscriptions(session))
                with contextlib.suppress(IrqdError):
                    self.table.drop(session)
            bound.info(
                "client.disconnected",
                name=session.name,
                reason=reason,
                requests=session.requests,
                delivered=session.delivered,
                subscriptions_dropped=subscriptions,
            )

    @staticmethod
    async def _send_until_broken(session: Session, scope: trio.CancelScope) -> None:
        """The session's sender; a peer that went away ends the whole session."""
        try:
            await session.run_sender()
        except OSError as exc:
            session.close_reason = f"socket error: {exc.strerror or exc}"
            scope.cancel()

    async def _read_requests(self, session: Session) -> str:
        """Answer requests in order until the peer leaves; returns why it ended."""
        try:
            return await self._read_requests_until_closed(session)
        except OSError as exc:
            # ECONNRESET, EPIPE: the peer closed with data unread. An ordinary end.
            return f"socket error: {exc.strerror or exc}"

    async def _read_requests_until_closed(self, session: Session) -> str:
        conn = Connection()
        while True:
            data = await session.sock.recv(RECV_SIZE)
            conn.receive_data(data)
            while True:
                try:
                    event = conn.next_event()
                except RemoteProtocolError as exc:
                    return f"protocol error ({exc.code}): {exc.message}"
                if isinstance(event, NeedData):
                    break
                if isinstance(event, ConnectionClosed):
                    return "closed by client"
                if isinstance(event, Request):
                    session.requests += 1
                    await self._answer(session, conn, event)
                # A notification from a client means nothing to the server;
                # msgpack-RPC peers may send them, so they are ignored. (A
                # response can't arrive here: Connection rejects unknown ids.)

    async def _answer(self, session: Session, conn: Connection, request: Request) -> None:
        fds: list[int] = []
        if not session.greeted and request.method != m.HELLO:
            await session.respond(conn.respond_error(request, EPROTO, "send hello first"))
            return
        try:
            params = m.parse_params(request.method, request.params)
            reply = self.handlers.handle(session, request.method, params)
        except RequestError as exc:
            data = conn.respond_error(request, exc.code, exc.message)
        except IrqdError as exc:
            data = conn.respond_error(request, exc.code, exc.message)
        else:
            data = conn.respond(request, reply.result)
            fds = reply.fds
        await session.respond(data, fds)


def describe(config: ServerConfig, daemon: Daemon) -> dict[str, Any]:
    """What the start-up log line says about this instance."""
    msix = daemon.table.info[IrqIndex.MSIX]
    return {
        "socket": str(config.socket_path),
        "device": daemon.device.name,
        "msix_vectors": msix.count,
        "msix_noresize": msix.noresize,
        "msix_strategy": str(daemon.table.msix_strategy),
        "native_dispatch": daemon.dispatcher.native,
    }


@contextlib.contextmanager
def running_daemon(config: ServerConfig, device: Device | None = None) -> Iterator[Daemon]:
    """A ``Daemon`` whose device and fds are released however the block ends."""
    device = device if device is not None else open_device(config)
    try:
        daemon = Daemon(config, device)
    except BaseException:
        device.close()
        raise
    try:
        yield daemon
    finally:
        daemon.close()


async def serve(
    config: ServerConfig,
    *,
    device: Device | None = None,
    task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled or SIGINT/SIGTERM; ``task_status`` gets the Daemon."""
    with running_daemon(config, device) as daemon:
        raw = bind_listener(config.socket_path, config.socket_mode)
        listener = trio.socket.from_stdlib_socket(raw)
        try:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(daemon.serve, listener)
                    log.info("daemon.ready", **describe(config, daemon))
                    task_status.started(daemon)
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        log.info("daemon.stopping", signal=name)
                        await daemon.shutdown(f"daemon stopping ({name})")
                        nursery.cancel_scope.cancel()
                        break
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                config.socket_path.unlink()
        log.info("daemon.stopped")


def run(config: ServerConfig) -> int:
    """Blocking entry point for the CLI; returns the process exit code."""
    try:
        trio.run(serve, config)
    except ConfigError as exc:
        log.error("daemon.config_error", error=str(exc))
        return 2
    except OSError as exc:
        log.error("daemon.failed", error=str(exc), errno=exc.errno)
        return 1
    return 0
