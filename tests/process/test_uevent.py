"""Uevents: the pure parser on captured datagrams, and waiting for vfio-pci from Trio."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from irqd.device.uevent import (
    UeventSource,
    current_driver,
    is_device_gone,
    is_vfio_bound,
    open_uevent_source,
    parse_uevent,
    wait_for_vfio,
)

BDF = "0000:03:00.0"
DEVPATH = "/devices/pci0000:00/0000:00:1c.0/0000:03:00.0"

#: lib/kobject_uevent.c as sent on NETLINK_KOBJECT_UEVENT group 1 when
#: `echo 0000:03:00.0 > /sys/bus/pci/drivers/vfio-pci/bind` (Linux 6.1, e1000e NIC).
KERNEL_BIND = (
    b"bind@/devices/pci0000:00/0000:00:1c.0/0000:03:00.0\0"
    b"ACTION=bind\0DEVPATH=/devices/pci0000:00/0000:00:1c.0/0000:03:00.0\0"
    b"SUBSYSTEM=pci\0DRIVER=vfio-pci\0PCI_CLASS=20000\0PCI_ID=8086:10D3\0"
    b"PCI_SUBSYS_ID=8086:A01F\0PCI_SLOT_NAME=0000:03:00.0\0"
    b"MODALIAS=pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00\0SEQNUM=5123\0"
)
#: The unbind that follows `echo 0000:03:00.0 > .../vfio-pci/unbind`: no DRIVER=,
#: the driver is already gone when it is sent.
KERNEL_UNBIND = (
    b"unbind@/devices/pci0000:00/0000:00:1c.0/0000:03:00.0\0"
    b"ACTION=unbind\0DEVPATH=/devices/pci0000:00/0000:00:1c.0/0000:03:00.0\0"
    b"SUBSYSTEM=pci\0PCI_CLASS=20000\0PCI_ID=8086:10D3\0PCI_SUBSYS_ID=8086:A01F\0"
    b"PCI_SLOT_NAME=0000:03:00.0\0"
    b"MODALIAS=pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00\0SEQNUM=5127\0"
)
#: `echo 1 > /sys/bus/pci/devices/0000:03:00.0/remove`.
KERNEL_REMOVE = KERNEL_UNBIND.replace(b"unbind", b"remove").replace(b"5127", b"5130")
#: A child of the device (its IOMMU group's vfio node): same PCI slot nowhere.
KERNEL_VFIO_NODE = (
    b"add@/devices/virtual/vfio/12\0ACTION=add\0DEVPATH=/devices/virtual/vfio/12\0"
    b"SUBSYSTEM=vfio\0MAJOR=243\0MINOR=0\0DEVNAME=vfio/12\0SEQNUM=5124\0"
)
_UDEV_PROPS = (
    b"UDEV_DATABASE_VERSION=1\0ACTION=bind\0DEVPATH=/devices/pci0000:00/0000:00:1c.0/"
    b"0000:03:00.0\0SUBSYSTEM=pci\0DRIVER=vfio-pci\0PCI_CLASS=20000\0PCI_ID=8086:10D3\0"
    b"PCI_SUBSYS_ID=8086:A01F\0PCI_SLOT_NAME=0000:03:00.0\0"
    b"MODALIAS=pci:v00008086d000010D3sv00008086sd0000A01Fbc02sc00i00\0SEQNUM=5123\0"
    b"USEC_INITIALIZED=7021884\0ID_VENDOR_FROM_DATABASE=Intel Corporation\0"
)
#: udevd's rebroadcast of KERNEL_BIND (group 2): libudev's monitor header, magic
#: big-endian, the rest in host order, properties right after the 40-byte header.
UDEV_BIND = (
    b"libudev\0"
    + (0xFEEDCAFE).to_bytes(4, "big")
    + struct.pack("=IIIIIII", 40, 40, len(_UDEV_PROPS), 0x6A1C4F2D, 0, 0x20000, 0x400)
    + _UDEV_PROPS
)


def test_kernel_bind_is_parsed() -> None:
    event = parse_uevent(KERNEL_BIND)
    assert event is not None
    assert (event.source, event.action, event.devpath) == ("kernel", "bind", DEVPATH)
    assert (event.subsystem, event.driver, event.pci_slot) == ("pci", "vfio-pci", BDF)
    assert event.env["SEQNUM"] == "5123"
    assert is_vfio_bound(event, BDF)
    assert not is_vfio_bound(event, "0000:04:00.0")


def test_udev_bind_is_parsed_the_same() -> None:
    event = parse_uevent(UDEV_BIND)
    assert event is not None
    assert event.source == "udev"
    assert (event.action, event.devpath, event.driver, event.pci_slot) == (
        "bind",
        DEVPATH,
        "vfio-pci",
        BDF,
    )
    assert event.env["ID_VENDOR_FROM_DATABASE"] == "Intel Corporation"
    assert is_vfio_bound(event, BDF)


def test_unbind_and_remove_take_the_device_away() -> None:
    unbind, remove, node = map(parse_uevent, (KERNEL_UNBIND, KERNEL_REMOVE, KERNEL_VFIO_NODE))
    assert unbind is not None and remove is not None and node is not None
    assert is_device_gone(unbind, BDF) == "unbound"
    assert is_device_gone(remove, BDF) == "removed"
    assert is_device_gone(remove, "0000:04:00.0") is None
    assert is_device_gone(node, BDF) is None
    assert not is_vfio_bound(unbind, BDF)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"no-at-sign\0ACTION=add\0",
        b"libudev\0short",
        b"libudev\0" + b"\0\0\0\0" + bytes(32) + b"ACTION=add\0",  # wrong magic
        UDEV_BIND[:40] + b"truncated",  # properties shorter than the header says
    ],
)
def test_garbage_is_not_an_event(data: bytes) -> None:
    assert parse_uevent(data) is None


def fake_sysfs(root: Path, driver: str | None) -> Path:
    dev = root / "bus" / "pci" / "devices" / BDF
    dev.mkdir(parents=True, exist_ok=True)
    link = dev / "driver"
    if link.is_symlink():
        link.unlink()
    if driver is not None:
        link.symlink_to(f"../../../../bus/pci/drivers/{driver}")
    return root


def test_current_driver_reads_the_sysfs_link(tmp_path: Path) -> None:
    assert current_driver(BDF, fake_sysfs(tmp_path, "e1000e")) == "e1000e"
    assert current_driver(BDF, fake_sysfs(tmp_path, None)) is None
    assert current_driver("0000:09:00.0", tmp_path) is None


async def test_wait_returns_at_once_when_already_bound(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    source = UeventSource(b.fileno())
    with a, b:
        told: list[str] = []
        await wait_for_vfio(
            BDF, source, fake_sysfs(tmp_path, "vfio-pci"), waiting=lambda: told.append("waiting")
        )
    source.close()
    assert told == []  # nobody is told to bind a device that is bound already


async def test_wait_until_a_bind_uevent_arrives(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, "e1000e")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    source = UeventSource(b.fileno())
    done = trio.Event()

    told: list[str] = []

    async def waiter() -> None:
        await wait_for_vfio(BDF, source, sysfs, waiting=lambda: told.append("waiting"))
        done.set()

    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            # Told only after sysfs said "not bound", so a bind from now on is seen.
            assert told == ["waiting"]
            for datagram in (KERNEL_UNBIND, KERNEL_VFIO_NODE, b"garbage", UDEV_BIND[:20]):
                a.send(datagram)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()
            fake_sysfs(tmp_path, "vfio-pci")
            a.send(KERNEL_BIND)
            with trio.fail_after(5):
                await done.wait()
    source.close()


async def test_a_real_kernel_uevent_through_pyroute2() -> None:
    """pyroute2's UeventSocket, read from Trio: the kernel's own datagram, parsed."""
    trigger = Path("/sys/devices/virtual/mem/null/uevent")
    with open_uevent_source() as source:
        try:
            # Asks the kernel to send a `change` uevent for /dev/null (root only).
            await trio.Path(trigger).write_text("change")
        except OSError as exc:
            pytest.skip(f"cannot trigger a uevent here: {exc}")
        with trio.fail_after(5):
            while True:
                event = await source.receive()
                if event.devpath == "/devices/virtual/mem/null":
                    break
    assert (event.source, event.action, event.subsystem) == ("kernel", "change", "mem")
