"""The device's own events: REQ (the kernel wants the device back) and ERR (AER).

The daemon arms both itself at start-up, ERR only where the device has it
(``count`` > 0: PCI Express), each with an eventfd of its own registered in the
daemon's own epoll set (not the hot loop's) under ``make_token(REQ, 0)`` /
``make_token(ERR, 0)``; the daemon's loop over that set hands every count it
reads to ``DeviceEvents.deliver``.

This module sees the rest of the daemon only through the narrow protocols
below (``EventPoller``, ``EventTable``, ``Listener``): the device package does
not import the server.

REQ: the kernel signals it when someone unbinds or removes the device
(``vfio_pci_core_request``, drivers/vfio/pci/vfio_pci_core.c), again every
10 s until the last reference to the device file is gone, and the unbinding
task blocks until then (``vfio_unregister_group_dev``, drivers/vfio/vfio_main.c).
So on the first REQ the daemon stops taking work (the vector table is closed:
vectors de-assigned, indexes disabled, eventfds closed; every later request
gets ENODEV), de-assigns REQ/ERR, closes
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
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import structlog
import trio

from irqd.device.base import Device, IrqIndex, IrqInfo
from irqd.eventfd import EventFd
from irqd.tokens import make_token
from irqproto.notifications import DeviceLostNotification, ErrNotification, TypedNotification

log = structlog.get_logger("irqd.device.events")

#: How long clients together get to read ``device_lost`` before the daemon stops.
LOST_FLUSH_SECONDS = 1.0

#: How long ``device_lost`` waits, after the device was given back on a REQ,
#: for a ``remove`` uevent, when a uevent watcher runs. vfio-pci's remove path
#: first asks for the device through REQ and sends the ``remove`` uevent only
#: once the daemon let go (about 0.2 s later in the VM tests,
#: docs/real-device.md): clients are told ``removed`` rather than ``request``.
REMOVAL_GRACE_SECONDS = 0.5

#: The tokens of the daemon's own REQ and ERR eventfds.
REQ_TOKEN = make_token(IrqIndex.REQ, 0)
ERR_TOKEN = make_token(IrqIndex.ERR, 0)


class EventPoller(Protocol):
    """The epoll set the daemon's own loop drains (irqd.hotpath.dispatcher.Dispatcher)."""

    def add(self, fd: int, token: int) -> None:
        """Poll ``fd`` under ``token``."""

    def remove(self, fd: int) -> None:
        """Stop polling ``fd``; before it is closed."""


class EventTable(Protocol):
    """What REQ needs of the vector table: the device's indexes, and closing it."""

    @property
    def info(self) -> Mapping[IrqIndex, IrqInfo]:
        """What the device reports for each index."""

    def close(self) -> None:
        """De-assign and disable every vector; every later request gets ENODEV."""


class Listener(Protocol):
    """What REQ and ERR need of a client session: telling it, and writing that out."""

    def post(self, notification: TypedNotification) -> None:
        """Queue a control notification; never blocks."""

    async def flush(self) -> None:
        """Write whatever is pending now."""


class DeviceEvents:
    """Arms REQ and ERR with the daemon's own eventfds and acts on their signals."""

    def __init__(
        self,
        device: Device,
        table: EventTable,
        poller: EventPoller,
        sessions: Callable[[], Sequence[Listener]],
        *,
        adopted: dict[IrqIndex, EventFd] | None = None,
        before_release: Callable[[], None] | None = None,
    ) -> None:
        """Arm REQ and ERR; ``adopted`` (taken, emptied) are carried-over eventfds to use.

        ``before_release`` runs first when the device is given back: what else
        holds the device (the DMA mappings clients were given) lets go of it.
        """
        self.device = device
        self._before_release = before_release
        self.table = table
        self.poller = poller
        self.sessions = sessions
        #: Set by the first REQ (or ``device_gone``); the daemon stops once
        #: clients were told.
        self.lost = trio.Event()
        #: The ``device_lost`` reason clients get.
        self.reason = "request"
        #: Seconds ``watch`` waits for a removal after a REQ; 0 where nothing
        #: watches uevents (the process sets it when it does).
        self.removal_grace = 0.0
        self._removed = trio.Event()
        self._told = False
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
        self.poller.add(efd.fileno(), make_token(index, 0))
        self._eventfds[index] = efd

    def deliver(self, token: int, count: int) -> None:
        """A signal read by the daemon's own loop; other tokens are ignored. Never blocks."""
        if token == REQ_TOKEN:
            self.requests += count
            if not self.lost.is_set():
                # Released from ``watch``, not here: this runs inside the
                # dispatch loop, which must not be torn down under itself.
                log.warning("device.release_requested", device=self.device.name)
                self.lost.set()
        elif token == ERR_TOKEN:
            self.errors += count
            log.warning("device.error_reported", device=self.device.name, count=count)
            notification = ErrNotification(count)
            for session in self.sessions():
                session.post(notification)

    def device_gone(self, reason: str) -> None:
        """Something else saw the device go (a uevent: ``removed``): same release.

        A removal seen after a REQ, before the clients were told, is what they
        are told: the REQ was the kernel's first step of that removal.
        """
        if reason == "removed":
            self._removed.set()
        if not self.lost.is_set():
            self.reason = reason
            self.lost.set()
        elif reason == "removed" and not self._told:
            self.reason = reason

    def close(self, *, deassign: bool = True) -> None:
        """De-assign REQ/ERR, then stop polling, then close (``VectorRecord.release``'s order).

        ``deassign=False`` after a hand-over: the next process owns the
        kernel's triggers now. Idempotent.
        """
        for index, efd in list(self._eventfds.items()):
            if deassign:
                with contextlib.suppress(OSError):
                    self.device.assign_eventfds(index, 0, [-1])
            with contextlib.suppress(KeyError, ValueError):
                self.poller.remove(efd.fileno())
            efd.close()
        self._eventfds.clear()

    def _release(self) -> None:
        """Give the device back: de-assign and disable everything, close its fds.

        The unbinding task in the kernel waits for the last fd, so this comes
        before telling the clients.
        """
        if self._before_release is not None:
            self._before_release()
        self.table.close()
        self.close()
        with contextlib.suppress(OSError):
            self.device.close()

    async def watch(self, scope: trio.CancelScope) -> None:
        """Wait for REQ; give the device back, tell every client, then cancel ``scope``."""
        await self.lost.wait()
        self._release()
        if self.reason == "request" and self.removal_grace > 0:
            with trio.move_on_after(self.removal_grace):
                await self._removed.wait()
        self._told = True
        notification = DeviceLostNotification(self.reason)
        sessions = self.sessions()
        with trio.move_on_after(LOST_FLUSH_SECONDS):
            async with trio.open_nursery() as nursery:
                for session in sessions:
                    session.post(notification)
                    nursery.start_soon(_flush_quietly, session)
        log.info("daemon.device_lost", reason=self.reason, clients=len(sessions))
        scope.cancel()


async def _flush_quietly(session: Listener) -> None:
    # A client may be leaving at this very moment; that is its business.
    with contextlib.suppress(OSError, trio.ClosedResourceError):
        await session.flush()
