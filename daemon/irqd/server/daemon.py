"""The running daemon: the dispatch loop, the accept loop, one task pair per client.

``Daemon`` serves on a listening socket it is given; the process around it
(binding or inheriting that socket, opening or adopting the device, signals,
``run``) is irqd.process.service.

Structure (one nursery, everything cancelled together on shutdown):

* the hot loop forwards interrupts: with ``hot_loop = native`` (the default
  when built) a thread of ``irqd._hotloop`` does it without entering Python
  (irqd.hotpath.native); with ``python``, ``_dispatch_loop`` waits on the
  dispatcher's single epoll fd, drains every ready eventfd in one native call
  and credits the counts to the sessions. ``_dispatch_loop`` also polls the
  daemon's own eventfds (watchdog heartbeat, REQ, ERR) in both modes;
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
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import trio

from irqd.config import HotLoop, ServerConfig
from irqd.configfile import ConfigFileError, load_settings
from irqd.device.base import Device, IrqIndex
from irqd.device.events import DeviceEvents
from irqd.errors import E2BIG, EACCES, EIO, ENOSPC, EPROTO, IrqdError
from irqd.eventfd import EventFd
from irqd.hotpath.dispatcher import TOKEN_MAX, Dispatcher
from irqd.hotpath.native import NativeVectors, resolve_hot_loop
from irqd.hotpath.native_session import NativeSession
from irqd.hotpath.session import PeerCredentials, Session
from irqd.logsetup import set_log_level
from irqd.policy import Action
from irqd.process.fdstore import (
    DEVICE_PREFIX,
    LISTENER_NAME,
    STATE_NAME,
    StoredFds,
    client_fd_name,
    device_fds,
    event_fd_name,
    export_device,
    vector_fd_name,
    write_state,
)
from irqd.process.sdnotify import Notifier
from irqd.server.handlers import AccessDenied, Handlers, Reply
from irqd.server.vectors import VectorTable
from irqd.stats import LatencyHistogram
from irqproto import methods as m
from irqproto.connection import Connection
from irqproto.errors import RemoteProtocolError, RequestError
from irqproto.messages import ConnectionClosed, NeedData, Request
from irqproto.notifications import ShutdownNotification

log = structlog.get_logger("irqd.server.daemon")

#: Bytes read from a client socket at a time; one message is at most 64 KiB.
RECV_SIZE = 65536

#: How long the accept loop pauses when accept() fails for want of fds or memory.
ACCEPT_BACKOFF_SECONDS = 0.1

#: How long shutdown waits for each client to take its ``shutdown`` notification.
SHUTDOWN_FLUSH_SECONDS = 1.0

#: How often ``STATUS=`` is looked at (and sent only when it changed).
STATUS_PERIOD = 1.0

#: Longest the watchdog waits (blocking) for the native hot thread to answer a
#: poke; one that does not is stuck, and the ping is withheld.
HOT_THREAD_ANSWER_S = 0.25

#: How often failed vector eventfds reported by the hot thread are logged.
NATIVE_FAILURES_PERIOD = 1.0

#: How long a hand-over waits for clients to reach a message boundary, and
#: then for their output to be idle; clients not there by then are left out.
HANDOVER_DRAIN_SECONDS = 2.0

#: The dispatcher token of the watchdog's heartbeat eventfd; vector tokens
#: (``make_token``) never reach it.
HEARTBEAT_TOKEN = TOKEN_MAX


@dataclass
class Daemon:
    """The running service's state."""

    config: ServerConfig
    device: Device
    dispatcher: Dispatcher = field(default_factory=Dispatcher)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    sessions: dict[int, Session] = field(default_factory=dict)
    #: REQ/ERR eventfds carried over from a previous process (irqd.process.fdstore);
    #: taken (emptied) by ``DeviceEvents``.
    carried_events: dict[IrqIndex, EventFd] = field(default_factory=dict)

    def __post_init__(self) -> None:
        #: The native hot loop, or ``None`` when the Trio dispatcher forwards
        #: interrupts (which then also polls the vectors' eventfds). The
        #: dispatcher always polls the daemon's own: heartbeat, REQ and ERR.
        self.native: NativeVectors | None = None
        if resolve_hot_loop(self.config.hot_loop) is HotLoop.NATIVE:
            self.native = NativeVectors()
            self.latency.add_source(self.native.latency_counts)
        self.table = VectorTable(
            self.device,
            self.dispatcher if self.native is None else self.native,
            msix_strategy=self.config.msix_strategy,
            msix_prearm=self.config.msix_prearm,
        )
        self.handlers = Handlers(
            device=self.device,
            table=self.table,
            dispatcher=self.dispatcher,
            native=self.native,
            latency=self.latency,
            sessions=lambda: list(self.sessions.values()),
        )
        # REQ and ERR, armed now (irqd/device_events.py).
        self.events = DeviceEvents(
            self.device,
            self.table,
            self.dispatcher,
            lambda: list(self.sessions.values()),
            adopted=self.carried_events,
        )
        self._next_id = 1
        self._init_service()

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled; the caller owns and closes the listener."""
        async with trio.open_nursery() as nursery:
            self._start_tasks(nursery, listener)
            task_status.started()

    async def shutdown(self, reason: str) -> None:
        """Tell every client; all together get ``SHUTDOWN_FLUSH_SECONDS`` to read it."""
        notification = ShutdownNotification(reason)
        with trio.move_on_after(SHUTDOWN_FLUSH_SECONDS):
            async with trio.open_nursery() as nursery:
                for session in list(self.sessions.values()):
                    session.post(notification)
                    nursery.start_soon(self._flush_quietly, session)

    async def stop(self, reason: str) -> None:
        """SIGTERM: stop accepting, then ``shutdown``, within ``config.stop_timeout``.

        What is left (closing client sockets, disabling every index, closing
        eventfds, the epoll set and the device, in that order) happens when
        ``serve`` is cancelled and the daemon is closed.
        """
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        with trio.move_on_after(self.config.stop_timeout):
            await self.shutdown(reason)

    @staticmethod
    async def _flush_quietly(session: Session) -> None:
        # A client may be leaving at this very moment; that is its business.
        with contextlib.suppress(OSError, trio.ClosedResourceError):
            await session.flush()

    def close(self) -> None:
        """Disable every index, then close eventfds, the epoll set and the device.

        After a hand-over nothing is disabled: the table only closes this
        process's eventfd numbers, and closing the device fd does not release
        the device while systemd's fd store holds it.
        """
        if self.native is not None:
            self.native.stop()
        if self.handed_over:
            self.table.detach()
        self.events.close(deassign=not self.handed_over)
        self.table.close()
        if self.native is not None:
            self.native.close()
        with contextlib.suppress(KeyError, ValueError):
            self.dispatcher.remove(self._heartbeat.fileno())
        self.dispatcher.close()
        self._heartbeat.close()
        self.device.close()

    # -- systemd: status, watchdog, reload, hand-over (issue #5) -------------------------

    def _init_service(self) -> None:
        self.notifier = Notifier(None)
        #: Dispatch rounds so far: the watchdog's proof that the hot loop runs.
        self.rounds = 0
        # An eventfd in the dispatcher's own epoll set that the watchdog pokes,
        # so that an idle device still makes the loop go round once per period.
        self._heartbeat = EventFd()
        self.dispatcher.add(self._heartbeat.fileno(), HEARTBEAT_TOKEN)
        self.handing_over = False
        self.handed_over = False
        #: The socket file this process bound and removes when it stops, if any.
        self.socket_path: Path | None = None
        self._dispatch_stopped = False
        self._nursery: trio.Nursery | None = None
        self._listener: trio.socket.SocketType | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._adopted: list[Session] = []
        # Hand-over bookkeeping: the recv of each client waiting between
        # messages (cancelled to park it), and the clients parked so far.
        self._reading: dict[int, trio.CancelScope] = {}
        self._parked: set[int] = set()
        self._park_changed = trio.Event()
        self._resume = trio.Event()

    def _start_tasks(self, nursery: trio.Nursery, listener: trio.socket.SocketType) -> None:
        """The dispatch loop, the accept loop and the sessions adopted from a hand-over."""
        self._nursery = nursery
        nursery.start_soon(self._dispatch_loop)
        if self.native is not None:
            self.native.start()
            nursery.start_soon(self._native_failures_loop, self.native)
        self._start_accepting(listener)
        for session in self._adopted:
            nursery.start_soon(self._client, session.sock, session)
        self._adopted = []

    def _start_accepting(self, listener: trio.socket.SocketType) -> None:
        assert self._nursery is not None
        self._listener = listener
        self._accept_scope = scope = trio.CancelScope()
        self._nursery.start_soon(self._accept_guarded, listener, self._nursery, scope)

    async def _accept_guarded(
        self, listener: trio.socket.SocketType, nursery: trio.Nursery, scope: trio.CancelScope
    ) -> None:
        with scope:
            await self._accept_loop(listener, nursery)

    def status_line(self) -> str:
        """The one-line summary for ``STATUS=`` (``systemctl status``)."""
        # REQ and ERR are the daemon's own; the line counts the device's interrupts.
        enabled = sum(
            len(self.table.enabled(i)) for i in (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX)
        )
        host = sum(self.table.host_vectors().values())
        clients = len(self.sessions)
        return (
            f"{self.device.name}: {clients} client{'s' * (clients != 1)}, "
            f"{enabled} vector{'s' * (enabled != 1)} enabled, {host} host vectors, "
            f"msix {self.table.msix_strategy}"
        )

    async def status_loop(self, period: float = STATUS_PERIOD) -> None:
        """Keep ``STATUS=`` current: looked at every ``period``, sent when it changed."""
        last = ""
        while True:
            line = self.status_line()
            if line != last and not self.handing_over:
                self.notifier.status(line)
                last = line
            await trio.sleep(period)

    async def watchdog_loop(self, period: float) -> None:
        """``WATCHDOG=1`` every ``period`` for as long as the dispatch loops go round.

        Each period the Trio dispatch loop is poked through the heartbeat
        eventfd, and a ping is sent only if it has completed a round since the
        previous look and, in native mode, the hot thread answered a poke
        within ``period``. A loop that hangs (or died) therefore stops the
        pings, and systemd's ``WatchdogSec=`` restarts the service.
        """
        seen = self.rounds
        self._heartbeat.signal()
        stalled = False
        while True:
            await trio.sleep(period)
            alive = self.rounds != seen
            # During a hand-over the hot thread is stopped (then closed); the
            # Trio loop alone speaks for the process then.
            if alive and self.native is not None and not self.handing_over:
                # Blocking, on purpose and briefly: a live thread answers in
                # microseconds. Waiting through Trio instead (a worker thread
                # or an eventfd) would let a test's autojumping clock run out
                # before a real thread could be scheduled at all.
                alive = self.native.responds(min(period, HOT_THREAD_ANSWER_S))
            if alive:
                self.notifier.watchdog()
                stalled = False
            elif not stalled and not self.handing_over:
                stalled = True
                log.error(
                    "watchdog.stalled",
                    rounds=self.rounds,
                    hot_rounds=None if self.native is None else self.native.rounds,
                    period_s=period,
                )
            seen = self.rounds
            self._heartbeat.signal()

    def reload(self) -> None:
        """SIGHUP: read the config file again and apply what can change while running."""
        path = self.config.config_path
        if path is None:
            log.info("config.reload", changed=[], note="no config file: nothing to reload")
            return
        try:
            settings = load_settings(path)
        except ConfigFileError as exc:
            log.error("config.reload_failed", error=str(exc), note="the running settings stay")
            return
        fixed = self.config.cli_fixed
        changes: dict[str, Any] = {}
        changed: list[str] = []
        kept: list[str] = []
        level = settings.log_level or "info"
        if "log_level" in fixed:
            if settings.log_level not in (None, self.config.log_level):
                kept.append("log.level (given on the command line)")
        elif level != self.config.log_level:
            set_log_level(level)
            changes["log_level"] = level
            changed.append(f"log.level={level}")
        if settings.access_policy != self.config.access_policy:
            changes["access_policy"] = settings.access_policy
            changed.append("access")
        if settings.server_limits != self.config.server_limits:
            changes["server_limits"] = settings.server_limits
            changed.append("limits")
        refused = [
            key
            for key, attr, wanted in (
                ("device", "device", settings.device),
                ("socket.path", "socket_path", settings.socket_path),
                ("socket.mode", "socket_mode", settings.socket_mode),
                ("msix.strategy", "msix_strategy", settings.msix_strategy),
                ("msix.prearm", "msix_prearm", settings.msix_prearm),
                ("hot_loop", "hot_loop", settings.hot_loop),
                ("log.format", "log_format", settings.log_format),
            )
            if wanted is not None and wanted != getattr(self.config, attr) and attr not in fixed
        ]
        # The access layer reads policy and limits from ``self.config`` afresh.
        self.config = replace(self.config, **changes)
        log.info(
            "config.reloaded",
            path=str(path),
            changed=changed,
            refused=refused,
            refused_reason="only a restart can change these" if refused else None,
            kept=kept,
        )

    async def hand_over(self) -> bool:
        """Put every fd and the state in systemd's fd store (see irqd.process.fdstore).

        Returns ``True`` once the store has everything: the caller then stops
        without disabling anything. ``False`` (logged) when it cannot be done;
        the daemon then carries on serving as before.
        """
        dev_fds = device_fds(self.device)
        why = None
        if not self.notifier.enabled:
            why = "no $NOTIFY_SOCKET: not running under a service manager with an fd store"
        elif dev_fds is None:
            why = f"the {type(self.device).__name__} backend cannot hand its device over"
        elif self._listener is None or self.handing_over:
            why = "not serving, or a hand-over is already running"
        if why is not None or dev_fds is None:
            log.error("handover.refused", reason=why)
            return False
        log.info("handover.begin", clients=len(self.sessions))
        self.handing_over = True
        self._resume = trio.Event()
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        held: list[Session] = []
        try:
            parked = await self._park_clients()
            with trio.move_on_after(HANDOVER_DRAIN_SECONDS):
                for session in parked:
                    await session.hold_output()
                    held.append(session)
            carried = [s for s in held if s.id in self.sessions]
            left_out = sorted(set(self.sessions) - {s.id for s in carried})
            if left_out:
                log.warning(
                    "handover.clients_left_out",
                    clients=left_out,
                    reason="not at a message boundary in time; they see a closed connection",
                )
            # No checkpoint from here until the fds are sent: the snapshot and
            # the stop of the dispatch loop happen at one instant. The hot
            # thread stops before the snapshot: from then on every count is
            # either in a session's exported state or still in its eventfd.
            self._dispatch_stopped = True
            if self.native is not None:
                self.native.stop()
            stored = self._snapshot(carried, dev_fds)
        except BaseException:
            for session in held:
                session.release_output()
            self._call_off_handover()
            raise
        if not self._store(stored):
            # Nothing reached the store: carry on serving as if nothing happened.
            for session in held:
                session.release_output()
            self._call_off_handover()
            return False
        # BARRIER=1: systemd has taken every fd before this process goes away.
        try:
            await trio.to_thread.run_sync(self.notifier.barrier)
        except (TimeoutError, OSError) as exc:
            # The fds were sent; whether systemd read them all cannot be known
            # now. Going on serving would race the next process for the
            # device, so this process stops either way.
            log.error("handover.barrier_failed", error=str(exc))
        log.info("handover.done", clients=len(carried), fds=len(stored.fds))
        return True

    def _store(self, stored: StoredFds) -> bool:
        """Send every fd to the store; ``False`` if none got there."""
        try:
            sent = [self.notifier.store_fd(fd, name) for name, fd in stored.fds]
            if any(sent):
                # From now on the device, the eventfds and the clients are the next
                # process's: the client tasks ending below must not drop their
                # subscriptions (de-assigning vectors, reading eventfds).
                self.handed_over = True
                if self.native is not None:
                    # Closed first: removing a vector from a live hot loop
                    # would read its eventfd, which is the next process's now.
                    self.native.close()
                self.table.detach()
        finally:
            os.close(stored.fds[-1][1])  # the state memfd is ours; the rest have owners
        if any(sent) and not all(sent):
            lost = [name for (name, _), ok in zip(stored.fds, sent, strict=True) if not ok]
            log.error("handover.partial", lost=lost, note="the next process makes do")
        return any(sent)

    async def _park_clients(self) -> list[Session]:
        """Stop every client's reading at a message boundary; returns those parked in time."""
        with trio.move_on_after(HANDOVER_DRAIN_SECONDS):
            # A connection accepted just before the accept loop stopped starts
            # its task a scheduling round later; let those register first.
            for _ in range(3):
                await trio.lowlevel.checkpoint()
            while any(sid not in self._parked for sid in self.sessions):
                for scope in list(self._reading.values()):
                    scope.cancel()
                changed = self._park_changed = trio.Event()
                await changed.wait()
        return [s for s in self.sessions.values() if s.id in self._parked]

    def _call_off_handover(self) -> None:
        self.handing_over = False
        self._dispatch_stopped = False
        if self.native is not None:
            self.native.start()
        self._resume.set()
        if self._listener is not None and self._nursery is not None:
            self._start_accepting(self._listener)
        log.warning("handover.called_off")

    async def _park(self, session: Session) -> None:
        self._parked.add(session.id)
        self._park_changed.set()
        try:
            await self._resume.wait()
        finally:
            self._parked.discard(session.id)

    async def _recv_unless_handing_over(self, session: Session, conn: Connection) -> bytes:
        """The next bytes from a client; during a hand-over, parks at a message boundary.

        A request that has started to arrive is received (and answered) first;
        only a connection whose input is at a message boundary is parked, so
        nothing the client sent is lost: unread bytes stay in the socket for
        the next daemon process.
        """
        while True:
            if self.handing_over and not conn.in_message:
                await self._park(session)
                continue
            with trio.CancelScope() as scope:
                if not conn.in_message:
                    self._reading[session.id] = scope
                try:
                    return await session.sock.recv(RECV_SIZE)
                finally:
                    self._reading.pop(session.id, None)

    def _snapshot(self, sessions: list[Session], dev_fds: dict[str, int]) -> StoredFds:
        """Everything for the fd store, the state memfd last."""
        assert self._listener is not None
        stored = StoredFds()
        stored.add(LISTENER_NAME, self._listener.fileno())
        for key, fd in dev_fds.items():
            stored.add(f"{DEVICE_PREFIX}{key}", fd)
        for (index, vector), fd in self.table.eventfds().items():
            stored.add(vector_fd_name(index, vector), fd)
        # REQ/ERR stay assigned to these in the kernel: one signalled before the
        # next process runs waits in its eventfd instead of going nowhere.
        for index, fd in self.events.eventfds().items():
            stored.add(event_fd_name(index), fd)
        for session in sessions:
            stored.add(client_fd_name(session.id), session.sock.fileno())
        state = {
            "device": export_device(self.device),
            "table": self.table.export_state(lambda s: getattr(s, "id", -1)),
            "sessions": [s.export_state() for s in sessions],
            "next_id": self._next_id,
            # Who removes the socket file at the end: the next process, if this one
            # bound it (not a socket unit's).
            "socket_path": None if self.socket_path is None else str(self.socket_path),
        }
        stored.add(STATE_NAME, write_state(state))
        return stored

    def adopt(
        self,
        state: dict[str, Any],
        eventfds: dict[tuple[IrqIndex, int], EventFd],
        clients: dict[int, int],
    ) -> None:
        """Take over what a previous process stored: sessions on their sockets, the table.

        ``clients`` maps session ids to adopted socket fds (owned from now on).
        The sessions start serving when ``serve`` runs.
        """
        by_id = {int(st["id"]): st for st in state["sessions"]}
        sessions: dict[int, Session] = {}
        for sid, fd in clients.items():
            raw = socket.socket(fileno=fd)
            st = by_id.get(sid)
            if st is None:
                raw.close()
                continue
            sock = trio.socket.from_stdlib_socket(raw)
            try:
                session = self._new_session(sock, sid, PeerCredentials.of(sock))
            except OSError:
                sock.close()
                continue
            try:
                session.restore(st)
            except OSError:
                session.close_output()
                sock.close()
                continue
            sessions[sid] = session
        replaced = self.table.import_state(state["table"], eventfds, sessions.get)
        self._next_id = max(int(state["next_id"]), max(sessions, default=0) + 1)
        self._adopted = list(sessions.values())
        log.info(
            "handover.adopted",
            clients=sorted(sessions),
            clients_lost=sorted(set(by_id) - set(sessions)),
            vectors=len(self.table.vectors()),
            vectors_reassigned=[f"{i.wire_name}:{n}" for i, n in replaced],
        )

    # -- loops ---------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        epoll_fd = self.dispatcher.fileno()
        table = self.table
        first_event_token = DeviceEvents.FIRST_TOKEN
        while True:
            await trio.lowlevel.wait_readable(epoll_fd)
            # Checked between the wake-up and the drain, with no checkpoint in
            # between: once a hand-over has taken its snapshot, nothing more is
            # read here; the eventfds keep their counts for the next process.
            if self._dispatch_stopped:
                return
            # The liveness proof for the watchdog (``_watchdog_loop``): it counts
            # rounds, and pokes a heartbeat eventfd in the set when idle.
            self.rounds += 1
            result = self.dispatcher.drain()
            for token, count in result.counts:
                table.deliver(token, count)
                if token >= first_event_token:  # REQ/ERR (irqd/device_events.py)
                    self.events.deliver(token, count)
            for token in result.failed:
                log.error("vector.eventfd_failed", token=token)

    async def _accept_loop(self, listener: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        handlers = self._refresh_settings()
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
            limits = self._refresh_settings().limits
            if max(slots.clients, len(self.sessions)) >= limits.max_clients:
                if slots.refusing >= limits.max_clients:
                    sock.close()  # even the refusals are at their limit: no answer
                    continue
                slots.refusing += 1
                message = f"too many clients: this daemon serves at most {limits.max_clients}"
                log.warning("client.refused", reason=message)
                nursery.start_soon(self._refuse_counted, sock, E2BIG, message, slots)
                continue
            slots.clients += 1
            nursery.start_soon(self._client_counted, sock, slots)

    async def _client_counted(self, sock: trio.socket.SocketType, slots: _Slots) -> None:
        try:
            await self._client(sock)
        finally:
            slots.clients -= 1

    async def _refuse_counted(
        self, sock: trio.socket.SocketType, code: str, message: str, slots: _Slots
    ) -> None:
        try:
            with sock:
                await self._refuse(sock, code, message)
        finally:
            slots.refusing -= 1

    async def _refuse(self, sock: trio.socket.SocketType, code: str, message: str) -> None:
        """Answer the first request with ``code`` and close: a clear error, not a bare EOF.

        Given ``refuse_timeout`` seconds; anything unexpected just closes.
        """
        limits = self.handlers.limits
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

    def _refresh_settings(self) -> Handlers:
        """The handlers, with the policy and limits of the current ``self.config``.

        The config may be replaced while running (a reload); the parsed
        settings are cached per config object. A reload with settings that
        cannot work keeps the previous ones and says so.
        """
        handlers = self.handlers
        if handlers.settings_from is not self.config:
            # At start-up a ConfigError propagates: refuse to run with bad settings.
            handlers.apply_config(self.config, strict=handlers.settings_from is None)
        return handlers

    async def _client(self, sock: trio.socket.SocketType, adopted: Session | None = None) -> None:
        with sock:
            if adopted is not None:
                # Carried over from the previous daemon process (irqd.process.fdstore).
                session = adopted
                peer = session.peer
            else:
                try:
                    peer = PeerCredentials.of(sock)
                except OSError:
                    return
                if not await self._admit(sock, peer):
                    return
                try:
                    session = self._new_session(sock, self._next_id, peer)
                except (OSError, ValueError) as exc:
                    log.error("client.refused", pid=peer.pid, error=str(exc))
                    return
                self._next_id += 1
            self.sessions[session.id] = session
            bound = log.bind(client=session.id, pid=peer.pid, uid=peer.uid)
            bound.info("client.adopted" if adopted is not None else "client.connected")
            reason = "closed"
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_until_broken, session, nursery.cancel_scope)
                    nursery.start_soon(self._enforce_timeouts, session, nursery.cancel_scope)
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
                claims = len(self.table.claims(session))
                try:
                    self.table.drop(session)
                except IrqdError:
                    pass
                except Exception:
                    bound.exception("client.cleanup_failed")
                finally:
                    # Before ``with sock`` closes the fd: the hot loop must not
                    # write to whatever gets this fd number next.
                    session.close_output()
            bound.info(
                "client.disconnected",
                name=session.name,
                reason=reason,
                requests=session.requests,
                delivered=session.delivered,
                subscriptions_dropped=subscriptions,
                claims_released=claims,
            )

    def _new_session(
        self, sock: trio.socket.SocketType, session_id: int, peer: PeerCredentials
    ) -> Session:
        if self.native is None:
            return Session(sock, session_id, peer, self.latency)
        return NativeSession(sock, session_id, peer, self.latency, self.native.hot)

    async def _native_failures_loop(self, native: NativeVectors) -> None:
        """What the hot thread gave up on, which it cannot tell Trio itself: vectors
        whose eventfd failed (logged, like the dispatcher's ``vector.eventfd_failed``)
        and clients whose socket failed (their session ends, as a failed write
        ends it with the Trio loop)."""
        while True:
            await trio.sleep(NATIVE_FAILURES_PERIOD)
            for token in native.take_failed():
                log.error("vector.eventfd_failed", token=token)
            if native.closed:
                continue
            for session in list(self.sessions.values()):
                if isinstance(session, NativeSession):
                    session.check_output()

    async def _admit(self, sock: trio.socket.SocketType, peer: PeerCredentials) -> bool:
        """Whether the policy lets ``peer`` connect; a refused peer gets ``EACCES``."""
        handlers = self._refresh_settings()
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
        await self._refuse(sock, EACCES, reason)
        return False

    async def _enforce_timeouts(self, session: Session, scope: trio.CancelScope) -> None:
        """End a session that does not say ``hello`` in time, or that sits idle.

        Idle means: no request for ``idle_timeout`` seconds *and* nothing held.
        A client with a subscription or a claim is waiting for interrupts, which
        is what it is for, however long that takes.
        """
        limits = self.handlers.limits
        await trio.sleep_until(session.last_request + limits.hello_timeout)
        if not session.greeted:
            session.close_reason = f"limit: no hello within {limits.hello_timeout:g} s"
            scope.cancel()
            return
        while True:
            limits = self.handlers.limits
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
        """Read, then answer in order everything that read completed; repeat.

        Requests are "outstanding" from the read that completes them until
        their answer is written. The socket is read again only once all are
        answered, so a client that stops reading its answers stops being read
        (and costs nothing); one read holding more than ``max_outstanding``
        complete requests is a client pipelining past the limit: ``E2BIG``,
        closed like any other exceeded limit.
        """
        limits = self.handlers.limits
        # Clients are idle nearly all the time; their requests are rare.
        conn = Connection(limits.message, release_when_idle=True)
        while True:
            data = await self._recv_unless_handing_over(session, conn)
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
                # A notification from a client means nothing to the server;
                # msgpack-RPC peers may send them, so they are ignored. (A
                # response can't arrive here: Connection rejects unknown ids.)
            await self._answer_all(session, conn, batch)
            if ended is not None:
                return ended

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
        handlers = self._refresh_settings()
        reply: Reply | None = None
        try:
            try:
                params = m.parse_params(request.method, request.params)
                reply = handlers.handle(session, request.method, params)
            except RequestError as exc:
                data = conn.respond_error(request, exc.code, exc.message)
            except AccessDenied as exc:
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
                data = conn.respond_error(request, exc.code, exc.message)
            except IrqdError as exc:
                data = conn.respond_error(request, exc.code, exc.message)
            except OSError as exc:
                # Not a device call (those become IrqdError): creating an
                # eventfd or a dup, which fails when the daemon is out of fds.
                code = ENOSPC if exc.errno in (errno.EMFILE, errno.ENFILE) else EIO
                data = conn.respond_error(request, code, f"{request.method}: {exc.strerror}")
            else:
                data = conn.respond(request, reply.result)
            await session.respond(data, reply.fds if reply is not None else ())
        finally:
            # Sent or not, the reply's fds are dups that only it owns.
            if reply is not None:
                reply.close()


@dataclass
class _Slots:
    """Connections being served, and refusals being answered (``_accept_loop``)."""

    clients: int = 0
    refusing: int = 0


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
