"""The hand-over: every fd and the state into systemd's fd store, and back out.

The steps and the fd-store format are irqd.process.fdstore's; this module is
the controller that runs them in the daemon, with an explicit state:

``SERVING`` → ``PARKING`` (no new connections; each client's read loop parks
at its next message boundary) → ``HOLDING`` (each parked client's output is
held once idle) → ``STORING`` (the daemon's own loop and the hot loop stop
reading eventfds, at the instant of the snapshot; the fds go to the store) →
``STORED`` (everything is the next
process's; nothing here touches the device again). A hand-over that cannot
be done goes back to serving as ``CALLED_OFF``.

A client's read loop asks the controller at each message boundary
(``boundary``) and waits there for as long as the daemon is not serving.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from irqd.device.base import Device, IrqIndex
from irqd.device.events import DeviceEvents
from irqd.eventfd import EventFd
from irqd.hotpath.interface import HotLoop
from irqd.hotpath.python import PollLoop
from irqd.hotpath.session import PeerCredentials, Session
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
from irqd.server.admission import Admission
from irqd.server.broker import Broker
from irqd.server.sessions import SessionSet
from irqd.server.vectors import VectorTable

log = structlog.get_logger("irqd.server.handover")

#: How long a hand-over waits for clients to reach a message boundary, and
#: then for their output to be idle; clients not there by then are left out.
HANDOVER_DRAIN_SECONDS = 2.0


class HandoverState(enum.Enum):
    """Where the daemon is with a hand-over."""

    #: Serving; no hand-over has been asked for.
    SERVING = "serving"
    #: Accepting stopped; read loops park at message boundaries.
    PARKING = "parking"
    #: Every client parked (or left out): their outputs are held once idle.
    HOLDING = "holding"
    #: The loops are stopped and the snapshot taken; the fds are on their way.
    STORING = "storing"
    #: The fd store has everything: the device, eventfds and clients are the next process's.
    STORED = "stored"
    #: Serving again: the hand-over could not be done.
    CALLED_OFF = "called_off"


@dataclass
class Handed:
    """What a hand-over works on: the daemon's parts it stores or stops."""

    device: Device
    table: VectorTable
    events: DeviceEvents
    sessions: SessionSet
    hot: HotLoop
    own: PollLoop
    admission: Admission
    broker: Broker


class HandoverController:
    """Runs the hand-over (``hand_over``) and its receiving side (``adopt``)."""

    def __init__(self, parts: Handed, notifier: Notifier, socket_path: Path | None) -> None:
        self.parts = parts
        self.notifier = notifier
        #: The socket file this process bound, which the next process removes at its end.
        self.socket_path = socket_path
        self._state = HandoverState.SERVING
        self._state_changed = trio.Event()
        # The recv of each client waiting between messages (cancelled to park
        # it), and the clients parked so far.
        self._reading: dict[int, trio.CancelScope] = {}
        self._parked: set[int] = set()
        self._park_changed = trio.Event()

    @property
    def state(self) -> HandoverState:
        """The current state."""
        return self._state

    @property
    def serving(self) -> bool:
        """Whether clients are served (no hand-over is under way or done)."""
        return self._state in (HandoverState.SERVING, HandoverState.CALLED_OFF)

    def _set(self, state: HandoverState) -> None:
        self._state = state
        self._state_changed.set()
        self._state_changed = trio.Event()

    # -- what a client's read loop asks ----------------------------------------------------

    async def boundary(self, session: Session) -> None:
        """A client's input is at a message boundary: return when it may be read.

        Parks the client for as long as the daemon is not serving: until a
        hand-over is called off, or for good once it is done.
        """
        if self.serving:
            return
        self._parked.add(session.id)
        self._park_changed.set()
        try:
            while not self.serving:
                await self._state_changed.wait()
        finally:
            self._parked.discard(session.id)

    @contextlib.contextmanager
    def interruptible(self, session: Session) -> Iterator[None]:
        """Around a read between messages: a hand-over cancels it to park the client
        (the read then ends without data; the caller asks ``boundary`` again)."""
        with trio.CancelScope() as scope:
            self._reading[session.id] = scope
            try:
                yield
            finally:
                self._reading.pop(session.id, None)

    # -- giving everything away --------------------------------------------------------------

    async def hand_over(self) -> bool:
        """Put every fd and the state in systemd's fd store (see irqd.process.fdstore).

        Returns ``True`` once the store has everything: the caller then stops
        without disabling anything. ``False`` (logged) when it cannot be done;
        the daemon then carries on serving as before.
        """
        parts = self.parts
        dev_fds = device_fds(parts.device)
        why = self._refusal(dev_fds)
        if why is not None or dev_fds is None:
            log.error("handover.refused", reason=why)
            return False
        log.info("handover.begin", clients=len(parts.sessions))
        self._set(HandoverState.PARKING)
        parts.admission.stop()
        held: list[Session] = []
        try:
            carried = await self._park_and_hold(held)
            # No checkpoint from here until the fds are sent: the snapshot and
            # the stop of every loop happen at one instant. The hot loop stops
            # before the snapshot: from then on every count is either in a
            # session's exported state or still in its eventfd.
            self._set(HandoverState.STORING)
            parts.own.stop()
            parts.hot.stop()
            stored = self._snapshot(carried, dev_fds)
        except BaseException:
            self._call_off(held)
            raise
        if not self._store(stored):
            # Nothing reached the store: carry on serving as if nothing happened.
            self._call_off(held)
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

    def _refusal(self, dev_fds: dict[str, int] | None) -> str | None:
        if not self.notifier.enabled:
            return "no $NOTIFY_SOCKET: not running under a service manager with an fd store"
        if dev_fds is None:
            return f"the {type(self.parts.device).__name__} backend cannot hand its device over"
        if self.parts.admission.listener is None or not self.serving:
            return "not serving, or a hand-over is already running"
        return None

    async def _park_and_hold(self, held: list[Session]) -> list[Session]:
        """Park every client and hold its output; returns those carried over
        (``held`` gets each held session at once, for a call-off to release)."""
        sessions = self.parts.sessions
        parked = await self._park_clients()
        self._set(HandoverState.HOLDING)
        with trio.move_on_after(HANDOVER_DRAIN_SECONDS):
            for session in parked:
                await session.hold_output()
                held.append(session)
        carried = [s for s in held if s.id in sessions]
        left_out = sorted(set(sessions.by_id) - {s.id for s in carried})
        if left_out:
            log.warning(
                "handover.clients_left_out",
                clients=left_out,
                reason="not at a message boundary in time; they see a closed connection",
            )
        return carried

    async def _park_clients(self) -> list[Session]:
        """Stop every client's reading at a message boundary; returns those parked in time."""
        sessions = self.parts.sessions
        with trio.move_on_after(HANDOVER_DRAIN_SECONDS):
            # A connection accepted just before the accept loop stopped starts
            # its task a scheduling round later; let those register first.
            for _ in range(3):
                await trio.lowlevel.checkpoint()
            while any(sid not in self._parked for sid in sessions.by_id):
                for scope in list(self._reading.values()):
                    scope.cancel()
                changed = self._park_changed = trio.Event()
                await changed.wait()
        return [s for s in sessions.live() if s.id in self._parked]

    def _call_off(self, held: list[Session]) -> None:
        for session in held:
            session.release_output()
        parts = self.parts
        parts.own.start()
        parts.hot.start()
        self._set(HandoverState.CALLED_OFF)
        parts.admission.resume()
        log.warning("handover.called_off")

    def _store(self, stored: StoredFds) -> bool:
        """Send every fd to the store; ``False`` if none got there."""
        parts = self.parts
        try:
            sent = [self.notifier.store_fd(fd, name) for name, fd in stored.fds]
            if any(sent):
                # From now on the device, the eventfds and the clients are the next
                # process's: the client tasks ending below must not drop their
                # subscriptions (de-assigning vectors, reading eventfds).
                self._set(HandoverState.STORED)
                # Closed first: a hot loop that credits counts itself reads an
                # eventfd as it lets go of it, which is the next process's now.
                parts.hot.close()
                parts.table.detach()
        finally:
            os.close(stored.fds[-1][1])  # the state memfd is ours; the rest have owners
        if any(sent) and not all(sent):
            lost = [name for (name, _), ok in zip(stored.fds, sent, strict=True) if not ok]
            log.error("handover.partial", lost=lost, note="the next process makes do")
        return any(sent)

    def _snapshot(self, sessions: list[Session], dev_fds: dict[str, int]) -> StoredFds:
        """Everything for the fd store, the state memfd last."""
        parts = self.parts
        listener = parts.admission.listener
        assert listener is not None
        stored = StoredFds()
        stored.add(LISTENER_NAME, listener.fileno())
        for key, fd in dev_fds.items():
            stored.add(f"{DEVICE_PREFIX}{key}", fd)
        for (index, vector), fd in parts.table.eventfds().items():
            stored.add(vector_fd_name(index, vector), fd)
        # REQ/ERR stay assigned to these in the kernel: one signalled before the
        # next process runs waits in its eventfd instead of going nowhere.
        for index, fd in parts.events.eventfds().items():
            stored.add(event_fd_name(index), fd)
        for session in sessions:
            stored.add(client_fd_name(session.id), session.sock.fileno())
        ids = {id(s): s.id for s in parts.sessions}
        state = {
            "device": export_device(parts.device),
            "table": parts.table.export_state(lambda s: ids.get(id(s), -1)),
            "sessions": [s.export_state() for s in sessions],
            "next_id": parts.sessions.next_id,
            # The DMA buffers still mapped: the container keeps the mappings, the
            # next process keeps their IOVAs reserved and accounted to their owners.
            "dma": parts.broker.export_state(),
            # Who removes the socket file at the end: the next process, if this one
            # bound it (not a socket unit's).
            "socket_path": None if self.socket_path is None else str(self.socket_path),
        }
        stored.add(STATE_NAME, write_state(state))
        return stored

    # -- taking everything over ------------------------------------------------------------

    def adopt(
        self,
        state: dict[str, Any],
        eventfds: dict[tuple[IrqIndex, int], EventFd],
        clients: dict[int, int],
    ) -> list[Session]:
        """Take over what a previous process stored: sessions on their sockets, the table.

        ``clients`` maps session ids to adopted socket fds (owned from now on).
        Returns the sessions, to be served once the daemon serves.
        """
        parts = self.parts
        by_id = {int(st["id"]): st for st in state["sessions"]}
        sessions: dict[int, Session] = {}
        for sid, fd in clients.items():
            session = self._adopt_session(sid, fd, by_id.get(sid))
            if session is not None:
                sessions[sid] = session
        replaced = parts.table.import_state(state["table"], eventfds, sessions.get)
        # A state written before the broker existed has no "dma": nothing was mapped.
        parts.broker.import_state(state.get("dma", []))
        parts.sessions.next_id = max(int(state["next_id"]), max(sessions, default=0) + 1)
        log.info(
            "handover.adopted",
            clients=sorted(sessions),
            clients_lost=sorted(set(by_id) - set(sessions)),
            vectors=len(parts.table.vectors()),
            vectors_reassigned=[f"{i.wire_name}:{n}" for i, n in replaced],
        )
        return list(sessions.values())

    def _adopt_session(self, sid: int, fd: int, state: dict[str, Any] | None) -> Session | None:
        """The session ``state`` describes on the adopted socket ``fd``, or ``None``
        (the socket closed) when there is no state for it or it cannot be restored."""
        raw = socket.socket(fileno=fd)
        if state is None:
            raw.close()
            return None
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            session = self.parts.hot.new_session(sock, sid, PeerCredentials.of(sock))
        except OSError:
            sock.close()
            return None
        try:
            session.restore(state)
        except OSError:
            session.close_output()
            sock.close()
            return None
        return session
