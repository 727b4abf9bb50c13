"""Device uevents: is our PCI device bound to vfio-pci, has it gone away?

Two layers, as in pyroute2's ``netlink/uevent`` (which this module's parser
follows, and whose ``UeventSocket`` opens the netlink socket):

* :func:`parse_uevent` turns one datagram into a :class:`Uevent`. It is pure
  and is tested on captured datagrams of both kinds:

  - the kernel's (``NETLINK_KOBJECT_UEVENT`` group 1, lib/kobject_uevent.c):
    ``"<action>@<devpath>\\0"`` then ``KEY=VALUE\\0`` pairs;
  - udevd's (group 2, libudev ``monitor_send_device``): a binary header
    starting ``"libudev\\0"``, then the magic 0xfeedcafe in network byte
    order and, in host order, the header size and the offset and length of
    the same ``KEY=VALUE\\0`` properties.

* :class:`UeventSource` reads datagrams from any socket fd from Trio
  (``wait_readable`` on the fd, then non-blocking reads), and
  :func:`open_uevent_source` makes one on pyroute2's ``UeventSocket``.

Facts that shape the waiting logic: since Linux 4.14 binding and unbinding a
driver send ``bind``/``unbind`` uevents with ``DRIVER=``; ``remove`` follows a
hot-unplug or a ``remove`` write in sysfs. Uevents are a broadcast without
replay, so a waiter opens the socket first and then looks at sysfs, or an
event between the two would be missed; and a netlink socket whose queue
overflows reports ``ENOBUFS``, after which sysfs is the only truth.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import trio

__all__ = [
    "Uevent",
    "UeventSource",
    "current_driver",
    "is_device_gone",
    "is_vfio_bound",
    "open_uevent_source",
    "parse_uevent",
    "wait_for_vfio",
]

log = structlog.get_logger("irqd.device.uevent")

#: libudev's ``struct udev_monitor_netlink_header``: "libudev\0", the magic
#: (big-endian, ``htobe32``), then in host order the header size, properties
#: offset and length, subsystem and devtype hashes, tag bloom hi/lo.
_UDEV_HEADER = struct.Struct("=8sIIIIIIII")
_UDEV_PREFIX = b"libudev\0"
_UDEV_MAGIC = 0xFEEDCAFE

#: NETLINK_KOBJECT_UEVENT multicast group of kernel events (udevd rebroadcasts on 2).
KERNEL_GROUP = 1

#: The largest uevent the kernel sends (UEVENT_BUFFER_SIZE) with room for udev's header.
RECV_SIZE = 8192

VFIO_DRIVER = "vfio-pci"


@dataclass(frozen=True)
class Uevent:
    """One parsed uevent."""

    #: ``kernel`` or ``udev``.
    source: str
    action: str
    devpath: str
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def subsystem(self) -> str:
        return self.env.get("SUBSYSTEM", "")

    @property
    def driver(self) -> str | None:
        return self.env.get("DRIVER")

    @property
    def pci_slot(self) -> str | None:
        """The PCI address (``PCI_SLOT_NAME``, else the last component of ``DEVPATH``)."""
        slot = self.env.get("PCI_SLOT_NAME")
        if slot:
            return slot
        if self.subsystem == "pci":
            return self.devpath.rsplit("/", 1)[-1] or None
        return None

    def is_for(self, bdf: str) -> bool:
        """Whether this event is about PCI device ``bdf`` itself (not a child)."""
        return self.subsystem == "pci" and self.pci_slot == bdf


def parse_uevent(data: bytes) -> Uevent | None:
    """One kernel or udev uevent datagram, or ``None`` if it is neither."""
    if data.startswith(_UDEV_PREFIX):
        if len(data) < _UDEV_HEADER.size:
            return None
        _, _, header_size, offset, length, *_ = _UDEV_HEADER.unpack_from(data)
        magic = int.from_bytes(data[8:12], "big")
        if magic != _UDEV_MAGIC or header_size < _UDEV_HEADER.size:
            return None
        if offset < header_size or offset + length > len(data):
            return None
        env = _pairs(data[offset : offset + length].split(b"\0"))
        action = env.get("ACTION", "")
        devpath = env.get("DEVPATH", "")
        source = "udev"
    else:
        head, _, rest = data.partition(b"\0")
        action_b, at, devpath_b = head.partition(b"@")
        if not at or not action_b:
            return None
        env = _pairs(rest.split(b"\0"))
        action = env.get("ACTION") or action_b.decode("utf-8", "replace")
        devpath = env.get("DEVPATH") or devpath_b.decode("utf-8", "replace")
        source = "kernel"
    if not action or not devpath:
        return None
    return Uevent(source, action, devpath, env)


def _pairs(items: list[bytes]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition(b"=")
        if not eq or not key:
            continue  # the trailing empty string, or a stray token
        try:
            env[key.decode("ascii")] = value.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return env


def is_vfio_bound(event: Uevent, bdf: str) -> bool:
    """``bdf`` is now bound to vfio-pci (``bind``, or ``add`` with the driver set)."""
    return event.is_for(bdf) and event.action in ("bind", "add") and event.driver == VFIO_DRIVER


def is_device_gone(event: Uevent, bdf: str) -> str | None:
    """``"removed"`` or ``"unbound"`` when the event takes ``bdf`` away from us, else ``None``."""
    if not event.is_for(bdf):
        return None
    if event.action == "remove":
        return "removed"
    if event.action == "unbind":
        return "unbound"
    return None


def current_driver(bdf: str, sysfs: Path = Path("/sys")) -> str | None:
    """The driver ``bdf`` is bound to now, from sysfs; ``None`` if unbound or absent."""
    try:
        return os.readlink(sysfs / "bus" / "pci" / "devices" / bdf / "driver").rsplit("/", 1)[-1]
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None


class UeventSource:
    """Uevents read from a datagram socket fd, driven from Trio.

    The fd is not owned: ``close`` releases only this object's duplicate.
    """

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=os.dup(fd))
        self._sock.setblocking(False)
        #: Set when the kernel reported a queue overflow (events were lost).
        self.overflowed = False

    def fileno(self) -> int:
        return self._sock.fileno()

    async def receive(self) -> Uevent:
        """The next well-formed uevent; waits for it."""
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            try:
                data = self._sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overflowed = True
                log.warning("uevent.overflow", note="events were lost; rechecking sysfs")
                continue
            event = parse_uevent(data)
            if event is not None:
                return event

    async def __aiter__(self) -> AsyncIterator[Uevent]:
        while True:
            yield await self.receive()

    def close(self) -> None:
        self._sock.close()


def _uevent_socket_class() -> type[Any]:
    """pyroute2's ``UeventSocket``, imported quietly.

    Importing pyroute2 loads its traffic-control tables, which read
    ``/proc/net/psched`` and warn twice when it is missing, as it is under the
    unit's ``ProcSubset=pid``; the daemon uses no traffic control, so those
    two warnings are noise at every start.
    """
    quiet = logging.getLogger("pyroute2.netlink.rtnl.tcmsg")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from pyroute2 import UeventSocket  # noqa: PLC0415  only ``serve`` needs netlink
    finally:
        quiet.setLevel(level)
    cls: type[Any] = UeventSocket
    return cls


@contextlib.contextmanager
def open_uevent_source() -> Iterator[UeventSource]:
    """Kernel uevents through pyroute2's ``UeventSocket`` (needs the initial user namespace's
    network namespace or one it owns; systemd's ``PrivateNetwork=`` namespace qualifies)."""
    nl = _uevent_socket_class()()
    try:
        nl.bind(groups=KERNEL_GROUP)
        source = UeventSource(nl.fileno())
        try:
            yield source
        finally:
            source.close()
    finally:
        nl.close()


async def wait_for_vfio(
    bdf: str,
    source: UeventSource,
    sysfs: Path = Path("/sys"),
    waiting: Callable[[], object] | None = None,
) -> None:
    """Return once ``bdf`` is bound to vfio-pci.

    ``source`` must already be open: sysfs is read after it, so a bind between
    the two is seen either way. ``waiting`` is called only when the device was
    not bound when sysfs was read, before waiting for its uevent: whoever it
    tells (``STATUS=`` for systemd) may bind it from then on.
    """
    driver = current_driver(bdf, sysfs)
    if driver == VFIO_DRIVER:
        return
    log.info("device.waiting", device=bdf, driver=driver, want=VFIO_DRIVER)
    if waiting is not None:
        waiting()
    while True:
        event = await source.receive()
        if is_vfio_bound(event, bdf) or (
            (event.is_for(bdf) or source.overflowed) and current_driver(bdf, sysfs) == VFIO_DRIVER
        ):
            source.overflowed = False
            log.info("device.bound", device=bdf, driver=VFIO_DRIVER, uevent=event.action)
            return
