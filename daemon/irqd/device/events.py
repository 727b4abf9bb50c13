"""The device's own events: REQ (the kernel wants the device back) and ERR (AER).

The daemon arms both itself at start-up, ERR only where the device has it
(``count`` > 0: PCI Express), each with an eventfd of its own registered in the
dispatcher's epoll set under ``make_token(REQ, 0)`` / ``make_token(ERR, 0)``,
so they are drained by the same loop as every interrupt; the loop hands those
tokens to ``DeviceEvents.deliver`` (tokens of index ERR and above never belong
to MSI/MSI-X vectors, so one comparison tells them apart).

REQ (vfio-notes.md): the kernel signals it when someone unbinds or removes the
device, again every 10 s until the last reference to the device file is gone,
and the unbinding task blocks until then. So on the first REQ the daemon stops
taking work (the vector table is closed: vectors de-assigned, indexes disabled,
eventfds closed; every later request gets ENODEV), de-assigns REQ/ERR, closes
every fd it holds on the device, tells every client ``device_lost``
``{"reason": "request"}``, gives them a moment to read it and stops; the
process exits 0. Later REQs change nothing.

After a hand-over (irqd.process.fdstore) the daemon's REQ/ERR eventfds come from
the previous process, still assigned in the kernel: a REQ or ERR signalled
while no daemon ran waits in them and is acted on by this one.

ERR: each signal is forwarded to every client as an ``err`` notification with
the count read (docs/protocol.md, an extension). The daemon keeps running.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import structlog
import trio

from irqd.device.base import Device, IrqIndex
from irqd.eventfd import EventFd
from irqd.hotpath.dispatcher import Dispatcher
from irqd.hotpath.session import Session
from irqd.server.vectors import VectorTable, make_token
from irqproto.notifications import DeviceLostNotification, ErrNotification

log = structlog.get_logger("irqd.device.events")

#: How long clients together get to read ``device_lost`` before the daemon stops.
LOST_FLUSH_SECONDS = 1.0


class DeviceEvents:
    """Arms REQ and ERR with the daemon's own eventfds and acts on their signals."""

    #: The lowest token ``deliver`` cares about; MSI/MSI-X/INTx tokens are below.
    FIRST_TOKEN = make_token(IrqIndex.ERR, 0)

    def __init__(
        self,
        device: Device,
        table: VectorTable,
        dispatcher: Dispatcher,
        sessions: Callable[[], list[Session]],
        *,
        adopted: dict[IrqIndex, EventFd] | None = None,
    ) -> None:
        """Arm REQ and ERR; ``adopted`` (taken, emptied) are carried-over eventfds to use."""
        self.device = device
        self.table = table
        self.dispatcher = dispatcher
        self.sessions = sessions
        #: Set by the first REQ (or ``device_gone``); the daemon stops once
        #: clients were told.
        self.lost = trio.Event()
        #: The ``device_lost`` reason clients get.
        self.reason = "request"
        self.requests = 0
        self.errors = 0
        self._eventfds: dict[IrqIndex, EventFd] = {}
        carried = adopted if adopted is not None else {}
        for index in (IrqIndex.REQ, IrqIndex.ERR):
            efd = carried.pop(index, None)
            if table.info[index].count > 0:
                self._arm(index, efd)
            elif efd is not None:
                efd.close()
        for efd in carried.values():  # not REQ/ERR: nothing to arm with it
            efd.close()
        carried.clear()

    @property
    def armed(self) -> list[IrqIndex]:
        """The indexes armed with the daemon's eventfds."""
        return list(self._eventfds)

    def eventfds(self) -> dict[IrqIndex, int]:
        """The armed eventfds' numbers, by index (for a hand-over)."""
        return {index: efd.fileno() for index, efd in self._eventfds.items()}

    def _arm(self, index: IrqIndex, adopted: EventFd | None = None) -> None:
        # An adopted eventfd is assigned again all the same: on the kernel that
        # swaps the trigger for the very same eventfd (its counter, and so any
        # signal waiting in it, is untouched); the simulation, a new object in
        # the new process, has no trigger until then.
        efd = adopted if adopted is not None else EventFd()
        try:
            self.device.assign_eventfds(index, 0, [efd.fileno()])
        except OSError as exc:
            efd.close()
            # Not fatal: the daemon still forwards interrupts; unbinding the
            # device then waits until the daemon is stopped.
            log.warning("device_events.not_armed", index=index.wire_name, error=exc.strerror)
            return
        self.dispatcher.add(efd.fileno(), make_token(index, 0))
        self._eventfds[index] = efd

    def deliver(self, token: int, count: int) -> None:
        """A signal read by the dispatch loop; other tokens are ignored. Never blocks."""
        if token == make_token(IrqIndex.REQ, 0):
            self.requests += count
            if not self.lost.is_set():
                # Released from ``watch``, not here: this runs inside the
                # dispatch loop, which must not be torn down under itself.
                log.warning("device.release_requested", device=self.device.name)
                self.lost.set()
        elif token == make_token(IrqIndex.ERR, 0):
            self.errors += count
            log.warning("device.error_reported", device=self.device.name, count=count)
            notification = ErrNotification(count)
            for session in self.sessions():
                session.post(notification)

    def device_gone(self, reason: str) -> None:
        """Something else saw the device go (a uevent: ``removed``): same release."""
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()

    def close(self, *, deassign: bool = True) -> None:
        """De-assign REQ/ERR, then stop polling, then close (vfio-notes.md's order).

        ``deassign=False`` after a hand-over: the next process owns the
        kernel's triggers now. Idempotent.
        """
        for index, efd in list(self._eventfds.items()):
            if deassign:
                with contextlib.suppress(OSError):
                    self.device.assign_eventfds(index, 0, [-1])
            with contextlib.suppress(KeyError, ValueError):
                self.dispatcher.remove(efd.fileno())
            efd.close()
        self._eventfds.clear()

    def _release(self) -> None:
        """Give the device back: de-assign and disable everything, close its fds.

        The unbinding task in the kernel waits for the last fd, so this comes
        before telling the clients.
        """
        self.table.close()
        self.close()
        with contextlib.suppress(OSError):
            self.device.close()

    async def watch(self, scope: trio.CancelScope) -> None:
        """Wait for REQ; give the device back, tell every client, then cancel ``scope``."""
        await self.lost.wait()
        self._release()
        notification = DeviceLostNotification(self.reason)
        sessions = self.sessions()
        with trio.move_on_after(LOST_FLUSH_SECONDS):
            async with trio.open_nursery() as nursery:
                for session in sessions:
                    session.post(notification)
                    nursery.start_soon(_flush_quietly, session)
        log.info("daemon.device_lost", reason=self.reason, clients=len(sessions))
        scope.cancel()


async def _flush_quietly(session: Session) -> None:
    # A client may be leaving at this very moment; that is its business.
    with contextlib.suppress(OSError, trio.ClosedResourceError):
        await session.flush()
