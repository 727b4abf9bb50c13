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

The controller also keeps the fd store current while serving (``record``,
irqd.process.livestore): every fd a restart needs and a crash-consistent
record of the state, so that a process that dies without a hand-over leaves
everything to the next one (``adopt`` with ``live=True``, see
docs/crash-recovery.md).
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import trio

from irqd.device.base import Device, IrqIndex
from irqd.device.events import DeviceEvents
from irqd.eventfd import EventFd
from irqd.hotpath.guard import StreamGuard
from irqd.hotpath.interface import HotLoop
from irqd.hotpath.python import PollLoop
from irqd.hotpath.session import PeerCredentials, Session
from irqd.packing import Packed, pack_map
from irqd.process.crashstate import CrashStateWriter
from irqd.process.fdstore import (
    DEVICE_PREFIX,
    LISTENER_NAME,
    STATE_NAME,
    STATE_VERSION,
    StoredFds,
    client_fd_name,
    device_fds,
    event_fd_name,
    export_device,
    vector_fd_name,
    write_state,
)
from irqd.process.livestore import GUARD_NAME, FdIdentity, LiveStore
from irqd.process.sdnotify import Notifier
from irqd.server.admission import Admission
from irqd.server.broker import Broker
from irqd.server.sessions import SessionSet
from irqd.server.vectors import VectorTable

log = structlog.get_logger("irqd.server.handover")

#: How long a hand-over waits for clients to reach a message boundary, and
#: then for their output to be idle; clients not there by then are left out.
HANDOVER_DRAIN_SECONDS = 2.0

#: The indexes whose vectors clients hold (REQ and ERR are the daemon's own).
_CLIENT_INDEXES = (IrqIndex.INTX, IrqIndex.MSI, IrqIndex.MSIX)


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
        #: The live fd store (``start_live``); ``None`` without a service manager.
        self.live: LiveStore | None = None
        #: The stream guard the hot loop marks (``open_guard``), kept in the store.
        self.guard: StreamGuard | None = None
        #: Hand-overs and crash recoveries this daemon went through (``stats``' ``lifecycle``).
        self.handovers = 0
        self.crash_recoveries = 0
        #: Adopted sessions not yet served (``served``): recorded all the same.
        self._unserved: dict[int, Session] = {}

    def lifecycle(self) -> dict[str, int]:
        """``stats``' ``lifecycle``: hand-overs and crash recoveries so far, across restarts."""
        return {"handovers": self.handovers, "crash_recoveries": self.crash_recoveries}

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
                if self.live is not None:
                    # The store is the next process's to keep current now.
                    self.live.forget()
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
        state = {
            "device": export_device(parts.device),
            "table": Packed(parts.table.packed_state({id(s): s.id for s in parts.sessions})),
            "sessions": [s.export_state() for s in sessions],
            "next_id": parts.sessions.next_id,
            # The DMA buffers still mapped: the container keeps the mappings, the
            # next process keeps their IOVAs reserved and accounted to their owners.
            "dma": parts.broker.export_state(),
            # Who removes the socket file at the end: the next process, if this one
            # bound it (not a socket unit's).
            "socket_path": None if self.socket_path is None else str(self.socket_path),
            "handovers": self.handovers,
            "crash_recoveries": self.crash_recoveries,
        }
        stored.add(STATE_NAME, write_state(state))
        return stored

    # -- the live fd store (irqd.process.livestore) ---------------------------------------

    def open_guard(self, slots: int, carried_fd: int | None) -> set[int] | None:
        """The stream guard, from the previous process's memfd or new; returns the
        slots it had marked (``None``: no usable guard was carried, so no stream
        is proven to be at a message boundary). Reset and ready to attach."""
        marks: set[int] | None = None
        guard: StreamGuard | None = None
        if carried_fd is not None:
            try:
                guard = StreamGuard.adopt(carried_fd)  # takes the fd, even on failure
            except (ValueError, OSError) as exc:
                log.error("crash.bad_guard", error=str(exc), note="a new guard is made")
            else:
                marks = guard.marked()
                guard.reset()
        if guard is None:
            guard = StreamGuard.create(slots)
        self.guard = guard
        return marks

    def start_live(self, held: Mapping[str, FdIdentity], live_state_fd: int | None) -> bool:
        """Keep the fd store current from now on and record the state once (before
        ``READY=1``). ``held``: what the store holds already; ``live_state_fd``:
        the previous process's ``live-state`` memfd, written on from here (owned).
        ``False`` (logged) without a store, or for a device that cannot be kept."""
        if not self.notifier.enabled or device_fds(self.parts.device) is None:
            if live_state_fd is not None:
                os.close(live_state_fd)
            if self.notifier.enabled:
                log.warning(
                    "livestore.unavailable",
                    device=type(self.parts.device).__name__,
                    note="a crash resets the device",
                )
            return False
        if live_state_fd is not None:
            writer = CrashStateWriter.adopt(live_state_fd)
        else:
            writer = CrashStateWriter.create()
        self.live = LiveStore(self.notifier, writer, held)
        self.record()
        return True

    def record(self) -> None:
        """Bring the fd store and the ``live-state`` record up to date (a no-op
        without a live store, or while a hand-over runs)."""
        live = self.live
        if live is None or not self.serving:
            return
        live.sync(self.live_fds(), lambda: live.writer.write_packed(self.live_record()))

    def stop_live(self) -> None:
        """A clean stop: empty the fd store, so that a later start adopts nothing."""
        live, self.live = self.live, None
        if live is not None:
            live.clear()
            live.close()

    def close_live(self) -> None:
        """Let go of the live store's own fds, leaving the store as it is (a crash
        the next process recovers from, or a completed hand-over)."""
        live, self.live = self.live, None
        if live is not None:
            live.close()

    def served(self, session: Session) -> None:
        """``session`` is among the live sessions now (an adopted one is no longer
        recorded from the adopted list)."""
        self._unserved.pop(session.id, None)

    def _recorded_sessions(self) -> list[Session]:
        sessions = self.parts.sessions.live()
        return sessions + [s for s in self._unserved.values() if s.id not in self.parts.sessions]

    def live_fds(self) -> dict[str, int]:
        """Every fd a restart needs, by its fd-store name (``live-state`` aside)."""
        parts = self.parts
        fds: dict[str, int] = {}
        listener = parts.admission.listener
        if listener is not None:
            fds[LISTENER_NAME] = listener.fileno()
        for key, fd in (device_fds(parts.device) or {}).items():
            fds[f"{DEVICE_PREFIX}{key}"] = fd
        for index, fd in parts.events.eventfds().items():
            fds[event_fd_name(index)] = fd
        for (index, vector), fd in parts.table.eventfds().items():
            fds[vector_fd_name(index, vector)] = fd
        for session in self._recorded_sessions():
            fds[client_fd_name(session.id)] = session.sock.fileno()
        if self.guard is not None:
            fds[GUARD_NAME] = self.guard.fileno()
        return fds

    def live_record(self) -> bytes:
        """The ``live-state`` record, packed: the hand-over's state without the unsent
        output (it cannot be had without stopping the hot loop), with each session's
        guard slot. Written after every change, so the table's large part is not
        packed again when it did not change (``VectorTable.packed_state``)."""
        parts = self.parts
        sessions = self._recorded_sessions()
        table = parts.table.packed_state({id(s): s.id for s in sessions})
        return pack_map(
            {
                "version": STATE_VERSION,
                "kind": "live",
                "device": export_device(parts.device),
                "table": Packed(table),
                "sessions": [_live_session(s) for s in sessions],
                "next_id": parts.sessions.next_id,
                "dma": parts.broker.export_state(),
                "socket_path": None if self.socket_path is None else str(self.socket_path),
                "handovers": self.handovers,
                "crash_recoveries": self.crash_recoveries,
            }
        )

    # -- taking everything over ------------------------------------------------------------

    def adopt(
        self,
        state: dict[str, Any],
        eventfds: dict[tuple[IrqIndex, int], EventFd],
        clients: dict[int, int],
        *,
        live: bool = False,
        marks: set[int] | None = None,
    ) -> list[Session]:
        """Take over what a previous process stored: sessions on their sockets, the table.

        ``clients`` maps session ids to adopted socket fds (owned from now on).
        Returns the sessions, to be served once the daemon serves.

        ``live``: ``state`` is the ``live-state`` record of a process that died
        (irqd.process.livestore). Then a client whose stream may have been cut
        mid-message (its guard slot is among ``marks``, or it had none, or no
        guard came: ``marks`` is ``None``) is disconnected, and every other
        subscriber gets ``resized`` with ``possible_loss`` for its vectors and
        a loopback interrupt on each: counts the dead process had read from
        the eventfds but not yet written are gone.
        """
        parts = self.parts
        by_id = {int(st["id"]): st for st in state["sessions"]}
        sessions: dict[int, Session] = {}
        cut: list[int] = []
        for sid, fd in clients.items():
            st = by_id.get(sid)
            if live and st is not None:
                slot = st.get("guard_slot")
                if marks is None or slot is None or int(slot) in marks:
                    cut.append(sid)
                    os.close(fd)
                    continue
                st = _from_live_session(st)
            session = self._adopt_session(sid, fd, st)
            if session is not None:
                sessions[sid] = session
        if cut:
            log.warning(
                "crash.clients_closed",
                clients=cut,
                reason="the stream may have been cut mid-message; the client reconnects",
            )
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
        self._unserved = dict(sessions)
        self.handovers = int(state.get("handovers", 0))
        self.crash_recoveries = int(state.get("crash_recoveries", 0))
        if live:
            self.crash_recoveries += 1
            told = self._announce_possible_loss(sessions.values())
            log.warning(
                "crash.recovered",
                crash_recoveries=self.crash_recoveries,
                clients=sorted(sessions),
                told_possible_loss=told,
            )
        else:
            self.handovers += 1
        return list(sessions.values())

    def _announce_possible_loss(self, sessions: Iterable[Session]) -> int:
        """``resized`` with ``possible_loss`` to each adopted session for each index it
        holds vectors of (naming them), then one loopback interrupt per such vector,
        as after a device reset; returns how many sessions were told."""
        parts = self.parts
        adopted = {id(s) for s in sessions}
        told: dict[tuple[int, IrqIndex], tuple[Session, list[int]]] = {}
        fired: list[tuple[IrqIndex, int]] = []
        for vector in parts.table.vectors():
            if vector.index not in _CLIENT_INDEXES:
                continue
            holders = list(vector.subscribers)
            if vector.claimed_by is not None:
                holders.append(vector.claimed_by)
            mine = [h for h in holders if isinstance(h, Session) and id(h) in adopted]
            for holder in mine:
                told.setdefault((id(holder), vector.index), (holder, []))[1].append(vector.number)
            if mine:
                fired.append((vector.index, vector.number))
        for (_, index), (holder, numbers) in told.items():
            holder.post_resized(index, sorted(numbers), True)
        # A client blocked waiting for an interrupt wakes up and looks at its device.
        for index, number in fired:
            try:
                parts.device.trigger(index, number, 1)
            except OSError as exc:
                log.warning(
                    "crash.loopback_failed", index=index.wire_name, vector=number, error=str(exc)
                )
        return len({key[0] for key in told})

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


def _live_session(session: Session) -> dict[str, Any]:
    """A session in the ``live-state`` record: identity and counters, no output.

    When it connected is wall-clock seconds (whole ones, so that the record's
    bytes do not change while nothing else does).
    """
    since = time.time() - (time.monotonic() - session.connected_at)
    return {
        "id": session.id,
        "name": session.name,
        "greeted": session.greeted,
        "requests": session.requests,
        "delivered": session.delivered,
        "notifications": session.notifications,
        "connected_since": round(since),
        "guard_slot": session.guard_slot,
    }


def _from_live_session(state: dict[str, Any]) -> dict[str, Any]:
    """A ``live-state`` session as ``Session.restore`` takes it: nothing unsent."""
    since = float(state.get("connected_since", time.time()))
    return {
        **state,
        "connected_for": max(0.0, time.time() - since),
        "pending": [],
        "resized": [],
        "outbox": [],
    }
