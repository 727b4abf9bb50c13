"""The running daemon: its parts, wired together and run in one nursery.

``Daemon`` serves on a listening socket it is given; the process around it
(binding or inheriting that socket, opening or adopting the device, signals,
``run``) is irqd.process.service. Each job is a module of its own:

* the hot loop forwards interrupts (irqd.hotpath.interface; the native thread
  or a Trio task, chosen once by irqd.hotpath.select);
* the daemon's own loop (irqd.hotpath.python.PollLoop) drains its own
  eventfds, in both modes: the watchdog's heartbeat, REQ and ERR
  (irqd.device.events);
* irqd.server.admission accepts connections and admits or refuses them;
* irqd.server.clients serves each admitted client: its sender, its requests
  in order, its time limits;
* irqd.server.status keeps ``STATUS=`` and the watchdog going;
* irqd.server.reload applies a SIGHUP; irqd.server.handover hands everything
  over to the next process, or takes it over from the previous one, and keeps
  systemd's fd store current so that a crash does not reset the device
  (irqd.process.livestore).

Shutting down cancels the nursery; ``close`` then releases the device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from irqd.config import ServerConfig
from irqd.device.base import Device, IrqIndex
from irqd.device.events import DeviceEvents
from irqd.eventfd import EventFd
from irqd.hotpath.python import PollLoop
from irqd.hotpath.select import open_hot_loop
from irqd.hotpath.session import PeerCredentials, Session
from irqd.process.livestore import FdIdentity
from irqd.process.sdnotify import Notifier
from irqd.server.admission import Admission
from irqd.server.clients import Clients
from irqd.server.handlers import Handlers
from irqd.server.handover import Handed, HandoverController, HandoverState
from irqd.server.reload import reload_config
from irqd.server.sessions import SessionSet
from irqd.server.status import Status
from irqd.server.vectors import VectorTable
from irqd.stats import LatencyHistogram
from irqproto.notifications import ShutdownNotification

#: How long shutdown waits for each client to take its ``shutdown`` notification.
SHUTDOWN_FLUSH_SECONDS = 1.0

#: Stream-guard slots beyond ``max_clients``: room for a reload that raises it
#: (a client without a slot is disconnected after a crash).
GUARD_HEADROOM = 64


@dataclass
class Daemon:
    """The running service: its parts, and what the process around it calls."""

    config: ServerConfig
    device: Device
    #: REQ/ERR eventfds carried over from a previous process (irqd.process.fdstore);
    #: taken (emptied) by ``DeviceEvents``.
    carried_events: dict[IrqIndex, EventFd] = field(default_factory=dict)
    #: sd_notify: readiness, status, watchdog, the fd store.
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    #: The socket file this process bound and removes when it stops, if any.
    socket_path: Path | None = None
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def __post_init__(self) -> None:
        #: Forwards interrupts; chosen once, here.
        self.hot = open_hot_loop(self.config.hot_loop, self.latency)
        #: Drains the daemon's own eventfds (heartbeat, REQ, ERR) in both modes.
        self.own_loop = PollLoop()
        self.table = VectorTable(
            self.device,
            self.hot,
            msix_strategy=self.config.msix_strategy,
            msix_prearm=self.config.msix_prearm,
        )
        self.session_set = SessionSet()
        self.handlers = Handlers(
            device=self.device,
            table=self.table,
            latency=self.latency,
            sessions=self.session_set.live,
            dispatch_stats=lambda: self.hot.dispatch_stats(self.own_loop.dispatcher.stats),
        )
        # REQ and ERR, armed now (irqd.device.events).
        self.events = DeviceEvents(
            self.device,
            self.table,
            self.own_loop.dispatcher,
            self.session_set.live,
            adopted=self.carried_events,
            before_release=self._before_device_release,
        )
        self.own_loop.deliver = self.events.deliver
        self.admission = Admission(
            self.session_set,
            self.current_handlers,
            self._serve_client,
        )
        parts = Handed(
            self.device,
            self.table,
            self.events,
            self.session_set,
            self.hot,
            self.own_loop,
            self.admission,
            self.handlers.broker,
        )
        self.handover = HandoverController(parts, self.notifier, self.socket_path)
        self.handlers.lifecycle = self.handover.lifecycle
        self.clients = Clients(
            self.session_set, self.table, self.hot, self.handover, self.current_handlers
        )
        self.status = Status(
            self.device, self.table, self.session_set, (self.own_loop, self.hot), self.handover
        )
        self._adopted: list[Session] = []
        self._reloads = 0
        self._reloaded = trio.Event()

    @property
    def sessions(self) -> dict[int, Session]:
        """The live sessions by id."""
        return self.session_set.by_id

    @property
    def rounds(self) -> int:
        """Rounds of the daemon's own loop: the watchdog's proof that Trio goes round."""
        return self.own_loop.rounds

    async def serve(
        self,
        listener: trio.socket.SocketType,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run until cancelled; the caller owns and closes the listener."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.own_loop.run)
            self.hot.start()
            nursery.start_soon(self.hot.run)
            self.admission.start(nursery, listener)
            for session in self._adopted:
                nursery.start_soon(self.clients.serve_adopted, session)
            self._adopted = []
            task_status.started()

    async def shutdown(self, reason: str) -> None:
        """Tell every client; all together get ``SHUTDOWN_FLUSH_SECONDS`` to read it."""
        notification = ShutdownNotification(reason)
        with trio.move_on_after(SHUTDOWN_FLUSH_SECONDS):
            async with trio.open_nursery() as nursery:
                for session in self.session_set.live():
                    session.post(notification)
                    nursery.start_soon(_flush_quietly, session)

    async def stop(self, reason: str) -> None:
        """SIGTERM: stop accepting, then ``shutdown``, within ``config.stop_timeout``.

        What is left (closing client sockets, disabling every index, closing
        eventfds, the epoll sets and the device, in that order) happens when
        ``serve`` is cancelled and the daemon is closed.
        """
        self.admission.stop()
        with trio.move_on_after(self.config.stop_timeout):
            await self.shutdown(reason)

    def close(self, *, crashed: bool = False) -> None:
        """Disable every index, then close eventfds, the epoll sets and the device,
        then empty the fd store (nothing stale for a later start to adopt).

        After a hand-over nothing is disabled: the table only closes this
        process's eventfd numbers, and closing the device fd does not release
        the device while systemd's fd store holds it. The same for ``crashed``
        (the daemon failed) while the fd store is kept: the store is left as it
        is, for the restarted daemon to adopt as after any other crash.
        """
        handed_over = self.handover.state is HandoverState.STORED
        keep = handed_over or (crashed and self.handover.live is not None)
        self.hot.stop()
        if keep:
            self.table.detach()
        self.events.close(deassign=not keep)
        self.table.close()
        self.hot.close()
        self.own_loop.close()
        self.device.close()
        if keep:
            self.handover.close_live()
        else:
            self.handover.stop_live()
        guard, self.handover.guard = self.handover.guard, None
        if guard is not None:
            with contextlib.suppress(BufferError):  # a hot loop that still maps it
                guard.close()

    def _before_device_release(self) -> None:
        """The device is being given back (REQ, removal): its DMA buffers are
        unmapped, and the fd store lets go of everything first, since the kernel's
        unbind waits for systemd's copies of the device fds as much as for ours.
        Nothing is recorded after this: there is no device left to adopt."""
        self.handlers.broker.release_all()
        self.handover.stop_live()

    async def _serve_client(self, sock: trio.socket.SocketType, peer: PeerCredentials) -> None:
        # ``self.clients`` needs the hand-over controller, which needs admission.
        await self.clients.serve_new(sock, peer)

    # -- what the process around it calls -------------------------------------------------

    def current_handlers(self) -> Handlers:
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

    def status_line(self) -> str:
        """The one-line summary for ``STATUS=`` (``systemctl status``)."""
        return self.status.line()

    def reload(self) -> None:
        """SIGHUP: read the config file again and apply what can change while running."""
        self.config = reload_config(self.config)
        self._reloads += 1
        self._reloaded.set()
        self._reloaded = trio.Event()

    async def hand_over(self) -> bool:
        """SIGUSR2: everything into systemd's fd store (irqd.server.handover)."""
        return await self.handover.hand_over()

    def adopt(
        self,
        state: dict[str, Any],
        eventfds: dict[tuple[IrqIndex, int], EventFd],
        clients: dict[int, int],
        *,
        live: bool = False,
        marks: set[int] | None = None,
    ) -> None:
        """Take over what a previous process stored; its clients are served by ``serve``.

        ``live``: after a crash (``HandoverController.adopt``), with the stream
        guard's ``marks`` from ``open_guard``.
        """
        self._adopted = self.handover.adopt(state, eventfds, clients, live=live, marks=marks)

    def open_guard(self, carried_fd: int | None) -> set[int] | None:
        """The stream guard (irqd.hotpath.guard), carried or new, attached to the hot
        loop: before any session exists. Returns the carried guard's marks
        (``HandoverController.open_guard``). No guard without a service manager:
        nothing would outlive the process to read it."""
        if not self.notifier.enabled:
            if carried_fd is not None:
                os.close(carried_fd)
            return None
        slots = self.current_handlers().limits.max_clients + GUARD_HEADROOM
        marks = self.handover.open_guard(slots, carried_fd)
        self.hot.attach_guard(self.handover.guard)
        return marks

    def start_live(self, held: dict[str, FdIdentity], live_state_fd: int | None) -> bool:
        """Keep systemd's fd store current from now on (``HandoverController.start_live``)."""
        return self.handover.start_live(held, live_state_fd)

    # -- hooks to wait on, instead of polling ----------------------------------------------

    async def wait_sessions(self, count: int) -> None:
        """Return once exactly ``count`` sessions are live."""
        await self.session_set.wait_until(lambda by_id: len(by_id) == count)

    async def wait_for_sessions(self, done: Callable[[dict[int, Session]], bool]) -> None:
        """Return once ``done(sessions)`` holds (looked at after each change)."""
        await self.session_set.wait_until(done)

    async def wait_reloads(self, count: int) -> None:
        """Return once ``reload`` has run ``count`` times in all."""
        while self._reloads < count:
            await self._reloaded.wait()


async def _flush_quietly(session: Session) -> None:
    # A client may be leaving at this very moment; that is its business.
    with contextlib.suppress(OSError, trio.ClosedResourceError):
        await session.flush()
