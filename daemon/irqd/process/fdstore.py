"""Restart without disarming: everything a new daemon process needs, through systemd's fd store.

The kernel keeps a device's interrupt setup only as long as somebody holds the
device fd, and a client keeps its connection only as long as somebody holds
its socket. systemd's fd store (``FDSTORE=1`` in sd_notify, kept while the
service restarts, handed to the next start as ``$LISTEN_FDS``) is that
somebody while no daemon process runs. So on ``SIGUSR2`` the daemon:

1. stops accepting and stops reading requests: each client's read loop parks
   at the next message boundary (a request being received or answered is
   finished first);
2. takes each client's output lock, so that no half-written message is left
   in a socket, and stops draining eventfds: from here interrupts accumulate
   in the eventfd counters, which the next process reads;
3. writes its state (each client's identity, unsent counts and notifications;
   the vector table with subscribers, totals and what the kernel has armed;
   the device's own state) into a sealed memfd;
4. sends every fd with ``FDSTORE=1`` and a name — ``listener``,
   ``client-<id>``, ``vector-<index>-<n>``, ``device-<key>``,
   ``event-req``/``event-err`` (the daemon's own REQ/ERR eventfds), and
   ``state`` last — waits for ``BARRIER=1``, and exits with
   :data:`EXIT_HANDED_OVER`, which the unit's ``RestartForceExitStatus=`` turns into a restart.

The new process finds ``state`` among its ``$LISTEN_FDNAMES``, adopts the
device (no ``SET_IRQS`` call on INTx, MSI or MSI-X; a real device from its
container, group and device fds, ``VfioDevice.adopt``), the eventfds
(``EventFd.adopt``), the REQ/ERR eventfds (assigned again, the same eventfd
in one call: a no-op on the kernel, which kept them, and what the simulation
needs; a REQ or ERR signalled meanwhile waits in them), the listener and
each client socket, rebuilds sessions with their pending counts, and only
then says ``READY=1``. It removes every adopted fd from the store again
(``FDSTOREREMOVE=1``): otherwise systemd would keep each client socket open
after the client's session ends, and the client would never see EOF.

The fd store holds most of this all the time (irqd.process.livestore): from
the moment the device is open, every fd above is kept there under the same
name, beside a crash-consistent ``live-state`` memfd, so that a process that
dies without a hand-over leaves a restart something to adopt. The hand-over's
``FDSTORE=1`` of an fd the store holds already is ignored by systemd; the
sealed ``state`` is what it adds, and a ``state`` wins over ``live-state``
(it has the exact counts). :func:`take_carried` reads either.

Counts stay exact because every eventfd signal is either read before step 2
(and sits in a session's serialized pending counts) or after it (by the new
process, from the same eventfd). A client that cannot be parked in time (it
is mid-message and stalls, or does not read its socket) is left out: its
connection closes when the old process exits, as at a crash.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import msgpack
import structlog

from irqd.device.base import Device, IrqIndex, StoredDevice, Unsupported
from irqd.device.sim import SimDevice
from irqd.eventfd import EventFd, is_eventfd
from irqd.packing import pack_map
from irqd.process.activation import InheritedFds
from irqd.process.crashstate import CrashStateError, read_crash_state
from irqd.process.livestore import GUARD_NAME, LIVE_STATE_NAME

__all__ = [
    "CLIENT_PREFIX",
    "DEVICE_PREFIX",
    "EVENT_PREFIX",
    "EXIT_HANDED_OVER",
    "GUARD_NAME",
    "LISTENER_NAME",
    "LIVE_STATE_NAME",
    "STATE_NAME",
    "STATE_VERSION",
    "STORED_PREFIXES",
    "VECTOR_PREFIX",
    "Carried",
    "DeviceDescription",
    "HandoverError",
    "StoredFds",
    "adopt_device",
    "client_fd_name",
    "device_fds",
    "event_fd_name",
    "export_device",
    "parse_client_fd_name",
    "parse_vector_fd_name",
    "read_live_state",
    "read_state",
    "stored_names",
    "take_carried",
    "vector_fd_name",
    "write_state",
]

log = structlog.get_logger("irqd.process.fdstore")

#: Exit status after a hand-over: EX_TEMPFAIL (sysexits.h). The unit lists it
#: in ``RestartForceExitStatus=`` (restart whatever ``Restart=`` says) and in
#: ``SuccessExitStatus=`` (not a failure).
EXIT_HANDED_OVER = 75

STATE_NAME = "state"
LISTENER_NAME = "listener"
CLIENT_PREFIX = "client-"
VECTOR_PREFIX = "vector-"
DEVICE_PREFIX = "device-"
EVENT_PREFIX = "event-"

#: Every prefix of a name that comes from the fd store.
STORED_PREFIXES = (CLIENT_PREFIX, VECTOR_PREFIX, DEVICE_PREFIX, EVENT_PREFIX)

#: Bumped whenever the layout of the state changes incompatibly; a new daemon
#: refuses state it does not understand and starts afresh instead.
STATE_VERSION = 1

_VECTOR_RE = re.compile(r"^vector-([0-4])-(\d{1,4})$")
_CLIENT_RE = re.compile(r"^client-(\d{1,10})$")


class HandoverError(Exception):
    """A hand-over cannot be done, or its state cannot be used."""


def vector_fd_name(index: IrqIndex, vector: int) -> str:
    """``vector-<index>-<n>``: the FDNAME of a vector's eventfd."""
    return f"{VECTOR_PREFIX}{int(index)}-{vector}"


def parse_vector_fd_name(name: str) -> tuple[IrqIndex, int] | None:
    """Inverse of :func:`vector_fd_name`; ``None`` for any other name."""
    match = _VECTOR_RE.match(name)
    return (IrqIndex(int(match[1])), int(match[2])) if match else None


def event_fd_name(index: IrqIndex) -> str:
    """``event-req`` / ``event-err``: the FDNAME of the daemon's own REQ/ERR eventfd."""
    return f"{EVENT_PREFIX}{index.wire_name}"


def client_fd_name(session_id: int) -> str:
    """``client-<id>``: the FDNAME of a client's connection."""
    return f"{CLIENT_PREFIX}{session_id}"


def parse_client_fd_name(name: str) -> int | None:
    """Inverse of :func:`client_fd_name`."""
    match = _CLIENT_RE.match(name)
    return int(match[1]) if match else None


def write_state(state: dict[str, Any]) -> int:
    """A sealed memfd holding ``state`` as msgpack (a ``Packed`` value, irqd.packing,
    goes in as it is); the caller owns the fd.

    Sealed (no write, grow or shrink) so that what the next process reads is
    exactly what this one wrote, whoever else holds the fd meanwhile.
    """
    data = pack_map({"version": STATE_VERSION, **state})
    fd = os.memfd_create("vfio-irqd-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_state(fd: int) -> dict[str, Any]:
    """The state :func:`write_state` stored; closes ``fd``. ``HandoverError`` if unusable."""
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    try:
        state = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # anything msgpack raises means the bytes are bad
        raise HandoverError(f"the stored state is not readable: {exc}") from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise HandoverError(
            f"stored state has version {version!r}; this daemon reads {STATE_VERSION}"
        )
    return state


def device_fds(device: Device) -> dict[str, int] | None:
    """The fds that keep ``device`` open, by key; ``None`` if its backend cannot be handed over."""
    try:
        return device.handover_fds()
    except Unsupported:
        return None


class DeviceDescription(TypedDict):
    """The device's part of the state (``"device"``)."""

    #: ``Device.backend`` of the device handed over (earlier versions: its class name).
    kind: str
    name: str
    #: ``Device.export_state``.
    state: dict[str, Any]


def export_device(device: Device) -> DeviceDescription:
    """The device's part of the state."""
    return {"kind": device.backend, "name": device.name, "state": device.export_state()}


def _backend(kind: str) -> type[Device]:
    """The class that adopts a stored device of ``kind`` (``Device.backend``)."""
    if kind == SimDevice.backend:
        return SimDevice
    # Only real devices need it. Any other kind is a real device: earlier
    # versions wrote the class name ("VfioDevice") here.
    from irqd.device.vfio import VfioDevice  # noqa: PLC0415

    return VfioDevice


@dataclass
class StoredFds:
    """What a hand-over sends to the fd store, in order (``state`` comes last)."""

    fds: list[tuple[str, int]] = field(default_factory=list)

    def add(self, name: str, fd: int) -> None:
        self.fds.append((name, fd))


@dataclass
class Carried:
    """What a previous daemon process left in the fd store, taken out of the inherited fds."""

    state: dict[str, Any]
    eventfds: dict[tuple[IrqIndex, int], EventFd] = field(default_factory=dict)
    clients: dict[int, int] = field(default_factory=dict)
    device_fds: dict[str, int] = field(default_factory=dict)
    #: The daemon's own REQ/ERR eventfds (irqd.device.events), still assigned.
    events: dict[IrqIndex, EventFd] = field(default_factory=dict)
    #: ``True`` when ``state`` is a ``live-state`` record (a crash: no exact
    #: counts), ``False`` for a hand-over's sealed ``state``.
    live: bool = False
    #: The ``live-state`` memfd, written on by the next writer (irqd.process.crashstate).
    live_state_fd: int | None = None
    #: The stream guard's memfd (irqd.hotpath.guard).
    guard_fd: int | None = None

    def close(self) -> None:
        """Give up on all of it (the state could not be used)."""
        for efd in [*self.eventfds.values(), *self.events.values()]:
            efd.close()
        for fd in [*self.clients.values(), *self.device_fds.values()]:
            os.close(fd)
        self.eventfds, self.clients, self.device_fds, self.events = {}, {}, {}, {}
        self.close_live()

    def close_live(self) -> None:
        """Close the ``live-state`` and ``guard`` memfds, if they were not taken."""
        for fd in (self.live_state_fd, self.guard_fd):
            if fd is not None:
                os.close(fd)
        self.live_state_fd = self.guard_fd = None


def stored_names(inherited: InheritedFds) -> list[str]:
    """The inherited names that came from the fd store (as opposed to a socket unit)."""
    return [
        name
        for name in inherited.names()
        if name in (STATE_NAME, LISTENER_NAME, LIVE_STATE_NAME, GUARD_NAME)
        or name.startswith(STORED_PREFIXES)
    ]


def take_carried(inherited: InheritedFds) -> Carried | None:
    """The state and fds of a hand-over or a crash among the inherited fds, if any.

    A hand-over's sealed ``state`` wins; without one, the ``live-state``
    record (irqd.process.crashstate) a process that died left is used
    (``Carried.live``). Eventfds are checked to be eventfds and adopted
    (``EventFd.adopt``). Fds without a usable state are closed: they cannot
    be made sense of.
    """
    state_fd = inherited.take(STATE_NAME)
    live_fd = inherited.take(LIVE_STATE_NAME)
    guard_fd = inherited.take(GUARD_NAME)
    device = inherited.take_prefix(DEVICE_PREFIX)
    carried = Carried(
        {},
        device_fds={k[len(DEVICE_PREFIX) :]: fd for k, fd in device.items()},
        live_state_fd=live_fd,
        guard_fd=guard_fd,
    )
    for name, fd in inherited.take_prefix(VECTOR_PREFIX).items():
        key = parse_vector_fd_name(name)
        if key is None or not is_eventfd(fd):
            os.close(fd)
            continue
        carried.eventfds[key] = EventFd.adopt(fd)
    for name, fd in inherited.take_prefix(EVENT_PREFIX).items():
        wire = name[len(EVENT_PREFIX) :]
        if wire not in ("req", "err") or not is_eventfd(fd):
            os.close(fd)
            continue
        carried.events[IrqIndex.from_wire(wire)] = EventFd.adopt(fd)
    for name, fd in inherited.take_prefix(CLIENT_PREFIX).items():
        sid = parse_client_fd_name(name)
        if sid is None:
            os.close(fd)
            continue
        carried.clients[sid] = fd
    if state_fd is None and live_fd is not None:
        try:
            carried.state = read_live_state(live_fd)
        except HandoverError as exc:
            log.error("crash.bad_live_state", error=str(exc), note="starting afresh")
            carried.close()
            return None
        carried.live = True
        return carried
    if state_fd is None:
        if carried.eventfds or carried.clients or carried.device_fds or carried.events:
            log.error("handover.no_state", note="stored fds without their state are closed")
        carried.close()
        return None
    try:
        carried.state = read_state(state_fd)
    except HandoverError as exc:
        log.error("handover.bad_state", error=str(exc), note="starting afresh")
        carried.close()
        return None
    return carried


def read_live_state(fd: int) -> dict[str, Any]:
    """The record a live process last wrote into the ``live-state`` memfd ``fd``
    (not closed); ``HandoverError`` if there is none this daemon can use."""
    try:
        _, state = read_crash_state(fd)
    except CrashStateError as exc:
        raise HandoverError(f"the live state is not usable: {exc}") from exc
    if state.get("version") != STATE_VERSION or state.get("kind") != "live":
        raise HandoverError(
            f"live state of version {state.get('version')!r}, kind {state.get('kind')!r}; "
            f"this daemon reads version {STATE_VERSION}, kind 'live'"
        )
    for key in ("device", "table", "sessions", "next_id"):
        if key not in state:
            raise HandoverError(f"the live state has no {key!r}")
    return state


def adopt_device(carried: Carried, fresh: Callable[[], Device], bdf: str | None) -> Device:
    """The device the previous process had, as it left it: no ``SET_IRQS`` call on the way.

    ``fresh`` opens the configured device (``bdf``, or the simulation for
    ``None``) for a backend that takes the stored state over on a new object
    (``Device.adopt_stored``). Takes ``carried.device_fds`` over.
    """
    described = carried.state["device"]
    backend = _backend(described["kind"])
    if backend is SimDevice and bdf is not None:
        raise HandoverError("the stored state is of the simulated device, not a real one")
    if backend is not SimDevice and bdf is None:
        raise HandoverError("the stored state is of a real device; the simulation is configured")
    stored = StoredDevice(
        configured=bdf,
        state=described.get("state"),
        fds=carried.device_fds,
        eventfds={key: efd.fileno() for key, efd in carried.eventfds.items()},
    )
    carried.device_fds = {}
    return backend.adopt_stored(stored, fresh)
